"""SeededSampler on synthetic logits (no server): reproducibility, filters, distribution."""

from __future__ import annotations

import glob
import math
import os
import pickletools
import shutil
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import orjson
import pytest
import torch
from doubles import LARGE, SMALL
from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor

from relaygen_sgl.core.errors import ConfigError, EngineFailed, EngineRejected, EngineUnreachable
from relaygen_sgl.runtime import seeding
from relaygen_sgl.runtime.seeding import (
    SeededSampler,
    SeedSupport,
    processor_str,
    seeded_fields,
    seeding_mode,
    server_supports_seeding,
    uniform,
)

LOGITS5 = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])


def fake_req(position=10, temperature=0.8, top_p=1.0, top_k=1 << 30, min_p=0.0, kv=True):
    """What the processor reads from SGLang's Req: normalized sampling params, ids, KV length."""
    sp = SimpleNamespace(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    origin = list(range(position - 3))
    req = SimpleNamespace(sampling_params=sp, origin_input_ids=origin, output_ids=[5, 6, 7])
    if kv:
        req.kv = SimpleNamespace(kv_committed_len=position)
    return req


def sample(logits, seed=0, **req_kw):
    """The token the processor picks for one row; asserts the row has one finite entry."""
    out = SeededSampler()(logits.clone().view(1, -1), [{"seed": seed, "__req__": fake_req(**req_kw)}])
    finite = torch.isfinite(out[0]).nonzero().view(-1).tolist()
    assert len(finite) == 1 and out[0, finite[0]].item() == 0.0
    return finite[0]


def draws(n=5000, logits=LOGITS5, **req_kw):
    counts = [0] * logits.numel()
    for seed in range(n):
        counts[sample(logits, seed=seed, **req_kw)] += 1
    return counts


def chi2(counts, probs):
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs) if p > 0)


def test_uniform_is_a_pure_function_in_range():
    us = [uniform(s, p) for s in range(50) for p in range(50)]
    assert all(0.0 <= u < 1.0 for u in us)
    assert uniform(3, 17) == uniform(3, 17) == SeededSampler.uniform(3, 17)
    assert len(set(us)) == len(us)
    assert abs(sum(us) / len(us) - 0.5) < 0.02


def test_same_seed_and_position_same_token():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for seed in range(20):
        assert sample(logits, seed=seed, position=33) == sample(logits, seed=seed, position=33)


def test_different_positions_and_seeds_draw_differently():
    logits = torch.zeros(1000)  # flat: any two draws collide with probability 1/1000
    by_position = {sample(logits, seed=1, position=p) for p in range(10, 60)}
    by_seed = {sample(logits, seed=s, position=10) for s in range(50)}
    assert len(by_position) > 40 and len(by_seed) > 40


def test_position_is_the_kv_length_else_origin_plus_output():
    assert SeededSampler._position(fake_req(position=42)) == 42
    assert SeededSampler._position(fake_req(position=42, kv=False)) == 42  # 39 + 3 ids
    logits = torch.zeros(1000)
    assert sample(logits, seed=5, position=42) == sample(logits, seed=5, position=42, kv=False)


def test_distribution_matches_softmax_over_temperature():
    t = 0.7
    probs = torch.softmax(LOGITS5 / t, -1).tolist()
    counts = draws(temperature=t)
    assert chi2(counts, probs) < 18.47  # chi-square, 4 dof, p = 0.001
    assert 0.5 * sum(abs(c / 5000 - p) for c, p in zip(counts, probs)) < 0.02


def test_top_k_keeps_the_k_best_with_renormalized_mass():
    counts = draws(top_k=2, temperature=1.0)
    assert counts[2:] == [0, 0, 0]
    p = torch.softmax(LOGITS5[:2], -1).tolist()
    assert chi2(counts[:2], p) < 10.83  # 1 dof, p = 0.001
    logits = torch.randn(500, generator=torch.Generator().manual_seed(1))
    best = set(torch.topk(logits, 20).indices.tolist())
    assert all(sample(logits, seed=s, top_k=20) in best for s in range(300))


def test_top_k_per_row_in_a_mixed_batch():
    logits = LOGITS5.repeat(2, 1)
    seen = set()
    for s in range(400):
        params = [{"seed": s, "__req__": fake_req(top_k=2, temperature=1.0)},
                  {"seed": s, "__req__": fake_req(top_k=4, temperature=1.0)}]
        out = SeededSampler()(logits.clone(), params)
        a, b = (int(r.argmax()) for r in out)
        assert a < 2 and b < 4
        seen.add(b)
    assert seen == {0, 1, 2, 3}


def test_top_p_drops_ranks_whose_preceding_mass_exceeds_it():
    probs = torch.softmax(LOGITS5, -1)  # 0.563 0.207 0.126 0.076 0.028; mass before: 0 .563 .770 .896 .972
    # SGLang keeps a rank while the mass before it is <= top_p: 0.7 keeps the first two
    counts = draws(top_p=0.7, temperature=1.0)
    assert counts[2:] == [0, 0, 0] and min(counts[:2]) > 0
    assert chi2(counts[:2], (probs[:2] / probs[:2].sum()).tolist()) < 10.83
    counts = draws(n=2000, top_p=0.85, top_k=20, temperature=1.0)
    assert counts[3:] == [0, 0] and min(counts[:3]) > 0


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    probs = torch.softmax(LOGITS5, -1)
    keep = probs >= 0.2 * probs[0]  # 0.563, 0.207, 0.126 (0.076 < 0.113)
    counts = draws(n=2000, min_p=0.2, temperature=1.0)
    assert [c > 0 for c in counts] == keep.tolist()


def test_greedy_and_unseeded_rows_are_left_untouched():
    logits = torch.randn(3, 50)
    params = [
        {"seed": 1, "__req__": fake_req(temperature=1.0, top_k=1)},  # temperature 0 as SGLang stores it
        None,
        {"other": 1, "__req__": fake_req()},
    ]
    out = SeededSampler()(logits.clone(), params)
    assert torch.equal(out, logits)
    assert SeededSampler()(logits.clone(), None).equal(logits)


def test_each_sampled_row_has_exactly_one_finite_entry_and_others_stay():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(2))
    params = [{"seed": i, "__req__": fake_req(position=20 + i, top_k=40, top_p=0.9)} if i % 2 == 0 else None
              for i in range(4)]
    out = SeededSampler()(logits.clone(), params)
    assert torch.isfinite(out).sum(-1).tolist() == [1, 300, 1, 300]
    assert torch.equal(out[1], logits[1]) and torch.equal(out[3], logits[3])
    assert out.dtype == logits.dtype and out.shape == logits.shape


def test_a_row_it_cannot_read_is_left_to_the_server_and_nothing_raises():
    logits = torch.randn(2, 10)
    bad_req = SimpleNamespace(sampling_params=None)
    out = SeededSampler()(logits.clone(), [{"seed": 1, "__req__": bad_req}, {"seed": "x", "__req__": fake_req()}])
    assert torch.equal(out, logits)
    nan_row = torch.full((1, 10), float("nan"))
    out = SeededSampler()(nan_row.clone(), [{"seed": 1, "__req__": fake_req()}])
    assert torch.isnan(out).all()


def test_masked_tokens_are_never_chosen():
    logits = torch.zeros(100)
    logits[::2] = float("-inf")  # as a grammar mask or logit_bias leaves them
    assert all(sample(logits, seed=s) % 2 == 1 for s in range(200))


def test_serialized_processor_loads_from_source_without_relaygen():
    """The server builds the class where relaygen_sgl may not be importable."""
    blob = processor_str()
    code = textwrap.dedent(
        """
        import sys, types
        sys.modules["relaygen_sgl"] = None  # importing it now fails
        import torch
        from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor
        p = CustomLogitProcessor.from_str(sys.stdin.read())
        sp = types.SimpleNamespace(temperature=0.8, top_p=0.95, top_k=20, min_p=0.0)
        picks = []
        for seed in range(30):
            req = types.SimpleNamespace(sampling_params=sp, origin_input_ids=[], output_ids=[],
                                        kv=types.SimpleNamespace(kv_committed_len=50))
            logits = torch.arange(100, dtype=torch.float32).view(1, -1) / 10
            picks.append(int(p(logits, [{"seed": seed, "__req__": req}])[0].argmax()))
        print(type(p).__module__, isinstance(p, CustomLogitProcessor), picks)
        """
    )
    run = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    logits = torch.arange(100, dtype=torch.float32) / 10
    here = [sample(logits, seed=s, position=50, temperature=0.8, top_p=0.95, top_k=20) for s in range(30)]
    assert run.stdout.strip().split(maxsplit=2) == ["relaygen_seeded_sampler", "True", str(here)]


def test_seeded_fields_shape():
    extra, add = seeded_fields(7, {"temperature": 0.8, "top_p": 0.95, "custom_params": {"keep": 1}})
    assert extra == {"custom_logit_processor": processor_str()}
    assert add == {"custom_params": {"keep": 1, "seed": 7}}
    assert seeded_fields(-1, {"temperature": 1.0})[1]["custom_params"]["seed"] == (1 << 64) - 1
    assert seeded_fields(7, {"temperature": 0.0}) == ({}, {})
    assert seeded_fields(7, {"temperature": 0.7, "top_k": 1}) == ({}, {})
    with pytest.raises(TypeError):
        seeded_fields(True, {})


def test_server_supports_seeding():
    info = {"enable_custom_logit_processor": True, "enable_deterministic_inference": False,
            "speculative_algorithm": None, "enable_watermark": False}
    assert server_supports_seeding(info)
    assert not server_supports_seeding(info | {"enable_custom_logit_processor": False})
    assert not server_supports_seeding(info | {"speculative_algorithm": "EAGLE3"})
    assert not server_supports_seeding({"version": "0.5.23"})
    assert not server_supports_seeding(None)  # type: ignore[arg-type]


def test_a_deterministic_server_seeds_with_sglangs_own_sampling_seed():
    info = {"enable_custom_logit_processor": True, "enable_deterministic_inference": False,
            "speculative_algorithm": None}
    assert seeding_mode(info) == "processor"
    assert seeding_mode(info | {"enable_deterministic_inference": True}) == "sglang"
    assert seeding_mode(info | {"enable_custom_logit_processor": False}) is None

    sampling = {"temperature": 0.6, "sampling_seed": 3}
    # no processor shipped: the request's sampling_seed does it, and the run still reproduces
    det = Engine({"enable_deterministic_inference": True, "enable_custom_logit_processor": False})
    assert SeedSupport().fields(det, 3, sampling) == ({}, {}, True)
    assert det.calls == ["server_info"]  # nothing to probe: SGLang samples from the seed itself
    extra, add, ok = SeedSupport().fields(Engine(info), 3, sampling)
    assert extra == {"custom_logit_processor": processor_str()} and ok
    assert SeedSupport().fields(Engine({}), 3, sampling) == ({}, {}, False)


PROCESSOR_INFO = {"enable_custom_logit_processor": True, "enable_deterministic_inference": False,
                  "speculative_algorithm": None, "enable_watermark": False}
DETERMINISTIC_INFO = {"enable_custom_logit_processor": False, "enable_deterministic_inference": True}


class Engine:
    """An EngineClient stand-in that answers as an SGLang server with `info` as its ServerArgs:
    generate() loads a request's custom_logit_processor with SGLang's own
    CustomLogitProcessor.from_str (when the flag is on and `runs`), applies it to a model row,
    samples, and reports the sampled token's logprob from log_softmax(row / T), as
    layers/sampler.py does. `fail` holds what each call raises in turn (None: answers)."""

    def __init__(self, info, fail=(), runs=True, url="http://e.test:1"):
        self.info, self.failures, self.runs, self.url = info, list(fail), runs, url
        self.calls = []

    def _call(self, what):
        self.calls.append(what)
        if self.failures and (e := self.failures.pop(0)) is not None:
            raise e

    def server_info(self):
        self._call("server_info")
        return dict(self.info)

    def generate(self, ids, sampling, *, extra=None, **_):
        self._call("generate")
        t = float(sampling["temperature"])
        row = torch.randn(1, 300) * 3
        clp = (extra or {}).get("custom_logit_processor")
        if clp and self.info.get("enable_custom_logit_processor") and self.runs:
            params = {**sampling.get("custom_params", {}), "__req__": fake_req(position=len(ids), temperature=t)}
            row = CustomLogitProcessor.from_str(clp)(row, [params])
        logprobs = torch.log_softmax(row / t, -1)
        token = int(torch.multinomial(logprobs.exp(), 1))
        return SimpleNamespace(output_ids=[token], meta={"output_token_logprobs": [[float(logprobs[0, token]), token,
                                                                                      None]]})


def test_uniform_bits_are_not_position_aligned():
    # the hash must not leave consecutive positions correlated (a bad mix would)
    us = [uniform(9, p) for p in range(4000)]
    pairs = sum((a - 0.5) * (b - 0.5) for a, b in zip(us, us[1:])) / (len(us) - 1)
    assert abs(pairs / (1 / 12)) < 0.06
    assert math.isclose(sum(us) / len(us), 0.5, abs_tol=0.02)


def chi2_crit(df, z=3.09):
    """Wilson-Hilferty: the chi-square value exceeded with probability ~0.001."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (0.8, 20, 0.95, 0.0), (1.0, 1 << 30, 0.9, 0.0), (0.7, 1 << 30, 1.0, 0.05), (1.5, 50, 0.8, 0.02),
])
def test_matches_sglangs_own_filtered_distribution(temperature, top_k, top_p, min_p):
    """Against the CPU servers' sampler itself (pytorch backend): same support, same weights."""
    from sglang.srt.layers.sampler import top_k_top_p_min_p_sampling_from_probs_torch as sglang_filter

    logits = torch.randn(2000, generator=torch.Generator().manual_seed(3)) * 2.5
    probs = torch.softmax(logits / temperature, -1).view(1, -1)
    _, fprobs, fidx, _ = sglang_filter(probs.clone(), torch.tensor([top_k]), torch.tensor([top_p]),
                                       torch.tensor([min_p]), min_p > 0, None, torch.tensor([0]),
                                       return_filtered_probs=True)
    q = torch.zeros(2000, dtype=torch.float64)
    q[fidx[0].long()] = fprobs[0].double()
    q /= q.sum()
    n = 4000
    counts = torch.zeros(2000, dtype=torch.float64)
    for seed in range(n):
        counts[sample(logits, seed=seed, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)] += 1
    assert (counts[q == 0] == 0).all(), "picked a token SGLang's filter drops"
    big = q * n >= 5  # chi-square over the well-filled cells, the rest pooled into one
    exp = torch.cat([q[big] * n, (q[~big] * n).sum().view(1)])
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    assert stat < chi2_crit(int(keep.sum()) - 1), (stat, int(keep.sum()))


def test_top_p_beyond_the_first_1024_ranks_falls_back_to_the_full_sort():
    logits = -torch.arange(3000, dtype=torch.float32) * 1e-4  # nearly flat, strictly decreasing
    probs = torch.softmax(logits.double(), -1)
    allowed = int(((torch.cumsum(probs, -1) - probs) <= 0.5).sum())  # ranks kept by top_p 0.5: ~1400
    picks = [sample(logits, seed=s, temperature=1.0, top_p=0.5) for s in range(400)]
    assert max(picks) < allowed and max(picks) >= 1024


def test_a_rows_token_does_not_depend_on_the_rest_of_the_batch():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 3000, generator=gen) * 2
    kws = [dict(top_k=20, top_p=0.95), dict(top_p=0.9), dict(top_p=0.99), dict(), dict(top_k=20, top_p=0.5)]
    logits[2] = -torch.arange(3000, dtype=torch.float32) * 1e-4  # a row that needs the full sort
    for seed in range(20):
        params = [{"seed": seed, "__req__": fake_req(position=30 + i, **kw)} for i, kw in enumerate(kws)]
        batch = SeededSampler()(logits.clone(), params).argmax(-1).tolist()
        alone = [int(SeededSampler()(logits[i:i + 1].clone(), [params[i]]).argmax()) for i in range(5)]
        assert batch == alone


# ---------------------------------------------------------------- the step never waits for the device
STEP_KWS = [dict(temperature=0.6, top_k=20, top_p=0.95), dict(temperature=0.6, top_p=0.95), dict(temperature=1.0),
            dict(temperature=0.7, min_p=0.05), dict(temperature=0.6, top_k=20, top_p=0.95),
            dict(temperature=1.3, top_k=50, top_p=0.8, min_p=0.02), None, dict(temperature=0.8, top_p=0.5)]


def step_cases():
    """Fixed batches mixing every candidate group (top_k, top_p alone, neither, min_p), an
    unseeded row and a nearly flat row whose top_p mass lies beyond rank 1024."""
    gen = torch.Generator().manual_seed(21)
    for b in range(6):
        logits = torch.randn(len(STEP_KWS), 3000, generator=gen) * (1 + b)
        logits[7] = -torch.arange(3000, dtype=torch.float32) * 1e-4 + torch.rand(3000, generator=gen) * 1e-5
        for seed in (0, 1, 12345):
            params = [None if kw is None else {"seed": seed, "__req__": fake_req(position=40 + 7 * b + i, **kw)}
                      for i, kw in enumerate(STEP_KWS)]
            yield logits, params


# The tokens the implementation before the sync-free step (commit 760c42b: Python lists turned
# into device tensors, bool() and .tolist() on device values) picked for step_cases(), in order.
BEFORE = [[2458, 922, 897, 57, 761, 1248, 1289, 11], [1417, 2839, 1471, 571, 2217, 834, 1289, 1075],
          [2944, 1894, 657, 20, 410, 2963, 1289, 798], [2627, 970, 2042, 158, 823, 225, 991, 126],
          [1167, 2943, 1662, 158, 2836, 854, 991, 367], [2732, 970, 1815, 1324, 2185, 1872, 991, 417],
          [863, 23, 908, 2812, 1287, 1408, 2011, 1182], [863, 891, 2740, 1238, 1287, 1950, 2011, 275],
          [863, 399, 407, 149, 1287, 1872, 2011, 655], [2895, 2890, 2336, 599, 2659, 2546, 2021, 998],
          [2895, 2890, 1109, 2805, 1235, 2345, 2021, 119], [2895, 2890, 1158, 599, 2659, 473, 2021, 437],
          [1303, 2568, 115, 1305, 55, 229, 1312, 61], [1294, 2568, 813, 1305, 2334, 229, 1312, 1323],
          [1294, 2568, 1802, 1305, 2805, 229, 1312, 923], [2457, 789, 1295, 2649, 1425, 1815, 1598, 230],
          [2457, 789, 626, 2649, 1760, 1815, 1598, 1275], [2457, 789, 626, 2649, 1425, 1815, 1598, 184]]


def test_the_step_reads_nothing_back_from_the_device_and_picks_the_same_tokens_as_before(monkeypatch):
    """Each way a step could make the host wait for the device raises while the processor
    runs; the processor swallows errors (it must never take the scheduler down), so the test
    checks afterwards that every seeded row was sampled, and by the same tokens as before."""
    outs = []

    def forbid(name):
        def boom(*a, **k):
            raise AssertionError(f"{name} inside a step")
        return boom

    real_tensor = torch.tensor

    def host_only_tensor(*a, **k):
        if k.get("device") is not None and torch.device(k["device"]).type != "cpu":
            raise AssertionError("torch.tensor(list, device=...) inside a step")
        return real_tensor(*a, **k)

    cases = list(step_cases())
    with monkeypatch.context() as m:
        for name in ("item", "__bool__", "tolist", "cpu", "numpy", "__int__", "__float__", "__index__", "nonzero"):
            m.setattr(torch.Tensor, name, forbid(f"Tensor.{name}"))
        m.setattr(torch, "tensor", host_only_tensor)
        m.setattr(torch, "nonzero", forbid("torch.nonzero"))
        for logits, params in cases:
            outs.append(SeededSampler()(logits.clone(), params))
    for out, (_, params) in zip(outs, cases):
        finite = torch.isfinite(out).sum(-1).tolist()
        assert finite == [3000 if p is None else 1 for p in params]  # sampled, not left to the server
    assert [o.argmax(-1).tolist() for o in outs] == BEFORE


# ---------------------------------------------------------------- the processor on the wire
def test_the_processor_is_one_call_to_eval_no_code_object():
    """What SGLang unpickles (dill.loads in custom_logit_processor.py): builtins.eval of a
    string, so nothing in it depends on the client's Python version."""
    blob = bytes.fromhex(orjson.loads(processor_str())["callable"])
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(blob)]
    strings = [arg for name, arg in ops if isinstance(arg, str)]
    assert strings[:2] == ["builtins", "eval"] and len(strings) == 3
    assert {name for name, _ in ops} <= {"PROTO", "FRAME", "SHORT_BINUNICODE", "BINUNICODE", "MEMOIZE",
                                         "STACK_GLOBAL", "TUPLE1", "REDUCE", "STOP"}
    assert "class SeededSampler(CustomLogitProcessor):" in strings[2] and "dill" not in strings[2]


def other_pythons():
    """CPython interpreters of other minor versions on this machine (PATH, pyenv), >= 3.10."""
    found = {}
    candidates = [shutil.which(f"python3.{m}") for m in range(10, 16)]
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(os.path.join(root, "versions", "3.*", "bin", "python3")))
    for exe in filter(None, candidates):
        try:
            v = subprocess.run([exe, "-c", "import sys; print(sys.version_info[1])"], capture_output=True, text=True,
                               timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if v.isdigit() and int(v) >= 10 and int(v) != sys.version_info[1]:
            found.setdefault(int(v), exe)
    return sorted(found.items())


STUB_SGLANG = '''
import json, pickle
from abc import ABC, abstractmethod
class CustomLogitProcessor(ABC):
    """sglang/srt/sampling/custom_logit_processor.py's base and from_str (pickle for dill.loads:
    on a plain pickle they do the same)."""
    @abstractmethod
    def __call__(self, logits, custom_param_list=None): ...
    @classmethod
    def from_str(cls, json_str):
        return pickle.loads(bytes.fromhex(json.loads(json_str)["callable"]))()
'''


def test_the_processor_loads_on_other_python_minor_versions(tmp_path):
    """A server on another Python minor version (SGLang's images) builds the same class. The
    dill pickle of code objects this replaced loaded on 3.12 and 3.13 and segfaulted at its first
    call, and raised SystemError (unknown opcode) on 3.10. No torch there: the class is built and
    its pure-Python hash compared."""
    pythons = other_pythons()
    if not pythons:
        pytest.skip("no CPython of another minor version on this machine")
    pkg = tmp_path / "sglang" / "srt" / "sampling"
    pkg.mkdir(parents=True)
    for d in (tmp_path / "sglang", tmp_path / "sglang" / "srt", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "custom_logit_processor.py").write_text(STUB_SGLANG)
    code = ("import sys\nfrom sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor as C\n"
            "p = C.from_str(sys.stdin.read())\nprint(type(p).__name__, isinstance(p, C), p.uniform(3, 17))")
    for minor, exe in pythons:
        run = subprocess.run([exe, "-c", code], input=processor_str(), capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(tmp_path)})
        assert run.returncode == 0, (minor, run.stderr[-2000:])
        assert run.stdout.split() == ["SeededSampler", "True", repr(uniform(3, 17))], minor


def test_a_server_that_cannot_build_it_gets_a_processor_that_leaves_logits_alone():
    ns = {"SOURCE": "class SeededSampler(CustomLogitProcessor):\n    def __call__(self, logits, custom_param_list="}
    exec(seeding._LOADER, ns)
    logits = torch.randn(2, 30)
    assert torch.equal(ns["SeededSampler"]()(logits.clone(), [{"seed": 1, "__req__": fake_req()}, None]), logits)


@pytest.fixture
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can: a race shows at once
    yield
    sys.setswitchinterval(old)


def test_threads_building_seeded_requests_print_nothing_and_leave_stdout(monkeypatch, capfd, fast_switching):
    """dill.dumps(recurse=True) swapped sys.stdout around a `dis` per function: threads that
    built the first seeded requests at once printed bytecode and left sys.stdout swapped."""
    stdout = sys.stdout
    for _ in range(4):
        monkeypatch.setattr(seeding, "_processor", None)  # each round builds it anew
        barrier = threading.Barrier(16)

        def build(seed):
            barrier.wait()
            return seeded_fields(seed, {"temperature": 0.7})

        with ThreadPoolExecutor(16) as pool:
            built = list(pool.map(build, range(16)))
        assert sys.stdout is stdout
        assert len({extra["custom_logit_processor"] for extra, _ in built}) == 1
    print("still printing")
    assert capfd.readouterr().out == "still printing\n"


# ---------------------------------------------------------------- which servers seed
def test_one_real_seeded_request_decides_and_is_sent_once():
    e = Engine(PROCESSOR_INFO)
    seeds = SeedSupport()
    for _ in range(3):
        extra, add, ok = seeds.fields(e, 3, {"temperature": 0.6})
        assert ok and extra == {"custom_logit_processor": processor_str()} and add["custom_params"]["seed"] == 3
    assert e.calls == ["server_info", "generate"]


@pytest.mark.parametrize("engine", [Engine(PROCESSOR_INFO, runs=False),
                                    Engine(PROCESSOR_INFO, fail=[None, EngineRejected("HTTP 400", status=400)])],
                         ids=["processor-not-run", "request-refused"])
def test_a_server_that_does_not_seed_is_off_for_good(engine):
    """A router that drops custom_logit_processor (the token comes back with its model logprob),
    a server that refuses the field: no seeding there, and it is not asked again."""
    seeds = SeedSupport(retry_s=0.0)
    for _ in range(3):
        assert seeds.fields(engine, 3, {"temperature": 0.6}) == ({}, {}, False)
    assert engine.calls == ["server_info", "generate"]


@pytest.mark.parametrize("failure", [[EngineUnreachable("connection refused")],
                                     [EngineFailed("HTTP 503", status=503)],
                                     [None, EngineFailed("HTTP 502", status=502)],
                                     [None, EngineUnreachable("connection reset")]],
                         ids=["info-unreachable", "info-5xx", "probe-5xx", "probe-reset"])
def test_a_transient_failure_is_asked_again_after_retry_s(failure):
    """A failed /server_info or probe leaves the request unseeded and decides nothing: the
    first request after retry_s asks again (it used to turn seeding off for the process)."""
    now = [100.0]
    e = Engine(PROCESSOR_INFO, fail=failure)
    seeds = SeedSupport(retry_s=5.0, clock=lambda: now[0])
    assert seeds.fields(e, 3, {"temperature": 0.6}) == ({}, {}, False)
    asked = len(e.calls)
    now[0] += 4.0
    assert seeds.fields(e, 3, {"temperature": 0.6}) == ({}, {}, False)
    assert len(e.calls) == asked  # not within retry_s
    now[0] += 1.5
    assert seeds.fields(e, 3, {"temperature": 0.6})[2] is True
    assert e.calls[asked:][-1] == "generate" and e.calls.count("generate") == 1 + (len(failure) == 2)


def test_concurrent_first_requests_ask_once():
    e = Engine(PROCESSOR_INFO)
    seeds = SeedSupport()
    barrier = threading.Barrier(16)

    def first(seed):
        barrier.wait()
        return seeds.fields(e, seed, {"temperature": 0.6})[2]

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(first, range(16)))
    assert e.calls == ["server_info", "generate"]


# ---------------------------------------------------------------- min_p on a deterministic server
@pytest.mark.parametrize("seed", [None, 3])
def test_min_p_is_refused_in_one_line_on_a_deterministic_server(seed):
    """SGLang's sampler asserts `sampling_seed is None` under min_p, and a deterministic server
    gives every request a sampling_seed: the assertion would stop the server."""
    det, plain = Engine(DETERMINISTIC_INFO, url="http://det.test:1"), Engine(PROCESSOR_INFO)
    seeds = SeedSupport()
    with pytest.raises(ConfigError) as err:
        seeds.fields(det, seed, {"temperature": 0.6, "min_p": 0.05})
    message = str(err.value)
    assert "\n" not in message and message.startswith("min_p=0.05 cannot be sent to http://det.test:1")
    assert "--enable-deterministic-inference" in message
    assert "generate" not in det.calls
    assert seeds.fields(det, seed, {"temperature": 0.6, "min_p": 0.0}) == ({}, {}, True)
    assert seeds.fields(plain, seed, {"temperature": 0.6, "min_p": 0.05})[2] is True
    with pytest.raises(ConfigError):
        seeds.check([plain, det], {"min_p": 0.1})
    assert det.calls == ["server_info"] and plain.calls.count("server_info") == 1


def test_min_p_on_unseeded_requests_costs_no_server_info_unless_set():
    e = Engine(DETERMINISTIC_INFO)
    assert SeedSupport().fields(e, None, {"temperature": 0.6}) == ({}, {}, True)
    assert e.calls == []


# ---------------------------------------------------------------- the CLI and the library, seeded at once
FILLER = "Let me think. Therefore it is 5. Now, check: 2 + 3 = 5. "


@pytest.fixture
def seeding_fake(fake, monkeypatch):
    """The SGLang double as a server started with --enable-custom-logit-processor: /server_info
    says so, a request that carries a processor has it loaded with SGLang's own
    CustomLogitProcessor.from_str and run on a row (one finite entry must come back), and its
    tokens' logprobs are 0, as SGLang reports a seeded row's."""
    handle = fake._handle
    loaded = []

    def handle_seeded(request):
        resp = handle(request)
        if request.url.path == "/server_info" and resp.status_code == 200:
            return httpx.Response(200, json={**resp.json(), **PROCESSOR_INFO})
        body = orjson.loads(request.content) if request.url.path == "/generate" else {}
        if body.get("custom_logit_processor") and resp.status_code == 200:
            sp = body["sampling_params"]
            top_k = sp.get("top_k") if sp.get("top_k") not in (None, -1) else 1 << 30
            req = fake_req(temperature=sp["temperature"], top_p=sp.get("top_p", 1.0), top_k=top_k)
            row = CustomLogitProcessor.from_str(body["custom_logit_processor"])(
                torch.randn(1, 64), [{**sp["custom_params"], "__req__": req}])
            assert int(torch.isfinite(row).sum()) == 1
            loaded.append(body["custom_logit_processor"])
            if body.get("return_logprob") and not body.get("stream"):
                out = resp.json()
                out["meta_info"]["output_token_logprobs"] = [[0.0, t, None] for t in out["output_ids"]]
                return httpx.Response(200, json=out)
        return resp

    monkeypatch.setattr(fake, "_handle", handle_seeded)
    fake.loaded = loaded
    for url in (LARGE, SMALL):
        fake.add_host(url, [])
    return fake


def open_seeding_relay(fake):
    from relaygen_sgl.api import Relay
    from relaygen_sgl.client.http import ClientConfig

    relay = Relay(preset="cpu-tiny", large=LARGE, small=SMALL, family="qwen3",
                  client=ClientConfig(retries=0, backoff_s=0), transport=fake.transport)
    tape = relay.tokenizer.encode(FILLER * 40)
    for host in fake.hosts.values():
        host.tape = list(tape)
    return relay


def test_seeded_batch_at_concurrency_16_writes_nothing_to_stdout(seeding_fake, tmp_path, monkeypatch, capfd,
                                                                  fast_switching):
    """`relaygen batch relay P.jsonl -o O.jsonl --seed 0 --concurrency 16` (16 prompts), five
    times: batch writes its records to O.jsonl and its summary to stderr, so stdout stays empty
    (it got hundreds of lines of bytecode in two runs of three)."""
    from relaygen_sgl.cli import commands
    from relaygen_sgl.cli.main import build_parser

    monkeypatch.setattr(commands, "open_relay", lambda args: open_seeding_relay(seeding_fake))
    prompts = tmp_path / "P.jsonl"
    prompts.write_text("".join(orjson.dumps({"id": f"p{i}", "question": f"What is {i} + 3?"}).decode() + "\n"
                               for i in range(16)))
    stdout = sys.stdout
    for run in range(5):
        monkeypatch.setattr(seeding, "_processor", None)  # each run builds the processor, as a new process would
        out = tmp_path / f"O{run}.jsonl"
        args = build_parser().parse_args(["batch", "relay", str(prompts), "-o", str(out), "--seed", "0",
                                          "--concurrency", "16", "--max-tokens", "16"])
        assert args.func(args) == 0
        captured = capfd.readouterr()
        assert captured.out == "", captured.out[:2000]
        assert sys.stdout is stdout
        records = [orjson.loads(line) for line in out.read_bytes().splitlines()]
        assert len(records) == 16 and all(r["status"] == "ok" for r in records)
        assert all(r["seed"] == {"value": 0, "reproducible": True} for r in records), records[0]
    assert seeding_fake.loaded and len(set(seeding_fake.loaded)) == 1


def test_a_library_process_prints_normally_after_16_concurrent_seeded_relays(seeding_fake, monkeypatch, capfd,
                                                                            fast_switching):
    monkeypatch.setattr(seeding, "_processor", None)
    stdout = sys.stdout
    relay = open_seeding_relay(seeding_fake)
    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: relay.run(f"What is {i} + 3?", "relay", seed=i, max_tokens=16),
                                    range(16)))
    finally:
        relay.close()
    assert all(r.extra["seed"]["reproducible"] for r in results) and seeding_fake.loaded
    assert sys.stdout is stdout
    print("printed after the relays")
    assert capfd.readouterr().out == "printed after the relays\n"
