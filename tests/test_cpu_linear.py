"""The CPU servers' linear maps of 2-5 rows (relaygen_sgl.servers.cpu.linear) against SGLang's own."""

from __future__ import annotations

import pytest
import torch

from relaygen_sgl.servers.cpu.linear import few_rows_as_columns

unquant = pytest.importorskip("sglang.srt.layers.quantization.unquant")
SGLANGS = unquant.UnquantizedLinearMethod.__dict__["apply"]


class Layer(torch.nn.Module):
    def __init__(self, out: int, inp: int, dtype=torch.float32) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out, inp, generator=torch.Generator().manual_seed(1)).to(dtype),
                                         requires_grad=False)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 9])
@pytest.mark.parametrize("with_bias", [False, True])
def test_same_values_as_sglangs_linear(rows, with_bias):
    layer = Layer(192, 576)
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(192) if with_bias else None
    mine = few_rows_as_columns(SGLANGS)(None, layer, x, bias)
    assert mine.shape == (rows, 192) and mine.is_contiguous()
    torch.testing.assert_close(mine, SGLANGS(None, layer, x, bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", ["one row", "six rows", "bf16", "3-d", "amx"])
def test_everything_else_runs_sglangs_code(case):
    seen = []
    apply = few_rows_as_columns(lambda self, layer, x, bias=None: seen.append(tuple(x.shape)) or "sglang")
    layer = Layer(8, 16, torch.bfloat16 if case == "bf16" else torch.float32)
    x = {"one row": torch.randn(1, 16), "six rows": torch.randn(6, 16), "3-d": torch.randn(1, 3, 16)}.get(
        case, torch.randn(3, 16))
    if case == "bf16":
        x = x.bfloat16()
    if case == "amx":
        layer.use_intel_amx_backend = True
    assert apply(None, layer, x) == "sglang" and seen == [tuple(x.shape)]
    ours = few_rows_as_columns(lambda *a, **k: pytest.fail("SGLang's path taken"))
    assert ours(None, Layer(8, 16), torch.randn(3, 16)).shape == (3, 8)
