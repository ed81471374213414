"""The relay as a building block of SGLang programs.

Inside any `@sgl.function` running on the routing backend (`relaygen_sgl.connect(...)`):

    prompt(s, question)          # the relay's own prompt (chat template, thinking on)
    think = relay(s, answer=False)   # the models write the reasoning, up to </think>
    s += "The answer is (" + sgl.select("letter", choices=["A", "B", "C", "D"])

`relay(s)` runs the RelayGen loop on the program state: the policy decides each turn and
the loop hands it to the backend as a typed request (runtime/turn.py TurnSpec) left on the
trajectory, then appends an `sgl.gen` that runs it, so the interpreter's text, streaming and
meta_info stay SGLang's own. It returns the trajectory's RelayResult; a failed turn raises
RelayAborted carrying the partial result.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import sglang as sgl
from sglang.lang.ir import SglSamplingParams

from relaygen_sgl.core.errors import STOPPED, Cancelled, ConfigError, RelayAborted, RelayGenError
from relaygen_sgl.core.result import INSERTED, RelayResult
from relaygen_sgl.core.run_settings import RunSettings
from relaygen_sgl.runtime.gen_params import gen_params, is_gen_param, relay_gen_kwargs
from relaygen_sgl.runtime.plan import RelayPlan
from relaygen_sgl.runtime.policy import RelayPolicy
from relaygen_sgl.runtime.trajectory import Trajectory
from relaygen_sgl.runtime.turn import TurnSpec


def backend_of(s: Any) -> Any:
    from sglang.lang.tracer import StopTracing, TracerProgramState

    from relaygen_sgl.runtime.backend import RelayBackend

    if isinstance(s, TracerProgramState):  # run_batch traces programs for a common prefix first
        raise StopTracing()
    backend = getattr(getattr(s, "stream_executor", None), "backend", None)
    if not isinstance(backend, RelayBackend):
        raise ConfigError("this program needs the relay backend: run it with backend=relaygen_sgl.connect(...)")
    return backend


def trajectory_of(s: Any) -> Trajectory:
    """The state's trajectory, with everything the program has appended so far taken in."""
    s.sync()
    exe = s.stream_executor
    traj = backend_of(s).trajectory(exe)
    if exe.error_ is not None:
        raise _aborted(s, traj, exe.error_, None)
    traj.absorb(exe.text_)
    return traj


def route(s: Any, role: str) -> None:
    """Send the next plain gens and selects to `role`. `s["route"] = role` applies at once,
    while gens already queued run later; this waits for them first, so each gen goes where
    the code says."""
    s.sync()
    s["route"] = role


def prompt(s: Any, question: str | list[dict[str, str]], plan: RelayPlan | None = None) -> None:
    """Append the relay's prompt for a question (or OpenAI-style messages)."""
    s += (plan or backend_of(s).plan()).render(question)


def relay(s: Any, plan: RelayPlan | None = None, **kwargs: Any) -> RelayResult:
    """Run the relay loop from the state's current text. Without a plan, `kwargs` are run
    settings (core/run_settings.py: method, max_tokens, answer, answer_role, temperature,
    seed, profile ...) for one built by the backend. sgl.gen's parameters that apply per turn
    (min_p, frequency_penalty, presence_penalty, ignore_eos, return_logprob,
    top_logprobs_num, return_text_in_logprobs) go to every turn; those that cannot survive a
    handoff (regex, json_schema, dtype, n > 1, stop ...) raise ConfigError naming them, before
    any request."""
    per_turn = relay_gen_kwargs({k: kwargs.pop(k) for k in list(kwargs) if is_gen_param(k)})
    if plan is None:
        plan = backend_of(s).plan(RunSettings.of(kwargs))
    elif kwargs:
        raise ConfigError(f"relay() takes a plan or settings, not both: {', '.join(sorted(kwargs))}")
    params = gen_params(SglSamplingParams(**per_turn))
    traj = trajectory_of(s)
    backend = backend_of(s)
    plan = backend.fit(plan, len(traj.ids))  # refused before any request, not after minutes of work
    traj.control = plan.control  # the caller's listener and cancel, for this run's turns
    policy = RelayPolicy(plan)
    first = len(traj.segments)
    with backend.admitted(plan, traj):  # waits while the trajectories in flight fill the KV pools
        spec = _loop(s, traj, plan, policy, params)
    traj = trajectory_of(s)  # takes in a trailing insert
    return _result(traj, plan, policy, spec.finish, first)


def _loop(s: Any, traj: Trajectory, plan: RelayPlan, policy: RelayPolicy, params: Any) -> TurnSpec:
    """Turn after turn until the policy says the trajectory is over; returns its last word."""
    render = plan.continuation(traj.prompt)  # the reference re-renders each request after its first
    spec = policy.start()
    while True:
        if spec.insert:  # the forced "\n</think>\n\n"
            s += spec.insert
            if traj.control.on_delta is not None:  # a listener reads the text as written, this too
                traj.control.on_delta(INSERTED, spec.insert)
        if spec.role is None:
            return spec
        if traj.control.cancel.is_set():
            raise _aborted(s, traj, Cancelled(STOPPED),
                           plan)
        spec = replace(spec, sampling={**spec.sampling, **params.sampling}, extra={**spec.extra, **params.extra})
        if render is not None and policy.turns:
            s.sync()  # the text so far, a closing insert included
            text = s.stream_executor.text_[len(traj.prompt):]
            spec = replace(spec, prefix_ids=tuple(traj.tokenizer.encode(render(text))))
        # Safe to leave now: the previous gen has finished (its meta was read below).
        traj.pending = spec
        name = f"relay_turn{len(traj.segments)}"
        s += sgl.gen(name, max_tokens=spec.max_tokens)  # runs `spec`: the backend takes it from the trajectory
        s.get_meta_info(name)  # waits for the turn
        failure = traj.error or s.stream_executor.error_
        if failure is not None:
            raise _aborted(s, traj, failure, plan)
        spec = policy.after(traj.segments[-1], degraded=traj.degraded is not None)


def _result(traj: Trajectory, plan: RelayPlan, policy: RelayPolicy, finish: str, first: int) -> RelayResult:
    result = traj.result(plan.method, finish, plan.family.think_end, plan.budget)
    result.extra.update(family=plan.family.name, profile=plan.profile.name, cue_match=plan.cue_match,
                        protocol=plan.protocol)
    if plan.reserve:
        result.extra["answer_reserve"] = plan.reserve
    notes = plan.rules.notes(plan)
    if notes:
        result.extra["reference"] = notes
    if policy.note:
        result.extra["note"] = policy.note
    if plan.seed is not None:
        # a seed reproduces a sampled run only where every server ran the seeded sampler
        result.extra["seed"] = {"value": plan.seed, "reproducible": not traj.unseeded}
    if first:  # the relay ran after other turns of this program: its stats cover its own
        result.extra["relay_from_segment"] = first
    return result


def _aborted(s: Any, traj: Trajectory, error: BaseException, plan: RelayPlan | None) -> RelayAborted:
    if isinstance(error, RelayAborted):
        return error
    what = str(error) if isinstance(error, RelayGenError) else f"{type(error).__name__}: {error}"
    plan = plan or backend_of(s).plan()
    partial = traj.result(plan.method, "error", plan.family.think_end, plan.budget)
    err = RelayAborted(f"relay stopped after {len(traj.segments)} segments: {what}", partial=partial)
    err.__cause__ = error
    return err
