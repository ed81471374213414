"""The CPU servers' extend attention (relaygen_sgl.servers.cpu.attention) against SGLang's own."""

from __future__ import annotations

import pytest
import torch

from relaygen_sgl.servers.cpu.attention import extend_new_rows

TorchNativeAttnBackend = pytest.importorskip(
    "sglang.srt.layers.attention.torch_native_backend").TorchNativeAttnBackend
SGLANGS = TorchNativeAttnBackend.__dict__["_run_sdpa_forward_extend"]


def batch(prefixes: list[int], new: list[int], heads: int = 6, kv_heads: int = 2, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    total = sum(p + n for p, n in zip(prefixes, new))
    k_cache = torch.randn(total + 5, kv_heads, dim, generator=g)
    v_cache = torch.randn(total + 5, kv_heads, dim, generator=g)
    req_to_token = torch.zeros(len(new) + 2, 64, dtype=torch.int32)
    slots = torch.randperm(total, generator=g) + 5  # scattered KV slots, as a real pool has
    pos = 0
    for i, (p, n) in enumerate(zip(prefixes, new)):
        req_to_token[i + 1, :p + n] = slots[pos:pos + p + n]
        pos += p + n
    query = torch.randn(sum(new), heads, dim, generator=g)
    return dict(query=query, k_cache=k_cache, v_cache=v_cache, req_to_token=req_to_token,
                req_pool_indices=torch.arange(1, len(new) + 1),
                seq_lens=torch.tensor([p + n for p, n in zip(prefixes, new)]),
                extend_prefix_lens=torch.tensor(prefixes), extend_seq_lens=torch.tensor(new))


def run(fn, b, **kw):
    out = torch.full_like(b["query"], float("nan"))
    fn(None, b["query"], out, b["k_cache"], b["v_cache"], b["req_to_token"], b["req_pool_indices"], b["seq_lens"],
       b["extend_prefix_lens"], b["extend_seq_lens"], None, scaling=0.25, **kw)
    return out


@pytest.mark.parametrize("prefixes,new", [([0], [7]), ([30], [1]), ([30], [2]), ([12, 0, 40], [5, 9, 1]),
                                          ([3, 50], [20, 3])])
@pytest.mark.parametrize("causal", [True, False])
def test_same_rows_as_sglangs_extend(prefixes, new, causal):
    b = batch(prefixes, new)
    kw = dict(enable_gqa=True, causal=causal)
    mine, theirs = run(extend_new_rows(SGLANGS), b, **kw), run(SGLANGS, b, **kw)
    assert not mine.isnan().any()
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_sliding_windows_keep_sglangs_code():
    seen = []
    fallback = extend_new_rows(lambda *a, **kw: seen.append(kw["sliding_window_size"]))
    b = batch([10], [3])
    run(fallback, b, enable_gqa=True, causal=True, sliding_window_size=4)
    assert seen == [4]
