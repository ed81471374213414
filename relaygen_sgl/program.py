"""The relay as a building block of SGLang programs.

Inside any `@sgl.function` running on the routing backend (`relaygen_sgl.connect(...)`):

    prompt(s, question)          # the relay's own prompt (chat template, thinking on)
    think = relay(s, answer=False)   # the models write the reasoning, up to </think>
    s += "The answer is (" + sgl.select("letter", choices=["A", "B", "C", "D"])

`relay(s)` runs the RelayGen loop on the program state: the policy decides each turn, one
`sgl.gen` runs it on the routed server, and the trajectory (owned by the backend) records
it. It returns the trajectory's RelayResult; a failed turn raises RelayAborted carrying
the partial result.
"""

from __future__ import annotations

from typing import Any

import sglang as sgl

from relaygen_sgl.core.errors import Cancelled, ConfigError, RelayAborted, RelayGenError
from relaygen_sgl.core.result import RelayResult
from relaygen_sgl.runtime.gen_params import is_gen_param, relay_gen_kwargs
from relaygen_sgl.runtime.policy import RelayPlan, RelayPolicy
from relaygen_sgl.runtime.trajectory import Trajectory


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


def result_of(s: Any, plan: RelayPlan | None = None, finish: str = "done") -> RelayResult:
    """The state's trajectory as a RelayResult (e.g. each branch of a fork)."""
    plan = plan or backend_of(s).plan()
    return trajectory_of(s).result(plan.method, finish, plan.family.think_end, plan.budget)


def route(s: Any, role: str) -> None:
    """Send the next gens to `role`. `s["route"] = role` applies at once, while gens already
    queued run later; this waits for them first, so each gen goes where the code says."""
    s.sync()
    s["route"] = role


def prompt(s: Any, question: str | list[dict[str, str]], plan: RelayPlan | None = None) -> None:
    """Append the relay's prompt for a question (or OpenAI-style messages)."""
    s += (plan or backend_of(s).plan()).render(question)


def relay(s: Any, plan: RelayPlan | None = None, **plan_kwargs: Any) -> RelayResult:
    """Run the relay loop from the state's current text. `plan_kwargs` (method, max_tokens,
    answer, answer_role, temperature, seed, profile ...) build a plan from the backend's
    defaults when no plan is given. sgl.gen's parameters that apply per turn (min_p,
    frequency_penalty, presence_penalty, ignore_eos, return_logprob, top_logprobs_num,
    return_text_in_logprobs) go to every turn; those that cannot survive a handoff (regex,
    json_schema, dtype, n > 1, stop ...) raise ConfigError naming them, before any request."""
    per_turn = relay_gen_kwargs({k: plan_kwargs.pop(k) for k in list(plan_kwargs) if is_gen_param(k)})
    plan = plan or backend_of(s).plan(**plan_kwargs)
    traj = trajectory_of(s)
    before = s.stream_executor.variables.get("route")  # the program's own route, back after the relay
    if plan.on_delta is not None:
        traj.on_delta = plan.on_delta
    if plan.cancel is not None:
        traj.cancel = plan.cancel
    if plan.prefetch_mode is not None:  # off for the one-model methods
        traj.prefetch = plan.prefetch_mode
    policy = RelayPolicy(plan)
    spec = policy.start()
    first = len(traj.segments)
    # the reference protocol re-renders every request after its first from the text so far
    render = plan.continuation(traj.prompt) if plan.reference else None
    try:
        while True:
            if spec.insert:  # the forced "\n</think>\n\n"
                s += spec.insert
            if spec.role is None:
                break
            if traj.cancel.is_set():
                raise _aborted(s, traj, Cancelled("the run was stopped: cancelled by its caller or past its deadline"),
                               plan)
            # Safe to set now: the previous gen has finished (its meta was read below).
            s["route"] = {"role": spec.role, "seed": plan.seed, "relay": True,
                          "last": policy.phase == "answer"}  # the answer turn is the last: nothing to warm
            if plan.reference:
                s["route"] = {**s["route"], "reference": True, "render": render if policy.turns else None}
            name = f"relay_turn{len(traj.segments)}"
            s += sgl.gen(name, max_tokens=spec.max_tokens, min_tokens=spec.min_tokens,
                         stop=list(spec.stop),  # a fresh list: the interpreter extends it in place
                         stop_regex=list(spec.cue_patterns), **plan.sampling, **per_turn)
            s.get_meta_info(name)  # waits for the turn
            failure = traj.error or s.stream_executor.error_
            if failure is not None:
                raise _aborted(s, traj, failure, plan)
            spec = policy.after(traj.segments[-1], degraded=traj.degraded is not None)
    finally:
        # every turn has finished (each was waited for): gens after the relay are plain again
        if before is None:
            s.stream_executor.variables.pop("route", None)
        else:
            s["route"] = before
    traj = trajectory_of(s)  # takes in a trailing insert
    result = traj.result(plan.method, spec.finish, plan.family.think_end, plan.budget)
    result.extra.update(family=plan.family.name, profile=plan.profile.name, cue_match=plan.cue_match,
                        protocol=plan.protocol)
    if plan.reserve:
        result.extra["answer_reserve"] = plan.reserve
    if plan.reference:
        result.extra["reference"] = reference_notes(plan)
    if policy.note:
        result.extra["note"] = policy.note
    if plan.seed is not None:
        # a seed reproduces a sampled run only where every server ran the seeded sampler
        result.extra["seed"] = {"value": plan.seed, "reproducible": not traj.unseeded}
    if first:  # the relay ran after other turns of this program: its stats cover its own
        result.extra["relay_from_segment"] = first
    return result


def reference_notes(plan: RelayPlan) -> list[str]:
    """What a result run under --protocol reference says about itself: the bytes it sent and
    what SGLang cannot do as vLLM did (docs/fidelity.md)."""
    return [
        "prompt: the reference's bytes, with its leading newline and indentation and a backspace (U+0008) "
        "where it meant \\boxed (its template is a non-raw Python string)",
        f"rendering: the reference's {plan.family.name} chat template; every request after the first re-rendered "
        "from the text and re-tokenized, as the reference re-sent its conversation",
        "cues: plain stop strings in the profile's order (substring matches, the first in list order wins); "
        f"large requests hold back EOS and stop strings for {plan.min_large_tokens} tokens",
        "not as vLLM: SGLang's sampler and kernels differ, so sampled runs are not the reference's; the "
        "prefix cache is SGLang's radix cache, not vLLM's block cache",
    ]


def _aborted(s: Any, traj: Trajectory, error: BaseException, plan: RelayPlan | None) -> RelayAborted:
    if isinstance(error, RelayAborted):
        return error
    what = str(error) if isinstance(error, RelayGenError) else f"{type(error).__name__}: {error}"
    plan = plan or backend_of(s).plan()
    partial = traj.result(plan.method, "error", plan.family.think_end, plan.budget)
    err = RelayAborted(f"relay stopped after {len(traj.segments)} segments: {what}", partial=partial)
    err.__cause__ = error
    return err
