"""Pure-torch stand-in for the CPU ops of sgl-kernel, whose CPU build is not on PyPI.

This folder goes on the PYTHONPATH of CPU SGLang server processes only (see
relaygen_sgl/servers/launch.py); it must never sit beside a real sgl-kernel install.
SGLang 0.5.23's CPU engine imports two ops from it; anything else raises, so a
new dependency shows up as a clear error instead of silently wrong numbers.
"""

from __future__ import annotations

import torch

__version__ = "0.0.0+relaygen-cpu-shim"


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    # Same contract as the triton kernel in mem_cache/allocation.py: request i's
    # slots are the next (end-start) entries of out_cache_loc, written into its
    # row of req_to_token between start and end.
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    cursor = 0
    for row, start, end in zip(rows, starts, ends):
        n = end - start
        if n > 0:
            req_to_token[row, start:end] = out_cache_loc[cursor : cursor + n].to(req_to_token.dtype)
        cursor += n


def _missing(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not provided by the relaygen CPU shim")

    op.__name__ = name
    return op


# Imported at module load by kernels/ops/kvcache/cache_move.py, never called on our path.
copy_all_layer_kv_cache_cpu = _missing("copy_all_layer_kv_cache_cpu")


def __getattr__(name: str):
    # Dunder probes (import machinery, hasattr) must keep seeing AttributeError.
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)
