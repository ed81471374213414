"""Extend attention for SGLang's torch_native backend that computes only the new rows.

SGLang 0.5.23's `TorchNativeAttnBackend._run_sdpa_forward_extend` builds a query of the
request's whole length (prefix rows left uninitialised) and runs causal SDPA over it, then
keeps the new rows: an extend of n new tokens on a prefix of P costs (P+n)^2 instead of
n*(P+n). A handoff's few-token prefill then costs more the longer the trajectory, so every
handoff, prefetch and follow-up turn pays for the prefix again (on the CPU pair, several
decode steps once trajectories are a few hundred tokens long: docs/results.md).

`extend_new_rows` gives the same rows: query row i (position P+i) attends keys 0..P+i,
the causal mask aligned to the bottom right. Sliding windows and encoder (cross)
attention keep SGLang's code. The CPU servers get it as relaygen_sgl.servers.cpu.patches says.
"""

from __future__ import annotations

from typing import Any


def extend_new_rows(original: Any) -> Any:
    """A drop-in for `_run_sdpa_forward_extend`; `original` runs the cases it leaves alone."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    def run(self: Any, query: torch.Tensor, output: torch.Tensor, k_cache: torch.Tensor,
            v_cache: torch.Tensor, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
            seq_lens: torch.Tensor, extend_prefix_lens: torch.Tensor, extend_seq_lens: torch.Tensor,
            encoder_lens: torch.Tensor | None = None, scaling: float | None = None, enable_gqa: bool = False,
            causal: bool = False, is_cross_attn: bool = False, sliding_window_size: int | None = None) -> torch.Tensor:
        if encoder_lens is not None or is_cross_attn or (sliding_window_size is not None and sliding_window_size > -1):
            return original(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                            extend_prefix_lens, extend_seq_lens, encoder_lens, scaling=scaling,
                            enable_gqa=enable_gqa, causal=causal, is_cross_attn=is_cross_attn,
                            sliding_window_size=sliding_window_size)
        q_all = query.movedim(0, query.dim() - 2)  # [heads, tokens, dim]
        start_q = 0
        for kv_len, prefix, n, pool_idx in zip(seq_lens.tolist(), extend_prefix_lens.tolist(),
                                               extend_seq_lens.tolist(), req_pool_indices.tolist()):
            q = q_all[:, start_q:start_q + n, :]
            slots = req_to_token[pool_idx, :kv_len]
            k = k_cache[slots].movedim(0, query.dim() - 2)
            v = v_cache[slots].movedim(0, query.dim() - 2)
            if not (q.dtype == k.dtype == v.dtype):
                k, v = k.to(q.dtype), v.to(q.dtype)
            mask = None
            is_causal = False
            if causal and n > 1:
                if prefix == 0:
                    is_causal = True  # top-left and bottom-right alignment agree
                else:
                    # row i sits at position prefix+i: it sees keys 0..prefix+i
                    mask = torch.ones(n, kv_len, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
            out = scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                               enable_gqa=enable_gqa, scale=scaling, is_causal=is_causal)
            output[start_q:start_q + n, :, :] = out.squeeze(0).movedim(query.dim() - 2, 0)
            start_q += n
        return output

    run.__wrapped__ = original  # type: ignore[attr-defined]
    return run
