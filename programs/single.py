"""The one-model baseline: the relay's template, budget and sampling, one role throughout.

It thinks until </think>, EOS or the budget; then, as in the relay, the answer follows
</think> (a family whose model never writes </think> gets it inserted at EOS).
"""

import sglang as sgl

from relaygen_sgl.policy import RelayPlan, RelayPolicy
from relaygen_sgl.trace import Trace


@sgl.function
def single(s, question: str, plan: RelayPlan, on_delta=None):
    trace = Trace(plan)
    s += trace.start(question)
    policy = RelayPolicy(plan)  # with method single-*, it never switches roles
    decision = policy.start()
    for name in ("think", "more", "answer"):
        if decision.insert:
            s += decision.insert
            trace.insert(decision.insert)
        if decision.role is None:
            break
        s["route"] = {"role": decision.role, "seed": plan.seed}
        s += sgl.gen(name, max_tokens=decision.max_tokens, stop=list(decision.stop), **plan.sampling)
        decision = policy.after(trace.add(s.get_meta_info(name)))
    return trace.result(decision.finish or "done")
