"""The routing runtime: an SGLang frontend backend over two servers, a large and a small model.

Any `@sgl.function` runs on it. Each gen goes to the role named in `s["route"]` ("large"
or "small", or {"role": ..., "seed": ...}); a gen with no route goes to the large model.
`sgl.select` scores its choices on the routed role; `fork` gives each branch its own
trajectory, with the shared prefix prefilled on both servers first; `stream=True` streams
every turn. The backend keeps each program's trajectory as token ids (see trajectory.py)
and hands the receiving server exactly the ids the models wrote, so its radix cache holds
the whole shared prefix.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.chat_template import ChatTemplate, get_chat_template
from sglang.lang.choices import ChoicesDecision, ChoicesSamplingMethod, token_length_normalized
from sglang.lang.interpreter import StreamExecutor
from sglang.lang.ir import SglSamplingParams

from relaygen_sgl.client.http import EngineClient
from relaygen_sgl.client.tokenizer import Tokenizer
from relaygen_sgl.core.config import ROLES, Family
from relaygen_sgl.core.cues import CueProfile, load_profile
from relaygen_sgl.core.errors import ConfigError, EngineFailed, EngineRejected, EngineUnreachable, RelayGenError
from relaygen_sgl.core.result import Segment
from relaygen_sgl.runtime.gen_params import gen_params
from relaygen_sgl.runtime.policy import DEFAULT_BUDGET, DeltaSink, RelayPlan, TurnSpec
from relaygen_sgl.runtime.prefetch import DEFAULT_WORKERS, Prefetching, PrefetchRule, Server, prefetch_mode
from relaygen_sgl.runtime.seeding import SeedSupport
from relaygen_sgl.runtime.select import score_choices
from relaygen_sgl.runtime.trajectory import KEY, Trajectory
from relaygen_sgl.runtime.turn import run_turn

FALLBACKS = ("large", "fail")
# A listener's (role, text) event: the small server failed mid-turn; `text`, already delivered,
# is void, and the large model's version of the turn follows.
REROUTED = "rerouted"
DEFAULT_ROLE = "large"


class RelayBackend(BaseBackend):
    def __init__(self, engines: dict[str, EngineClient], tokenizer: Tokenizer, family: Family,
                 profile: CueProfile, *, on_small_failure: str = "large",
                 dp_sizes: dict[str, int] | None = None, prefetch: bool | str = "auto",
                 prefetch_rule: PrefetchRule | None = None, speculative: Iterable[str] = (),
                 prefetch_workers: int = DEFAULT_WORKERS) -> None:
        super().__init__()
        if on_small_failure not in FALLBACKS:
            raise ConfigError(f"on_small_failure must be one of {FALLBACKS}, got {on_small_failure!r}")
        self.engines, self.tokenizer, self.family, self.profile = engines, tokenizer, family, profile
        self.on_small_failure = on_small_failure
        # With in-server --dp, each trajectory is pinned to one DP rank per role (SGLang's
        # routed_dp_rank): the rank's radix cache then holds the whole shared prefix.
        self.dp_sizes = {r: n for r, n in (dp_sizes or {}).items() if n > 1}
        self._slots = itertools.count()
        # the handoff prefetch: the default mode (a plan may say otherwise for its trajectory),
        # the preset's rule, which servers decode speculatively (URLs), the turns running per
        # server (auto reads them), the workers and what was sent, declined or dropped
        self.prefetching = Prefetching(prefetch_rule, prefetch_mode(prefetch) or "auto", speculative,
                                       prefetch_workers)
        self._profiles: dict[str, CueProfile] = {}
        self._seeds = SeedSupport()
        self._fork_lock = threading.Lock()
        self._shared: dict[int, None] = {}  # prefixes already prefilled for forks (oldest first)
        self.chat_template: ChatTemplate = get_chat_template(family.sgl_chat_template)
        self.preset: Any = None  # set by connect(): the preset and URLs it resolved
        # set by connect() when the small server did not answer at start (runtime.pairing.SmallDown):
        # trajectories start degraded until it is back
        self.small_down: Any = None
        self.urls = {role: e.url for role, e in engines.items()}

    def plan(self, method: str = "relay", *, profile: str | CueProfile | None = None,
             max_tokens: int = DEFAULT_BUDGET, answer: bool = True, answer_role: str = "small",
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             seed: int | None = None, on_delta: DeltaSink | None = None,
             cancel: threading.Event | None = None, cue_match: str = "word",
             prefetch: bool | None = None, protocol: str = "relaygen-sgl",
             answer_reserve: int | None = None) -> RelayPlan:
        """A run's settings here: the backend's family and tokenizer, a profile (name, path or
        CueProfile; default the backend's), the family's sampling with any override. `protocol`
        "reference" reproduces the reference implementation (docs/fidelity.md); under ours,
        `answer_reserve` tokens of `max_tokens` are kept for the answer (None: the default)."""
        sampling = dict(self.family.sampling)
        for key, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)):
            if value is not None:
                sampling[key] = value
        return RelayPlan(method=method, profile=self._profile(profile), family=self.family,
                         tokenizer_path=self.tokenizer.path, budget=max_tokens, answer=answer,
                         answer_role=answer_role, sampling=sampling, seed=seed, on_delta=on_delta,
                         cancel=cancel, cue_match=cue_match, prefetch=prefetch, protocol=protocol,
                         answer_reserve=answer_reserve)

    def _profile(self, profile: str | CueProfile | None) -> CueProfile:
        if profile is None:
            return self.profile
        if isinstance(profile, CueProfile):
            return profile
        if profile not in self._profiles:
            self._profiles[profile] = load_profile(profile)
        return self._profiles[profile]

    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    def get_model_name(self) -> str:
        return "relaygen"

    # ------------------------------------------------------------------ trajectories
    def trajectory(self, s: StreamExecutor) -> Trajectory:
        """The program state's trajectory, made on first use. A branch of `fork` starts from
        its parent's history up to the fork point, and the first branch to run puts that
        shared prefix into both servers' caches for all of them."""
        traj = s.variables.get(KEY)
        if traj is not None and traj.sid == s.sid:
            return traj
        at = s.fork_start_text_pos
        if traj is None:
            traj = Trajectory(s.sid, self.tokenizer, next(self._slots))
            traj.degraded = self.small_down.record() if self.small_down is not None else None
            if at:  # a branch whose trunk never reached the backend: the same text, the same ids
                traj.absorb(s.text_[:at])
        else:
            with self._fork_lock:
                if traj.consumed < (at or 0):  # the fork came before the trunk's text was taken in
                    traj.absorb(s.text_[:at])
            traj = traj.fork(s.sid, at or 0)
        s.variables[KEY] = traj
        if at:
            self._share(traj)
        return traj

    def _share(self, traj: Trajectory) -> None:
        ids = traj.ids
        key = hash(tuple(ids))
        with self._fork_lock:
            if not ids or key in self._shared:
                return
            self._guarded(traj, lambda: self._prefill(ids, traj))
            self._shared[key] = None
            while len(self._shared) > 1024:
                self._shared.pop(next(iter(self._shared)))

    def _role(self, s: StreamExecutor) -> tuple[str, int | None]:
        route = s.variables.get("route")
        role, seed = (route.get("role"), route.get("seed")) if isinstance(route, dict) else (route, None)
        role = role or DEFAULT_ROLE
        if role not in ROLES:
            raise ConfigError(f"the program routed a gen to unknown role {role!r}; use 'large' or 'small'")
        return role, seed

    def _server(self, role: str, traj: Trajectory) -> Server:
        """The queue the trajectory's requests to `role` join: the server, and its DP rank."""
        n = self.dp_sizes.get(role)
        return self.engines[role].url, (traj.slot % n if n else None)

    @property
    def prefetch(self) -> str:
        """The default prefetch mode: auto, on or off."""
        return self.prefetching.default

    def _pin(self, role: str, traj: Trajectory) -> dict[str, Any]:
        n = self.dp_sizes.get(role)
        return {"routed_dp_rank": traj.slot % n} if n else {}

    def _prefill(self, ids: list[int], traj: Trajectory) -> None:
        """Put a prefix into both servers' radix caches (nothing is generated); not into a
        small server that is down."""
        down = traj.degraded is not None or (self.small_down is not None and not self.small_down.back)
        for role in ROLES[: 1 if self.engines["small"] is self.engines["large"] or down else 2]:
            self.engines[role].generate(ids, {"max_new_tokens": 0}, extra=self._pin(role, traj) or None)

    # ------------------------------------------------------------------ BaseBackend
    def commit_lazy_operations(self, s: StreamExecutor) -> None:
        # Called before a fork: both servers get the shared prefix now, so every branch's
        # first turn, on either role, finds it cached.
        traj = self.trajectory(s)
        traj.absorb(s.text_)
        self._share(traj)

    def cache_prefix(self, prefix_str: str) -> None:
        ids = self.tokenizer.encode(prefix_str)
        if ids:
            self._prefill(ids, Trajectory("prefix", self.tokenizer))

    def generate(self, s: StreamExecutor, sampling_params: SglSamplingParams, spec_var_name: str | None = None):
        traj = self.trajectory(s)
        seg = self._guarded(traj, lambda: self._turn(s, traj, sampling_params, traj.on_delta))
        return seg.text, seg.meta_info()

    def generate_stream(self, s: StreamExecutor, sampling_params: SglSamplingParams) -> Iterator[tuple[str, dict]]:
        traj = self.trajectory(s)
        deltas: queue.Queue = queue.Queue()
        done = object()
        out: dict[str, Any] = {}

        held: list[str] = []

        def sink(role: str, delta: str) -> None:
            # The interpreter cannot take text back, so a small turn (short, and the one that
            # may fail over to the large model mid-way) is held until it completes.
            if role == "small":
                held.append(delta)
            elif role == REROUTED:
                held.clear()
            else:
                deltas.put(delta)
            if traj.on_delta is not None:
                traj.on_delta(role, delta)

        def work() -> None:
            try:
                out["segment"] = self._turn(s, traj, sampling_params, sink)
            except BaseException as e:  # raised on the interpreter's thread below
                out["error"] = e
            finally:
                deltas.put(done)

        threading.Thread(target=work, daemon=True, name=f"relaygen-turn-{traj.sid[:8]}").start()
        sent = ""
        while (item := deltas.get()) is not done:
            sent += item
            yield item, {}
        if "error" in out:
            if isinstance(out["error"], RelayGenError):
                traj.error = out["error"]
            raise out["error"]
        seg: Segment = out["segment"]
        if held and seg.role == "small":
            sent += "".join(held)
            yield "".join(held), {}
        if not seg.text.startswith(sent):  # the interpreter's text must stay the trajectory's
            traj.error = EngineFailed(f"streamed text diverged from the turn's tokens: {sent!r} vs {seg.text!r}")
            raise traj.error
        yield seg.text[len(sent):], seg.meta_info()

    def select(self, s: StreamExecutor, choices: list[str], temperature: float,
               choices_method: ChoicesSamplingMethod | None = None) -> ChoicesDecision:
        traj = self.trajectory(s)
        return self._guarded(traj, lambda: self._select(s, traj, choices, choices_method or token_length_normalized))

    # ------------------------------------------------------------------ internals
    def _guarded(self, traj: Trajectory, call: Any) -> Any:
        try:
            return call()
        except RelayGenError as e:
            # The interpreter's worker thread only stores what it catches; the trajectory
            # keeps it too, so the program can raise it with the partial result.
            traj.error = e
            raise

    def _select(self, s: StreamExecutor, traj: Trajectory, choices: list[str],
                method: ChoicesSamplingMethod) -> ChoicesDecision:
        role, _ = self._role(s)
        role = "large" if traj.degraded else role  # the small server failed: the large model answers
        traj.absorb(s.text_)
        return score_choices(self.engines[role], self.tokenizer, traj.ids, choices, method, self._pin(role, traj))

    def _turn(self, s: StreamExecutor, traj: Trajectory, sp: SglSamplingParams, sink: Any) -> Segment:
        role, seed = self._role(s)
        text = s.text_
        traj.absorb(text)
        # Every other field of the gen (constrained decoding, min_p, penalties, ignore_eos,
        # stop_token_ids, logprobs) as RuntimeEndpoint sends it; a refused one raises before
        # any request.
        params = gen_params(sp)
        sampling: dict[str, Any] = {"temperature": sp.temperature, "top_p": sp.top_p, "top_k": sp.top_k,
                                    **params.sampling}
        route = s.variables.get("route")
        relay_turn = isinstance(route, dict) and bool(route.get("relay"))
        if sp.min_new_tokens and not relay_turn:
            # A plain gen's min_tokens masks EOS as on RuntimeEndpoint; a relay turn's only
            # keeps a cue from ending it early (TurnSpec.min_tokens), so the text stays the model's.
            sampling["min_new_tokens"] = int(sp.min_new_tokens)
        if seed is not None:
            sampling["sampling_seed"] = int(seed)
        # The chat template's stop string (the interpreter appends it to every gen) is the
        # EOS token's text: dropped, so an EOS stays an EOS finish.
        stop = tuple(x for x in ([sp.stop] if isinstance(sp.stop, str) else (sp.stop or ()))
                     if x not in self.tokenizer.eos_texts) + params.stop
        regex = tuple([sp.stop_regex] if isinstance(sp.stop_regex, str) else (sp.stop_regex or ()))
        spec = TurnSpec(role=role, max_tokens=int(sp.max_new_tokens), stop=stop, cue_patterns=regex,
                        min_tokens=int(sp.min_new_tokens or 0), sampling=sampling, extra=params.extra,
                        plain=not relay_turn)
        ids = traj.ids
        if isinstance(route, dict) and route.get("reference"):
            # The reference protocol: vLLM's stop and min-tokens semantics in the turn, and each
            # request after the first re-rendered from the text, as the reference re-sends its
            # conversation (core/reference.py); re-tokenized, as it was.
            spec = replace(spec, reference=True)
            if route.get("render") is not None:
                ids = self.tokenizer.encode(route["render"](text[len(traj.prompt):]))
        ctx = self.engines[role].context_length
        if ctx is not None and len(traj.prompt_ids) >= ctx:
            # what SGLang itself would refuse; the context clamp in run_turn must not hide it
            raise EngineRejected(f"the input ({len(traj.prompt_ids)} tokens) is longer than the model's context "
                                 f"length ({ctx} tokens)", url=self.engines[role].url, status=400)

        streamed: list[str] = []

        def tap(r: str, delta: str) -> None:
            streamed.append(delta)
            sink(r, delta)

        def run(on: str) -> Segment:
            extra, add, ok = self._seeds.fields(self.engines[on], seed, sampling)
            traj.unseeded |= not ok
            other = "small" if on == "large" else "large"
            # the turn counts as load on its server while it runs (auto reads it), and the
            # other server is kept warm unless the trajectory is degraded (the small server
            # failed) or both roles are one server
            with self.prefetching.load.turn(self._server(on, traj)):
                pf = None
                route = s.variables.get("route")
                last = isinstance(route, dict) and bool(route.get("last"))  # no turn follows to warm
                if not traj.degraded and not last and self.engines[other] is not self.engines[on]:
                    pf = self.prefetching.start(
                        traj.prefetch, self.engines[other], self._pin(other, traj), ids,
                        prefix=traj.last_writer != other,  # else it has all but a token
                        receiver=self._server(other, traj), sender=self._server(on, traj))
                try:
                    return run_turn(self.engines[on], self.tokenizer, ids, text, replace(
                        spec, role=on, extra={**spec.extra, **self._pin(on, traj), **extra},
                        sampling={**sampling, **add}),
                        sink=tap if sink else None, cancel=traj.cancel,
                        on_ids=pf.offer if pf is not None else None)
                finally:
                    if pf is not None:
                        pf.close()

        if role == "small" and traj.degraded:
            seg = replace(run("large"), rerouted_from="small")
        else:
            try:
                seg = run(role)
            except (EngineUnreachable, EngineFailed) as e:
                if role != "small" or self.on_small_failure == "fail" or "large" not in self.engines:
                    raise
                # The small server is gone: the large model goes on alone from the same prefix.
                traj.degraded = {"role": "small", "from_token": len(ids) - len(traj.prompt_ids), "error": str(e)}
                if sink and streamed:  # what a listener got of the dead turn is void
                    sink(REROUTED, "".join(streamed))
                    streamed.clear()
                seg = replace(run("large"), rerouted_from="small")
        traj.add(seg)
        return seg

