"""Seeded sampling that reproduces on any SGLang 0.5.23 server, without deterministic mode.

SGLang reads `sampling_params.sampling_seed` only under --enable-deterministic-inference,
which the CPU servers cannot run. Instead every seeded request carries SeededSampler, a
custom logit processor (server flag --enable-custom-logit-processor) that samples the next
token itself and hands the server's sampler logits with one finite entry, so the server's
own RNG has no choice left.

Where it runs (sglang/srt, 0.5.23): model_runner.py:2103 sample() -> _preprocess_logits
(2075) applies penalties, the grammar mask and logit_bias (sampling_batch_info.py:443),
then Sampler.forward (layers/sampler.py:148) -> _preprocess_logits (sampler.py:139) ->
apply_custom_logit_processor (sampler.py:1019); only after that the sampler divides by the
temperature (sampler.py:275) and applies top_k / top_p / min_p to the softmax
(top_k_top_p_min_p_sampling_from_probs_torch, sampler.py:785). So the processor gets
biased logits NOT yet divided by the temperature, and does all of that itself, with the
request's own server-normalized SamplingParams (temperature 0 arrives as top_k=1,
sampling_params.py:247). Output logprobs of a seeded request come from the returned
logits (0 for the chosen token, -inf elsewhere); input logprobs are unaffected.

The draw: u = hash(seed, position) in [0, 1) (splitmix64 on Python ints, no RNG state),
where position is the absolute index of the token being sampled in the request's
sequence. The token is picked by inverse CDF over the filtered distribution. Same seed
and same position give the same u on either server, whether the prefix came in one
request or was resent as input_ids by the relay, cached or not.
"""

from __future__ import annotations

import builtins
import functools
import json
import types
from typing import Any

import dill
from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor

__all__ = ["SeededSampler", "processor_str", "seeded_fields", "server_supports_seeding", "uniform"]

_MASK64 = (1 << 64) - 1


class SeededSampler(CustomLogitProcessor):
    """Samples each seeded row as SGLang's sampler would (softmax(logits / T), top_k,
    top_p, min_p), with a counter-based uniform from (seed, position), and returns the
    row as -inf everywhere but the chosen token (0.0). Rows without a seed, greedy rows
    (top_k <= 1, which is how SGLang stores temperature 0) and rows it cannot read are
    left as they are. It must never raise: it runs inside the server's scheduler.

    Every method is self-contained (imports inside, no module globals): to_str() ships
    copies of these functions by value, so the server needs sglang and torch, not
    relaygen_sgl."""

    def __call__(self, logits, custom_param_list=None):
        if not custom_param_list:
            return logits
        rows, temps, top_ps, top_ks, min_ps, us = [], [], [], [], [], []
        for i, params in enumerate(custom_param_list):
            spec = self._row_spec(params)
            if spec is not None:
                rows.append(i)
                temps.append(spec[0])
                top_ps.append(spec[1])
                top_ks.append(spec[2])
                min_ps.append(spec[3])
                us.append(spec[4])
        if rows:
            try:
                self._sample_rows(logits, rows, temps, top_ps, top_ks, min_ps, us)
            except Exception as e:  # never take the scheduler down; the server samples then
                import logging

                logging.getLogger("relaygen_sgl.runtime.seeding").warning("SeededSampler left %d rows unseeded: %r",
                                                                  len(rows), e)
                return logits
        return logits

    @staticmethod
    def _mix64(x):
        """splitmix64's finalizer on a 64-bit Python int."""
        m = (1 << 64) - 1
        x = (x + 0x9E3779B97F4A7C15) & m
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
        return x ^ (x >> 31)

    @classmethod
    def uniform(cls, seed, position):
        """A uniform in [0, 1) with 53 random bits from (seed, position) alone."""
        m = (1 << 64) - 1
        x = cls._mix64(cls._mix64(int(seed) & m) ^ (int(position) & m))
        return (x >> 11) * (1.0 / (1 << 53))

    @classmethod
    def _position(cls, req):
        """The absolute index of the token being sampled: kv_committed_len, set when the batch
        is scheduled (mem_cache/allocation.py:485 extend, :686 decode), counts every token fed,
        the cached prefix included. origin + output is only the fallback: under the overlap
        scheduler it lags by one on most decode steps (results land after the next launch)."""
        kv = getattr(req, "kv", None)
        n = getattr(kv, "kv_committed_len", None)
        if isinstance(n, int) and n > 0:
            return n
        return len(req.origin_input_ids) + len(req.output_ids)

    @classmethod
    def _row_spec(cls, params):
        """(temperature, top_p, top_k, min_p, u) for a row this processor samples, else None."""
        try:
            if not isinstance(params, dict) or "seed" not in params:
                return None
            seed = params["seed"]
            if isinstance(seed, bool) or not isinstance(seed, int):
                return None
            req = params.get("__req__")
            if req is None:
                return None
            sp = req.sampling_params
            temp, top_k = float(sp.temperature), int(sp.top_k)
            if top_k <= 1 or temp <= 0.0:
                return None  # greedy: the server's argmax stays in charge
            return (temp, float(sp.top_p), top_k, float(sp.min_p or 0.0),
                    cls.uniform(seed, cls._position(req)))
        except Exception:
            return None

    @classmethod
    def _sample_rows(cls, logits, rows, temps, top_ps, top_ks, min_ps, us):
        """Writes the one-finite-entry rows into `logits`. Rows are grouped by how their
        candidates are found, decided from each row's own parameters and values, so a row
        samples the same token whatever else is in the batch: ("k", k) the top k by
        torch.topk; "all" (no top_k, no top_p) the vocabulary unsorted, as no filter needs
        an order; "p" (top_p alone) the top 1024 when the mass before rank 1024 already
        exceeds top_p for that row (exact then), else the full sort."""
        import torch

        dev = logits.device
        vocab = logits.shape[-1]
        idx = torch.tensor(rows, dtype=torch.long, device=dev)
        # softmax(logits / T) = exp(z - lse): z and lse over the vocabulary in float32, the
        # candidates' probabilities in float64; ranking z ranks the probabilities
        z = logits.index_select(0, idx).float() / torch.tensor(temps, device=dev).view(-1, 1)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        groups = {}
        for j in range(len(rows)):
            key = ("k", top_ks[j]) if top_ks[j] < vocab else ("all" if top_ps[j] >= 1.0 else "p")
            groups.setdefault(key, []).append(j)
        token = torch.empty((len(rows), 1), dtype=torch.long, device=dev)
        for key, js in groups.items():
            sel = torch.tensor(js, device=dev)
            zg, lg = (z, lse) if len(js) == len(rows) else (z.index_select(0, sel), lse.index_select(0, sel))
            if key[0] == "k":
                zv, order = torch.topk(zg, k=key[1], dim=-1, sorted=True)
            elif key == "all":
                zv, order = zg, torch.arange(vocab, device=dev).expand(len(js), -1)
            else:
                zv, order = torch.topk(zg, k=min(1024, vocab), dim=-1, sorted=True)
            vals = torch.exp(zv.double() - lg.double())
            if key == "p":
                enough = vals.sum(-1) > torch.tensor([top_ps[j] for j in js], dtype=torch.float64, device=dev)
                if not bool(enough.all()):
                    for g in torch.nonzero(~enough).view(-1).tolist():  # these rows need the full sort
                        zs, os_ = zg[g:g + 1].sort(dim=-1, descending=True)
                        vs = torch.exp(zs.double() - lg[g:g + 1].double())
                        token[js[g]] = cls._pick(vs, os_, [top_ps[js[g]]], [min_ps[js[g]]], [us[js[g]]])
                    keep_rows = torch.nonzero(enough).view(-1)
                    js = [js[g] for g in keep_rows.tolist()]
                    if not js:
                        continue
                    vals, order = vals.index_select(0, keep_rows), order.index_select(0, keep_rows)
            token[js] = cls._pick(vals, order, [top_ps[j] for j in js], [min_ps[j] for j in js],
                                  [us[j] for j in js])
        out = torch.full((len(rows), vocab), float("-inf"), dtype=logits.dtype, device=dev)
        out.scatter_(1, token, 0.0)
        bad = ~torch.isfinite(lse.view(-1))  # an all -inf / NaN row stays the server's
        if bool(bad.any()):
            out[bad] = logits.index_select(0, idx)[bad]
        logits.index_copy_(0, idx, out)

    @staticmethod
    def _pick(vals, order, top_ps, min_ps, us):
        """Inverse CDF over candidates `vals` (probabilities; in descending order whenever a
        top_p applies) with the sampler's filters: a rank is dropped when the mass before it
        exceeds top_p (top_p >= 1: no filter) or its probability is below min_p times the top one."""
        import torch

        dev, n = vals.device, vals.shape[-1]
        f64 = dict(dtype=torch.float64, device=dev)
        p = torch.tensor([tp if tp < 1.0 else float("inf") for tp in top_ps], **f64).view(-1, 1)
        keep = (torch.cumsum(vals, dim=-1) - vals) <= p
        keep &= vals >= vals.amax(dim=-1, keepdim=True) * torch.tensor(min_ps, **f64).view(-1, 1)
        cdf = torch.cumsum(torch.where(keep, vals, torch.zeros_like(vals)), dim=-1)
        target = torch.tensor(us, **f64).view(-1, 1) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, target, right=True).clamp_(max=n - 1)
        # never a zero-weight rank (rounding at the top end): step back to the last kept one
        ranks = torch.arange(n, device=dev).view(1, -1)
        pick = torch.minimum(pick, (keep * ranks).amax(dim=-1, keepdim=True))
        return order.gather(1, pick)

    @classmethod
    def to_str(cls) -> str:
        """The request's `custom_logit_processor`: this class pickled BY VALUE (see _detached)."""
        return json.dumps({"callable": dill.dumps(_detached(cls), recurse=True).hex()})


def _detached(cls: type) -> type:
    """A copy of `cls` that dill pickles by value: dill pickles a class or function by
    reference (module + name, imported again when loaded) whenever its module is importable
    here, which relaygen_sgl.runtime.seeding is; the copy claims module __main__, which dill never
    pickles by reference, and its functions get fresh globals holding only the builtins.
    Its base class (sglang's CustomLogitProcessor) still goes by reference: the server has it."""
    glob: dict[str, Any] = {"__builtins__": builtins, "__name__": "__main__"}

    def copy(f: types.FunctionType) -> types.FunctionType:
        g = types.FunctionType(f.__code__, glob, f.__name__, f.__defaults__, f.__closure__)
        g.__qualname__, g.__module__, g.__doc__ = f.__qualname__, "__main__", f.__doc__
        return g

    body: dict[str, Any] = {"__module__": "__main__", "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
    for name, val in vars(cls).items():
        if name in ("__dict__", "__weakref__", "__module__", "__qualname__", "__doc__",
                    "_abc_impl", "__abstractmethods__", "to_str"):
            continue
        if isinstance(val, staticmethod):
            body[name] = staticmethod(copy(val.__func__))
        elif isinstance(val, classmethod):
            body[name] = classmethod(copy(val.__func__))
        elif isinstance(val, types.FunctionType):
            body[name] = copy(val)
        else:
            body[name] = val
    return type(cls)(cls.__name__, cls.__bases__, body)


@functools.cache
def processor_str() -> str:
    """SeededSampler.to_str(), made once per process (SGLang caches the loaded class per string)."""
    return SeededSampler.to_str()


def uniform(seed: int, position: int) -> float:
    """The uniform SeededSampler draws for `seed` at absolute token index `position`."""
    return SeededSampler.uniform(seed, position)


def seeded_fields(seed: int, sampling: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a seeded /generate request adds: (extra, sampling_additions).

    `extra` goes top-level in the request body (EngineClient.generate(..., extra=extra));
    `sampling_additions` is merged into sampling_params ({"custom_params": {"seed": ...}}).
    A greedy request (temperature 0, or top_k 1) gets ({}, {}): it is deterministic already.
    The seed is taken mod 2**64. Requests with the same seed draw the same uniforms at the
    same positions, whatever the prompt: give independent samples different seeds."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    temp = sampling.get("temperature")
    if (temp is not None and float(temp) < 1e-6) or sampling.get("top_k") == 1:
        return {}, {}
    params = dict(sampling.get("custom_params") or {})
    params["seed"] = seed & _MASK64
    return {"custom_logit_processor": processor_str()}, {"custom_params": params}


def server_supports_seeding(server_info: dict[str, Any]) -> bool:
    """True when a server's /server_info (SGLang 0.5.23 reports its ServerArgs flat, e.g.
    "enable_custom_logit_processor": true, "enable_deterministic_inference": false) says
    SeededSampler will run on every token: the flag is on, and no speculative decoding
    (EAGLE/EAGLE3/NGRAM verify skips custom logit processors; DFLASH/DSPARK apply them per
    draft token, where one position per request is wrong). Anything else (a router that
    does not pass the flag through, an older server) counts as no."""
    if not isinstance(server_info, dict):
        return False
    return (server_info.get("enable_custom_logit_processor") is True
            and server_info.get("speculative_algorithm") in (None, "", "NONE")
            and not server_info.get("enable_watermark"))


class SeedSupport:
    """Which servers run SeededSampler (asked once per server): the relay backend's view."""

    def __init__(self) -> None:
        self._known: dict[int, bool] = {}

    def fields(self, engine: Any, seed: int | None, sampling: dict[str, Any]) -> tuple[dict, dict, bool]:
        """(extra, sampling_additions, reproducible) for one request of a run with `seed`."""
        if seed is None:
            return {}, {}, True
        extra, add = seeded_fields(int(seed), sampling)
        if not extra:  # greedy: reproducible without help
            return {}, {}, True
        key = id(engine)
        if key not in self._known:
            try:
                self._known[key] = server_supports_seeding(engine.server_info())
            except Exception:  # an info endpoint that fails (a router): no seeding there
                self._known[key] = False
        return (extra, add, True) if self._known[key] else ({}, {}, False)
