"""Seeded sampling that reproduces on any SGLang 0.5.23 server, without deterministic mode.

SGLang reads `sampling_params.sampling_seed` only under --enable-deterministic-inference,
which the CPU servers cannot run. Instead every seeded request carries SeededSampler, a
custom logit processor (server flag --enable-custom-logit-processor) that samples the next
token itself and hands the server's sampler logits with one finite entry, so the server's
own RNG has no choice left.

Where it runs (sglang/srt): ModelRunner.sample() first applies penalties, the grammar mask
and logit_bias (sampling_batch_info.py), then Sampler.forward calls
apply_custom_logit_processor; only after that does the sampler divide by the temperature
and apply top_k / top_p / min_p to the softmax (top_k_top_p_min_p_sampling_from_probs_torch,
layers/sampler.py). So the processor gets biased logits NOT yet divided by the temperature,
and does all of that itself, with the request's own server-normalized SamplingParams
(temperature 0 arrives as top_k=1, sampling_params.py). Output logprobs of a seeded request come from the returned
logits (0 for the chosen token, -inf elsewhere); input logprobs are unaffected.

The draw: u = hash(seed, position) in [0, 1) (splitmix64 on Python ints, no RNG state),
where position is the absolute index of the token being sampled in the request's
sequence. The token is picked by inverse CDF over the filtered distribution. Same seed
and same position give the same u on either server, whether the prefix came in one
request or was resent as input_ids by the relay, cached or not.

How the processor travels (processor_str). SGLang loads a request's `custom_logit_processor`
in its scheduler, while it builds a batch (sampling/sampling_batch_info.py calls
CustomLogitProcessor.from_str): `dill.loads(bytes.fromhex(json["callable"]))`, then calls
the result (sampling/custom_logit_processor.py, cached per string). SGLang's own to_str is
`dill.dumps(cls)`, and a class pickled by value by dill carries its functions' CODE OBJECTS,
whose layout changes with every Python minor version: a server on another minor version
(SGLang's Docker images) fails or crashes on them, inside the scheduler, which takes the
server down. What is sent instead holds no code object: a pickle of one call,
`builtins.eval(EXPR)`, where EXPR execs a small loader and returns the class it made. The
loader imports CustomLogitProcessor from the server's own sglang and execs this module's
source of SeededSampler (inspect.getsource); should that fail on the server, the loader makes
a processor that leaves the logits alone, so nothing we send stops a server. The server needs
sglang and torch, not relaygen_sgl, and a Python that parses this class (3.10 to 3.13 checked;
SGLang 0.5.23 asks for >= 3.11). Detecting the server's Python instead was not an option:
/server_info reports ServerArgs and scheduler info, no Python version (utils/common.py
build_server_info). Nothing sent depends on the client's Python, and building it writes nothing
(dill.dumps(recurse=True) disassembles code with `dis` inside a temporary swap of sys.stdout,
dill/detect.py nestedglobals, which threads building requests at once left swapped and
printed bytecode through). The string is built once per process, under a lock; per request
values (the seed) go in sampling_params.custom_params.

Whether a server runs it (SeedSupport): its /server_info says which mode (the flags), then one
real seeded request (input [0], one token) shows the processor loaded and ran there: the
sampled token's logprob is 0, since SGLang computes output logprobs from the processor's
one-finite-entry row (layers/sampler.py, Sampler.forward after _preprocess_logits). A router
that drops the field, a server that could not build the class: logprob < 0, seeding off there.
A transient failure (connection, 5xx) decides nothing: the request runs unseeded and the next
one asks again, no sooner than SeedSupport.retry_s later. On a server with
--enable-deterministic-inference, `min_p > 0` is refused before it is sent: SGLang then builds
a sampling_seed for every request and its sampler asserts `sampling_seed is None` when any row
of the batch has min_p (layers/sampler.py, top_k_top_p_min_p_sampling_from_probs_torch).
"""

from __future__ import annotations

import inspect
import json
import logging
import pickle
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor

from relaygen_sgl.client.cancel import Stop
from relaygen_sgl.core.errors import Cancelled, ConfigError, EngineError, EngineRejected

PROBE_TIMEOUT_S = 60.0  # the seeding probe's longest wait (a busy server queues it behind others)

__all__ = ["SeedSupport", "SeededSampler", "processor_str", "seeded_fields", "seeding_mode", "server_supports_seeding",
           "uniform"]

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


class SeededSampler(CustomLogitProcessor):
    """Samples each seeded row as SGLang's sampler would (softmax(logits / T), top_k,
    top_p, min_p), with a counter-based uniform from (seed, position), and returns the
    row as -inf everywhere but the chosen token (0.0). Rows without a seed, greedy rows
    (top_k <= 1, which is how SGLang stores temperature 0) and rows it cannot read are
    left as they are. It must never raise: it runs inside the server's scheduler.

    Every method is self-contained (imports inside, no module globals but
    CustomLogitProcessor): the server runs this class's source (processor_str), with sglang
    and torch, not relaygen_sgl."""

    def __call__(self, logits, custom_param_list=None):
        if not custom_param_list:
            return logits
        rows, specs = [], []
        for i, params in enumerate(custom_param_list):
            spec = self._row_spec(params)
            if spec is not None:
                rows.append(i)
                specs.append(spec)
        if rows:
            try:
                self._sample_rows(logits, rows, specs)
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
        is scheduled (mem_cache/allocation.py, for extend and decode), counts every token fed,
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

    @staticmethod
    def _to_device(values, dtype, dev):
        """A host list as a tensor on `dev`, without the host waiting for the device: built
        on the host, pinned, copied asynchronously. torch.tensor(list, device="cuda") copies
        synchronously from pageable memory: the host waits for every kernel queued before it,
        the forward pass included, and the overlap scheduler's head start is lost."""
        import torch

        t = torch.tensor(values, dtype=dtype)
        if dev.type == "cuda":
            t = t.pin_memory()  # PyTorch's caching host allocator keeps it until the copy is done
        return t.to(dev, non_blocking=True)

    @classmethod
    def _sample_rows(cls, logits, rows, specs):
        """Writes the one-finite-entry rows into `logits`. Tensor ops only: everything the host
        decides (which rows, how each row's candidates are found) comes from the host's own
        parameters and goes to the device in two asynchronous copies, and nothing reads a value
        back (no .item(), bool(tensor), .tolist(), .cpu()), so the step never waits for the
        forward pass. Rows are grouped by how their candidates are found, decided from each
        row's own parameters, so a row samples the same token whatever else is in the batch:
        ("k", k) the top k by torch.topk; "all" (no top_k, no top_p) the vocabulary unsorted, as
        no filter needs an order; "p" (top_p alone) the whole vocabulary sorted, as SGLang's
        own torch sampler does (a shorter candidate list would need a look at the values to
        know it holds the top_p mass)."""
        import torch

        dev = logits.device
        vocab = logits.shape[-1]
        groups = {}
        for j, spec in enumerate(specs):
            key = ("k", spec[2]) if spec[2] < vocab else ("all" if spec[1] >= 1.0 else "p")
            groups.setdefault(key, []).append(j)
        members = [j for js in groups.values() for j in js]
        ints = cls._to_device([*rows, *members], torch.long, dev)
        # per row: temperature, top_p (inf: none), min_p, u
        floats = cls._to_device([[t, p if p < 1.0 else float("inf"), m, u] for t, p, _, m, u in specs],
                                torch.float64, dev)
        idx = ints[: len(rows)]
        # softmax(logits / T) = exp(z - lse): z and lse over the vocabulary in float32, the
        # candidates' probabilities in float64; ranking z ranks the probabilities
        z = logits.index_select(0, idx).float() / floats[:, :1].float()
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        token = None
        at = len(rows)
        for key, js in groups.items():
            whole = len(js) == len(rows)  # one group: its members are the rows in order
            sel = ints[at: at + len(js)]
            at += len(js)
            zg, lg, fg = (z, lse, floats) if whole else (z.index_select(0, sel), lse.index_select(0, sel),
                                                         floats.index_select(0, sel))
            if key[0] == "k":
                zv, order = torch.topk(zg, k=key[1], dim=-1, sorted=True)
            elif key == "all":
                zv, order = zg, torch.arange(vocab, device=dev).expand(len(js), -1)
            else:
                zv, order = zg.sort(dim=-1, descending=True)
            vals = torch.exp(zv.double() - lg.double())
            picked = cls._pick(vals, order, fg[:, 1:2], fg[:, 2:3], fg[:, 3:4])
            if whole:
                token = picked
            else:
                if token is None:
                    token = torch.empty((len(rows), 1), dtype=torch.long, device=dev)
                token.index_copy_(0, sel, picked)
        out = torch.full((len(rows), vocab), float("-inf"), dtype=logits.dtype, device=dev)
        out.scatter_(1, token, 0.0)
        # an all -inf / NaN row stays the server's
        out = torch.where(torch.isfinite(lse), out, logits.index_select(0, idx))
        logits.index_copy_(0, idx, out)

    @staticmethod
    def _pick(vals, order, top_p, min_p, u):
        """Inverse CDF over candidates `vals` (probabilities; in descending order whenever a
        top_p applies) with the sampler's filters: a rank is dropped when the mass before it
        exceeds top_p (inf: no filter) or its probability is below min_p times the top one.
        top_p, min_p and u are (rows, 1) float64 columns on the device."""
        import torch

        n = vals.shape[-1]
        keep = (torch.cumsum(vals, dim=-1) - vals) <= top_p
        keep &= vals >= vals.amax(dim=-1, keepdim=True) * min_p
        cdf = torch.cumsum(torch.where(keep, vals, torch.zeros_like(vals)), dim=-1)
        pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=n - 1)
        # never a zero-weight rank (rounding at the top end): step back to the last kept one
        ranks = torch.arange(n, device=vals.device).view(1, -1)
        pick = torch.minimum(pick, (keep * ranks).amax(dim=-1, keepdim=True))
        return order.gather(1, pick)

    @classmethod
    def to_str(cls) -> str:
        """The request's `custom_logit_processor` (processor_str; not used on the server)."""
        return processor_str()


# Run on the server, inside `eval`: imports the server's CustomLogitProcessor, then builds
# SeededSampler from its source; if that fails there, a processor that leaves logits alone.
_LOADER = """\
from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor
try:
    exec(compile(SOURCE, "<relaygen_sgl SeededSampler>", "exec"))
except Exception as e:
    import logging
    logging.getLogger("relaygen_sgl.runtime.seeding").warning("SeededSampler cannot be built here: %r", e)

    class SeededSampler(CustomLogitProcessor):
        def __call__(self, logits, custom_param_list=None):
            return logits
"""
_processor: str | None = None
_processor_lock = threading.Lock()


class _Eval:
    """Pickles as the call builtins.eval(expr): a name and a string, no code object."""

    def __init__(self, expr: str) -> None:
        self.expr = expr

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return eval, (self.expr,)


def _build_processor_str() -> str:
    namespace = {"__name__": "relaygen_seeded_sampler", "SOURCE": inspect.getsource(SeededSampler)}
    expr = f"(lambda ns: (exec({_LOADER!r}, ns), ns['SeededSampler'])[1])({namespace!r})"
    return json.dumps({"callable": pickle.dumps(_Eval(expr), protocol=4).hex()})


def processor_str() -> str:
    """The request's `custom_logit_processor`: SeededSampler as source (module docstring),
    made once per process, under a lock (SGLang caches the loaded class per string)."""
    global _processor
    if _processor is None:
        with _processor_lock:
            if _processor is None:
                _processor = _build_processor_str()
    return _processor


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


def seeding_mode(server_info: dict[str, Any]) -> str | None:
    """How a server reproduces a seeded run: "sglang" where it runs
    --enable-deterministic-inference (SGLang then samples from `sampling_seed` and the
    position itself, layers/sampler.py multinomial_with_seed: no custom processor, no
    unpickled code), else "processor" where SeededSampler runs, else None."""
    if isinstance(server_info, dict) and server_info.get("enable_deterministic_inference") is True:
        return "sglang"
    return "processor" if server_supports_seeding(server_info) else None


class SeedSupport:
    """How each server reproduces a seed, the relay backend's view, learnt once per server:
    its /server_info, then (for the processor) one real seeded request that must come back
    sampled by SeededSampler. A transient failure (connection, timeout, 5xx) decides nothing:
    that request runs unseeded and one after `retry_s` asks again. One thread asks per server
    at a time; the others wait for its answer. Also refuses `min_p > 0` where SGLang's
    deterministic sampler would assert on it (check)."""

    def __init__(self, retry_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_s = retry_s
        self._clock = clock
        self._modes: dict[int, str | None] = {}  # per engine: decided for the process
        self._infos: dict[int, dict[str, Any]] = {}
        self._failed_at: dict[int, float] = {}  # per engine: the last transient failure
        self._locks: dict[int, threading.Lock] = {}
        self._guard = threading.Lock()

    def fields(self, engine: Any, seed: int | None, sampling: dict[str, Any],
               stop: Stop | None = None) -> tuple[dict, dict, bool]:
        """(extra, sampling_additions, reproducible) for one request of a run with `seed`
        (the request carries `sampling_seed` already, for a deterministic server). Raises
        ConfigError, before the request is sent, for a min_p it must not carry (check).
        `stop`: the run's, which also ends a probe it waits on (undecided: asked again later)."""
        self.check([engine], sampling)
        if seed is None:
            return {}, {}, True
        extra, add = seeded_fields(int(seed), sampling)
        if not extra:  # greedy: reproducible without help
            return {}, {}, True
        mode = self.mode(engine, stop)
        if mode == "sglang":
            return {}, {}, True
        return (extra, add, True) if mode == "processor" else ({}, {}, False)

    def check(self, engines: Iterable[Any], sampling: dict[str, Any]) -> None:
        """ConfigError in one line when `sampling` has min_p > 0 and one of `engines` runs
        --enable-deterministic-inference: every request there gets a sampling_seed, and
        SGLang's torch sampler asserts it is None when a row of the batch has min_p
        (layers/sampler.py); the assertion stops the server. Asks each server's /server_info
        once, and only for a min_p; one that cannot answer now raises its EngineError (the
        request would fail the same way)."""
        min_p = sampling.get("min_p")
        if not min_p or float(min_p) <= 0.0:
            return
        for engine in engines:
            if self._info(engine).get("enable_deterministic_inference") is True:
                raise ConfigError(f"min_p={min_p} cannot be sent to {getattr(engine, 'url', engine)}: it runs "
                                  f"--enable-deterministic-inference, where SGLang's sampler asserts min_p == 0 "
                                  f"(the server would stop); leave min_p at 0 or use a server without that flag")

    def mode(self, engine: Any, stop: Stop | None = None) -> str | None:
        """seeding_mode of `engine`'s server, the processor's verified by a seeded request;
        None while a transient failure is under `retry_s` old."""
        key = id(engine)
        if key in self._modes:
            return self._modes[key]
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key in self._modes:
                return self._modes[key]
            failed = self._failed_at.get(key)
            if failed is not None and self._clock() - failed < self.retry_s:
                return None
            try:
                mode = seeding_mode(self._info(engine))
                if mode == "processor" and not self._probe(engine, stop):
                    mode = None
            except (EngineError, Cancelled) as e:  # EngineRejected is caught in _info and _probe
                self._failed_at[key] = self._clock()
                log.info("seeding on %s undecided (asked again in %.0fs): %s", getattr(engine, "url", engine),
                         self.retry_s, e)
                return None
            except Exception as e:  # an engine that cannot tell: no seeding there
                log.warning("seeding is off on %s: %r", getattr(engine, "url", engine), e)
                mode = None
            self._modes[key] = mode
            return mode

    def _info(self, engine: Any) -> dict[str, Any]:
        """The server's /server_info, kept once read; {} where it has none (a router's 4xx).
        A transient failure raises its EngineError and is not kept."""
        key = id(engine)
        if key not in self._infos:
            try:
                info = engine.server_info()
            except EngineRejected:
                info = {}
            self._infos[key] = info if isinstance(info, dict) else {}
        return self._infos[key]

    @staticmethod
    def _probe(engine: Any, stop: Stop | None = None) -> bool:
        """One real seeded request (input [0], one token at temperature 1): True when it came
        back sampled by SeededSampler, which leaves its token the only finite logit, so SGLang
        reports logprob 0 for it; a server that did not run the processor samples from the
        model and reports the token's own (negative) logprob. A 4xx (the field refused) is False."""
        sampling = {"max_new_tokens": 1, "temperature": 1.0}
        extra, add = seeded_fields(0, sampling)
        try:
            # bounded: a stalled server leaves it undecided, not the run waiting for an hour
            gen = engine.generate([0], {**sampling, **add}, extra={**extra, "return_logprob": True},
                                  stop=Stop(stop.event if stop is not None else threading.Event(),
                                            min(time.monotonic() + PROBE_TIMEOUT_S,
                                                stop.deadline if stop is not None and stop.deadline else 1e18)))
        except EngineRejected as e:
            log.warning("seeding is off on %s: the server refused a seeded request: %s",
                        getattr(engine, "url", engine), e)
            return False
        entries = gen.meta.get("output_token_logprobs") or [None]
        logprob = entries[0][0] if isinstance(entries[0], (list, tuple)) and entries[0] else None
        if isinstance(logprob, (int, float)) and logprob > -1e-4:
            return True
        log.warning("seeding is off on %s: a seeded request came back not sampled by relaygen's processor "
                    "(logprob %r; a router that drops custom_logit_processor, or a server that could not build it)",
                    getattr(engine, "url", engine), logprob)
        return False
