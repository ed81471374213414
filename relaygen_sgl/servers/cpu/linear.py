"""Linear maps of 2-5 rows for SGLang's CPU servers, computed as W x^T.

On the development CPU torch's fp32 `F.linear` for 2-5 rows is far slower than for one row
(matrix-vector): SmolLM2-135M's 30 layers of linear maps took 24 ms for 1 row and 33-41 ms
for 2-5, while the same product as `W @ x.T` took 18-35 ms (from 6 rows on it is slower).
Rows of 2-5 are what a handoff prefill of a few tokens and a decode step at 2-5 concurrent
requests compute (README, "CPU compute patches").

Only fp32 CPU tensors of 2-5 rows without AMX packing take this path; everything else runs
SGLang's `UnquantizedLinearMethod.apply`. The result equals F.linear's up to float rounding
(another summation order). The CPU servers get it as relaygen_sgl.servers.cpu.patches says.
"""

from __future__ import annotations

from typing import Any

ROWS = range(2, 6)


def few_rows_as_columns(original: Any) -> Any:
    """A drop-in for `UnquantizedLinearMethod.apply`; `original` runs what it leaves alone."""
    import torch

    def apply(self: Any, layer: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        w = layer.weight
        if (x.dim() != 2 or x.shape[0] not in ROWS or x.device.type != "cpu" or x.dtype != torch.float32
                or type(w.data) is not torch.Tensor or w.dtype != torch.float32
                or getattr(layer, "use_intel_amx_backend", False)):
            return original(self, layer, x, bias)
        out = torch.mm(w, x.t()).t().contiguous()
        return out + bias if bias is not None else out

    apply.__wrapped__ = original  # type: ignore[attr-defined]
    return apply
