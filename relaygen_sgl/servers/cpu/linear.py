"""Linear maps of 2-8 rows for SGLang's CPU servers: torch's `F.linear` or `W x^T`, whichever
this CPU computes faster for that weight shape and row count, measured on first use.

Rows of 2-8 are what a handoff prefill of a few tokens (after the inserted "</think>": 6-8)
and a decode step at 2-8 concurrent requests compute. Which product is faster depends on the
CPU and its BLAS: on the AMD EPYC of 2026-11, fp32 `F.linear` for 2-5 rows was far slower than
for one row (SmolLM2-135M's 30 layers of linear maps: 24 ms for 1 row, 33-41 ms for 2-5) and
`W @ x.T` took 18-35 ms; on the Intel Xeon (AVX-512, MKL) of 2026-12, `F.linear` for 2-3 rows
cost what one row costs and `W @ x.T` twice that (from 6 rows on W x^T is the faster there
too), and forcing W x^T made a 2-token prefill 1.81 decode steps against 1.12 with F.linear
(docs/cpu.md, "CPU compute patches"). So neither is hard-wired: the first call of each (weight
shape, rows) times both on its own input, three times each, interleaved, and keeps the faster.
That costs a few calls once per shape and row count; with SmolLM2-135M's shapes, well under a
second of one server's first few-row forwards.

Only fp32 CPU tensors of 2-8 rows without AMX packing are measured; everything else runs
SGLang's `UnquantizedLinearMethod.apply`. W x^T equals F.linear up to float rounding (another
summation order). The CPU servers get it as relaygen_sgl.servers.cpu.patches says.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

ROWS = range(2, 9)
TRIALS = 3  # timed calls of each product per decision, after one untimed call of each


def faster_of(a: Callable[[], Any], b: Callable[[], Any], trials: int = TRIALS,
              clock: Callable[[], float] = time.perf_counter) -> bool:
    """True when `b` is faster than `a`: the best of `trials` calls each, interleaved (a
    neighbour's burst of work slows both alike), after one untimed call of each."""
    a()
    b()
    best = [float("inf"), float("inf")]
    for _ in range(trials):
        for i, fn in enumerate((a, b)):
            t0 = clock()
            fn()
            best[i] = min(best[i], clock() - t0)
    return best[1] < best[0]


def few_rows_fastest(original: Any) -> Any:
    """A drop-in for `UnquantizedLinearMethod.apply`; `original` runs what it leaves alone and
    the F.linear side of each measurement."""
    import torch

    columns: dict[tuple[int, int, int, bool], bool] = {}  # (out, in, rows, bias) -> W x^T is faster

    def as_columns(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = torch.mm(w, x.t()).t().contiguous()
        return out + bias if bias is not None else out

    def apply(self: Any, layer: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        w = layer.weight
        if (x.dim() != 2 or x.shape[0] not in ROWS or x.device.type != "cpu" or x.dtype != torch.float32
                or type(w.data) is not torch.Tensor or w.dtype != torch.float32
                or getattr(layer, "use_intel_amx_backend", False)):
            return original(self, layer, x, bias)
        key = (w.shape[0], w.shape[1], x.shape[0], bias is not None)
        if key not in columns:
            columns[key] = faster_of(lambda: original(self, layer, x, bias), lambda: as_columns(w, x, bias))
        return as_columns(w, x, bias) if columns[key] else original(self, layer, x, bias)

    apply.__wrapped__ = original  # type: ignore[attr-defined]
    apply.choices = columns  # type: ignore[attr-defined]  # what was measured, for tests and a curious reader
    return apply
