"""The CPU servers' linear maps of 2-5 rows (relaygen_sgl.servers.cpu.linear) against SGLang's own,
and the measurement that picks F.linear or W x^T."""

from __future__ import annotations

import pytest
import torch

from relaygen_sgl.servers.cpu.linear import faster_of, few_rows_fastest

unquant = pytest.importorskip("sglang.srt.layers.quantization.unquant")
SGLANGS = unquant.UnquantizedLinearMethod.__dict__["apply"]


class Layer(torch.nn.Module):
    def __init__(self, out: int, inp: int, dtype=torch.float32) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out, inp, generator=torch.Generator().manual_seed(1)).to(dtype),
                                         requires_grad=False)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 8, 9])
@pytest.mark.parametrize("with_bias", [False, True])
def test_same_values_as_sglangs_linear(rows, with_bias):
    layer = Layer(192, 576)
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(192) if with_bias else None
    apply = few_rows_fastest(SGLANGS)
    for _ in range(2):  # the measuring call, then the chosen product
        mine = apply(None, layer, x, bias)
        assert mine.shape == (rows, 192) and mine.is_contiguous()
        torch.testing.assert_close(mine, SGLANGS(None, layer, x, bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", ["one row", "nine rows", "bf16", "3-d", "amx"])
def test_everything_else_runs_sglangs_code(case):
    seen = []
    apply = few_rows_fastest(lambda self, layer, x, bias=None: seen.append(tuple(x.shape)) or "sglang")
    layer = Layer(8, 16, torch.bfloat16 if case == "bf16" else torch.float32)
    x = {"one row": torch.randn(1, 16), "nine rows": torch.randn(9, 16), "3-d": torch.randn(1, 3, 16)}.get(
        case, torch.randn(3, 16))
    if case == "bf16":
        x = x.bfloat16()
    if case == "amx":
        layer.use_intel_amx_backend = True
    assert apply(None, layer, x) == "sglang" and seen == [tuple(x.shape)]  # one call: nothing measured


def test_each_shape_and_row_count_is_measured_once_and_the_faster_product_kept(monkeypatch):
    import relaygen_sgl.servers.cpu.linear as linear

    calls: list[str] = []
    slow_sglang = {"yes": True}

    def sglang(self, layer, x, bias=None):
        calls.append("sglang")
        return torch.nn.functional.linear(x, layer.weight, bias)

    # a clock that makes whichever product the test names the slow one
    now = [0.0]

    def clock():
        now[0] += 1.0
        return now[0]

    real_faster_of = linear.faster_of
    decided: list[bool] = []  # each measurement's answer: is W x^T the faster?

    def rigged(a, b, trials=3, clock=clock):
        def slow_a():
            a()
            now[0] += 5.0 if slow_sglang["yes"] else 0.0

        def slow_b():
            b()
            now[0] += 0.0 if slow_sglang["yes"] else 5.0

        decided.append(real_faster_of(slow_a, slow_b, trials, clock))
        return decided[-1]

    monkeypatch.setattr(linear, "faster_of", rigged)
    apply = few_rows_fastest(sglang)
    layer = Layer(64, 32)
    x3 = torch.randn(3, 32)
    apply(None, layer, x3)
    assert decided == [True]  # F.linear measured slower: W x^T kept
    calls.clear()
    apply(None, layer, x3)
    assert calls == [] and decided == [True]  # decided: no more measuring, and SGLang's product not called
    slow_sglang["yes"] = False
    x2 = torch.randn(2, 32)
    apply(None, layer, x2)
    assert decided == [True, False]  # another row count: measured again, F.linear kept
    calls.clear()
    apply(None, layer, x2)
    assert calls == ["sglang"]


def test_faster_of_interleaves_and_keeps_the_best_of_each():
    order: list[str] = []
    now = [0.0]
    cost = {"a": [9.0, 9.0, 1.0, 9.0], "b": [2.0, 2.0, 2.0, 2.0]}  # a's best (1) beats b's (2)

    def fn(name):
        def run():
            order.append(name)
            now[0] += cost[name].pop(0)
        return run

    def clock():
        return now[0]

    assert faster_of(fn("a"), fn("b"), trials=3, clock=clock) is False
    assert order == ["a", "b", "a", "b", "a", "b", "a", "b"]
