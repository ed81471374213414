"""RelayGen as an SGLang program.

Each `sgl.gen` is one turn of one model. A large turn carries the switch cues as a
stop-on-cue constraint (stop_regex) and </think> as a stop string; a small turn stops
at the first sentence end. The routing backend sends the gen to the role named in
s["route"] and hands over token ids, so both servers reuse the shared prefix.
"""

import sglang as sgl

from relaygen_sgl.policy import RelayPlan, RelayPolicy
from relaygen_sgl.trace import Trace


@sgl.function
def relay(s, question: str, plan: RelayPlan, on_delta=None):
    trace = Trace(plan)
    s += trace.start(question)
    policy = RelayPolicy(plan)
    decision = policy.start()
    turn_no = 0
    while True:
        if decision.insert:  # the forced "\n</think>\n\n"
            s += decision.insert
            trace.insert(decision.insert)
        if decision.role is None:
            return trace.result(decision.finish)
        # Safe to set now: the previous gen has finished (we read its meta below).
        s["route"] = {"role": decision.role, "seed": plan.seed}
        name = f"turn{turn_no}"
        s += sgl.gen(
            name,
            max_tokens=decision.max_tokens,
            min_tokens=decision.min_tokens,
            stop=list(decision.stop),  # a fresh list: the interpreter extends it in place
            stop_regex=list(decision.cue_patterns),
            **plan.sampling,
        )
        turn = trace.add(s.get_meta_info(name))
        decision = policy.after(turn)
        turn_no += 1
