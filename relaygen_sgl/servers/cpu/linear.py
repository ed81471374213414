"""Linear maps of 2-8 rows for SGLang's CPU servers: torch's `F.linear` or `W x^T`, whichever
this CPU computes faster for that weight shape and row count, measured on first use.

Rows of 2-8 are what a handoff prefill of a few tokens (after the inserted "</think>": 6-8)
and a decode step at 2-8 concurrent requests compute. Which product is faster depends on the
CPU and its BLAS, in both directions, and the slower one costs a handoff's first token a large
part of a decode step (the machines and numbers: docs/results.md, "Measurements behind design
choices"). So neither is hard-wired: the first call of each (weight shape, rows) times both on
its own input, three times each, interleaved, and keeps the faster. That costs a few calls once
per shape and row count, during one server's first few-row forwards.

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
    return apply
