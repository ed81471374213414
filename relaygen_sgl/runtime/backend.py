"""The routing runtime: an SGLang frontend backend over two servers, a large and a small model.

Any `@sgl.function` runs on it. A plain gen goes to the role named in `s["route"]` ("large"
or "small"; `program.route(s, role)` sets it); a gen with no route goes to the large model.
A relay turn (`program.relay`) comes as a typed request (runtime/turn.py TurnSpec) that the
relay loop leaves on the trajectory; the gen that follows it only drives the interpreter.
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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.chat_template import ChatTemplate, get_chat_template
from sglang.lang.choices import ChoicesDecision, ChoicesSamplingMethod, token_length_normalized
from sglang.lang.interpreter import StreamExecutor
from sglang.lang.ir import SglSamplingParams

from relaygen_sgl.client.http import EngineClient, Limits
from relaygen_sgl.client.tokenizer import Tokenizer
from relaygen_sgl.core.config import ROLES, SMALL_FAILURE_MODES, Family
from relaygen_sgl.core.cues import CueProfile, load_profile
from relaygen_sgl.core.errors import ConfigError, DoesNotFit, EngineFailed, EngineRejected, EngineUnreachable
from relaygen_sgl.core.result import REROUTED, Segment, warm_turns
from relaygen_sgl.core.run_settings import DEFAULT_PREFETCH, RunSettings
from relaygen_sgl.runtime.choices import score_choices
from relaygen_sgl.runtime.gen_params import gen_params
from relaygen_sgl.runtime.plan import RelayPlan, RunControl
from relaygen_sgl.runtime.pools import Claim, PoolGate
from relaygen_sgl.runtime.prefetch import DEFAULT_WORKERS, Prefetching, PrefetchRule, Server
from relaygen_sgl.runtime.seeding import SeedSupport
from relaygen_sgl.runtime.trajectory import KEY, Trajectory
from relaygen_sgl.runtime.turn import TurnSpec, run_turn

DEFAULT_ROLE = "large"


class RelayBackend(BaseBackend):
    def __init__(self, engines: dict[str, EngineClient], tokenizer: Tokenizer, family: Family,
                 profile: CueProfile, *, on_small_failure: str = "large",
                 dp_sizes: dict[str, int] | None = None, prefetch: str = DEFAULT_PREFETCH,
                 prefetch_rule: PrefetchRule | None = None, speculative: Iterable[str] = (),
                 prefetch_workers: int = DEFAULT_WORKERS, preset: Any = None, small_down: Any = None) -> None:
        super().__init__()
        if on_small_failure not in SMALL_FAILURE_MODES:
            raise ConfigError(f"on_small_failure must be one of {', '.join(SMALL_FAILURE_MODES)}, "
                              f"got {on_small_failure!r}")
        self.engines, self.tokenizer, self.family, self.profile = engines, tokenizer, family, profile
        self.on_small_failure = on_small_failure
        self.preset = preset  # the preset the servers were checked against (None: detected or custom)
        # the small server did not answer at start (runtime.pairing.SmallDown): trajectories
        # start degraded until it is back
        self.small_down = small_down
        # With in-server --dp, each trajectory is pinned to one DP rank per role (SGLang's
        # routed_dp_rank): the rank's radix cache then holds the whole shared prefix.
        self.dp_sizes = {r: n for r, n in (dp_sizes or {}).items() if n > 1}
        self._slots = itertools.count()
        # the handoff prefetch: the default mode, the preset's rule, which servers decode
        # speculatively (URLs), the turns running per server (auto reads them), the workers
        # and what was sent, declined or dropped
        self.prefetching = Prefetching(prefetch_rule, prefetch, speculative, prefetch_workers)
        self.pools = PoolGate()  # trajectories start while those in flight fit the KV pools
        self._profiles: dict[str, CueProfile] = {}
        self._seeds = SeedSupport()
        self._fork_lock = threading.Lock()
        self._shared: dict[int, None] = {}  # prefixes already prefilled for forks (oldest first)
        self.chat_template: ChatTemplate = get_chat_template(family.sgl_chat_template)

    @property
    def urls(self) -> dict[str, str]:
        return {role: e.url for role, e in self.engines.items()}

    @property
    def one_server(self) -> bool:
        """Both roles on one server (given the same URL): no handoff, nothing to keep warm."""
        return self.engines["small"] is self.engines["large"]

    @property
    def servers(self) -> dict[str, EngineClient]:
        """Each server once, under the first role it serves."""
        return {role: self.engines[role] for role in ROLES[: 1 if self.one_server else 2]}

    def pin(self, role: str, slot: int = 0) -> dict[str, Any]:
        """The request fields that pin a trajectory's requests to one DP rank of `role`'s
        server (SGLang's routed_dp_rank), so the rank's radix cache holds its whole prefix."""
        n = self.dp_sizes.get(role)
        return {"routed_dp_rank": slot % n} if n else {}

    def plan(self, settings: RunSettings | None = None, control: RunControl | None = None,
             **kwargs: Any) -> RelayPlan:
        """A run's plan: its settings (given whole, or as keyword arguments) with this backend's
        profile (unless they name one), family, tokenizer and default prefetch mode."""
        settings = RunSettings.given(settings, kwargs)
        return RelayPlan(settings, self._profile(settings.profile), self.family, self.tokenizer.path,
                         settings.prefetch or self.prefetching.default, control or RunControl())

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

    def _route(self, s: StreamExecutor) -> str:
        """The role a plain gen or select goes to: the program's `s["route"]`."""
        role = s.variables.get("route") or DEFAULT_ROLE
        if role not in ROLES:
            raise ConfigError(f"the program routed a gen to unknown role {role!r}; use 'large' or 'small'")
        return role

    def _roles_in_play(self, traj: Trajectory | None = None, method: str | None = None) -> tuple[str, ...]:
        """The roles whose servers a trajectory may still be sent to."""
        single = {"single-large": ("large",), "single-small": ("small",)}.get(method or "")
        if single:
            return single
        down = (traj is not None and traj.degraded is not None) or (
            self.small_down is not None and not self.small_down.back)
        return ROLES[: 1 if self.one_server or down else 2]

    def request_limit(self, traj: Trajectory | None = None) -> int | None:
        """The most tokens a trajectory may hold so that every server it may still go to
        accepts it as an input (client/http.py Limits); None where no server says."""
        known = [n for role in self._roles_in_play(traj)
                 if (n := self.engines[role].limits.request_tokens) is not None]
        return min(known) if known else None

    def fit(self, plan: RelayPlan, prompt_tokens: int) -> RelayPlan:
        """The plan for a run whose prompt is known, refused before any request where its prompt
        plus budget cannot fit a server it will use (DoesNotFit): else it fails where the pool
        ends, after minutes of work. A run that set no budget gets the default, or what the
        servers hold where that is less."""
        tightest: tuple[int, str, Limits] | None = None
        for role in self._roles_in_play(method=plan.method):
            limits = self.engines[role].limits
            if limits.request_tokens is not None and (tightest is None or limits.request_tokens < tightest[0]):
                tightest = (limits.request_tokens, role, limits)
        if tightest is None:
            return plan
        most, role, limits = tightest
        fixed = self.whole_size(plan, prompt_tokens) - plan.budget
        fits = max(0, most - fixed)
        if plan.settings.max_tokens is None and fits:
            return replace(plan, fits=fits)
        if fixed + plan.budget <= most:
            return plan
        where = (f"its KV pool holds {limits.kv_tokens} tokens" if limits.kv_tokens is not None
                 and (limits.context is None or limits.kv_tokens <= limits.context) else
                 f"its context holds {limits.context} tokens")
        advice = f"the largest budget that fits is max_tokens={fits}" if fits else "the prompt alone does not fit"
        raise DoesNotFit(f"the {role} server cannot hold this run: {where}, a request at most {most}; the prompt "
                         f"and closing text ({fixed}) + max_tokens {plan.budget} = {fixed + plan.budget}; {advice}",
                         fits)

    def _closing_tokens(self, plan: RelayPlan) -> int:
        """Tokens the text that closes thinking adds past the budget (what it does not count for)."""
        return max(0, len(self.tokenizer.encode(plan.closing_text)) - plan.rules.close_cost())

    def whole_size(self, plan: RelayPlan, prompt_tokens: int) -> int:
        """The most a trajectory from this prompt can become: the prompt, the text that closes
        thinking (past the budget) and the budget."""
        return prompt_tokens + self._closing_tokens(plan) + plan.budget

    @contextmanager
    def admitted(self, plan: RelayPlan, traj: Trajectory) -> Iterator[None]:
        """Run the block (a relay's turns) once the trajectory fits every KV pool it will use
        beside the trajectories in flight, each claiming its prompt (once, where they share it)
        and what it is expected to write (runtime/pools.py)."""
        pools = {self._server(role, traj): kv for role in self._roles_in_play(traj, plan.method)
                 if (kv := self.engines[role].limits.kv_tokens) is not None}
        ids = traj.ids
        claim = Claim(pools, (hash(tuple(ids)), len(ids)), self.whole_size(plan, len(ids)), traj.tokens)
        with self.pools.hold(claim, traj.control.stop):
            yield

    def _server(self, role: str, traj: Trajectory) -> Server:
        """The queue the trajectory's requests to `role` join: the server, and its DP rank."""
        return self.engines[role].url, self._pin(role, traj).get("routed_dp_rank")

    def _pin(self, role: str, traj: Trajectory) -> dict[str, Any]:
        return self.pin(role, traj.slot)

    def _prefill(self, ids: list[int], traj: Trajectory) -> None:
        """Put a prefix into both servers' radix caches (nothing is generated); not into a
        small server that is down."""
        down = traj.degraded is not None or (self.small_down is not None and not self.small_down.back)
        for role in ROLES[: 1 if self.one_server or down else 2]:
            self.engines[role].generate(ids, {"max_new_tokens": 0}, extra=self._pin(role, traj) or None,
                                        stop=traj.control.stop)

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
        seg = self._guarded(traj, lambda: self._turn(s, traj, sampling_params, traj.control.on_delta))
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
            if traj.control.on_delta is not None:
                traj.control.on_delta(role, delta)

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
        except Exception as e:
            # The interpreter stores what it catches only after waking the program; the
            # trajectory keeps it at once, so the relay loop raises it with the partial result.
            traj.error = e
            raise

    def _select(self, s: StreamExecutor, traj: Trajectory, choices: list[str],
                method: ChoicesSamplingMethod) -> ChoicesDecision:
        role = "large" if traj.degraded else self._route(s)  # the small server failed: the large model answers
        traj.absorb(s.text_)
        return score_choices(self.engines[role], self.tokenizer, traj.ids, choices, method, self._pin(role, traj),
                             traj.control.stop)

    def _turn(self, s: StreamExecutor, traj: Trajectory, sp: SglSamplingParams, sink: Any) -> Segment:
        """One gen: the relay loop's request when it left one, else the plain gen's."""
        request, traj.pending = traj.pending, None
        text = s.text_
        traj.absorb(text)
        spec = request if request is not None else self._plain(s, sp)
        ids = list(spec.prefix_ids) if spec.prefix_ids is not None else traj.ids
        ctx = self.engines[spec.role].context_length
        if ctx is not None and len(traj.prompt_ids) >= ctx:
            # what SGLang itself would refuse; the context clamp in run_turn must not hide it
            raise EngineRejected(f"the input ({len(traj.prompt_ids)} tokens) is longer than the model's context "
                                 f"length ({ctx} tokens)", url=self.engines[spec.role].url, status=400)
        self._seeds.check(self.servers.values(), spec.sampling)  # min_p refused before any request
        seg = self._routed(traj, spec, ids, text, sink)
        traj.add(seg)
        self._observe(traj, spec)
        return seg

    def _observe(self, traj: Trajectory, spec: TurnSpec) -> None:
        """Tell the pool gate whether the turn just added, where its server had the trajectory
        before, found that copy whole (core/result.py warm_turns). Not where the copy was never
        the server's to keep: a degraded trajectory, one server in both roles, or the reference's
        re-rendered prefix (other ids than the server cached)."""
        if traj.degraded or self.one_server or spec.prefix_ids:
            return
        segs, last = traj.segments, len(traj.segments) - 1
        # from the role's previous turn on: the whole trajectory again at every turn would be
        # quadratic in its turns
        before = next((j for j in range(last - 1, -1, -1) if segs[j].role == segs[last].role), None)
        if before is None:
            return
        at = len(traj.prompt_ids) + sum(len(s.token_ids) for s in segs[:before])
        turns = warm_turns(at, segs[before:], handoffs_only=False)
        if turns and turns[-1]["segment"] == last - before:
            self.pools.observe(evicted=turns[-1]["beyond_floor"] > 0)

    def _plain(self, s: StreamExecutor, sp: SglSamplingParams) -> TurnSpec:
        """A plain gen as a turn: every field as RuntimeEndpoint sends it (constrained decoding,
        min_p, penalties, ignore_eos, stop_token_ids, logprobs); a refused one raises before
        any request."""
        params = gen_params(sp)
        sampling: dict[str, Any] = {"temperature": sp.temperature, "top_p": sp.top_p, "top_k": sp.top_k,
                                    **params.sampling}
        if sp.min_new_tokens:  # masks EOS, as on RuntimeEndpoint
            sampling["min_new_tokens"] = int(sp.min_new_tokens)
        # The chat template's stop string (the interpreter appends it to every gen) is the
        # EOS token's text: dropped, so an EOS stays an EOS finish.
        stop = tuple(x for x in ([sp.stop] if isinstance(sp.stop, str) else (sp.stop or ()))
                     if x not in self.tokenizer.eos_texts) + params.stop
        regex = tuple([sp.stop_regex] if isinstance(sp.stop_regex, str) else (sp.stop_regex or ()))
        return TurnSpec(role=self._route(s), max_tokens=int(sp.max_new_tokens), stop=stop, cue_patterns=regex,
                        min_tokens=int(sp.min_new_tokens or 0), sampling=sampling, extra=params.extra, plain=True,
                        prefetch=self.prefetching.default)

    def _routed(self, traj: Trajectory, spec: TurnSpec, ids: list[int], text: str, sink: Any) -> Segment:
        """The turn on its role's server; where the small server is gone, on the large one
        from the same prefix (the trajectory degraded), unless the run must fail."""
        assert spec.role is not None
        if spec.role == "small" and traj.degraded:
            return replace(self._on("large", traj, spec, ids, text, sink), rerouted_from="small")
        streamed: list[str] = []

        def tap(r: str, delta: str) -> None:
            streamed.append(delta)
            sink(r, delta)

        try:
            return self._on(spec.role, traj, spec, ids, text, tap if sink else None)
        except (EngineUnreachable, EngineFailed) as e:
            if spec.role != "small" or self.on_small_failure == "fail" or "large" not in self.engines:
                raise
            traj.degraded = {"role": "small", "from_token": len(ids) - len(traj.prompt_ids), "error": str(e)}
            if sink and streamed:  # what a listener got of the dead turn is void
                sink(REROUTED, "".join(streamed))
            return replace(self._on("large", traj, spec, ids, text, sink), rerouted_from="small")

    def _on(self, on: str, traj: Trajectory, spec: TurnSpec, ids: list[int], text: str, sink: Any) -> Segment:
        """Run the turn on `on`'s server, seeded there as it can be, the other server kept warm
        meanwhile unless no turn follows, the trajectory is degraded or both roles are one server."""
        sampling = {**spec.sampling, **({"sampling_seed": spec.seed} if spec.seed is not None else {})}
        extra, add, ok = self._seeds.fields(self.engines[on], spec.seed, sampling, traj.control.stop)
        traj.unseeded |= not ok
        other = "small" if on == "large" else "large"
        # the turn counts as load on its server while it runs (auto reads it)
        with self.prefetching.load.turn(self._server(on, traj)):
            pf = None
            if not traj.degraded and not spec.last and not self.one_server:
                pf = self.prefetching.start(
                    spec.prefetch, self.engines[other], self._pin(other, traj), ids,
                    prefix=traj.last_writer != other,  # else it has all but a token
                    receiver=self._server(other, traj), sender=self._server(on, traj), stop=traj.control.stop,
                    closing_at=(max(0, spec.max_tokens - self.prefetching.rule.closing_lead)
                                if spec.hands_over_at_budget else None))

            def heard(so_far: list[int], cue_next: Callable[[], bool]) -> None:
                traj.writing = len(so_far)  # the pool gate reads the trajectory's size as it grows
                if pf is not None:
                    pf.offer(so_far, cue_next)

            try:
                return run_turn(self.engines[on], self.tokenizer, ids, text, replace(
                    spec, role=on, extra={**spec.extra, **self._pin(on, traj), **extra}, sampling={**sampling, **add}),
                    sink=sink, stop=traj.control.stop, on_ids=heard, limit=self.request_limit(traj))
            finally:
                if pf is not None:
                    pf.close()
