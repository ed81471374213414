"""RelayGen as an SGLang program: the relay's prompt, then the relay loop (see
relaygen_sgl/program.py). With method single-large / single-small in the plan, the same
program is the one-model baseline: the same template, budget and sampling, one role
throughout."""

import sglang as sgl

from relaygen_sgl import program as rg


@sgl.function
def relay(s, question, plan=None):
    rg.prompt(s, question, plan)
    return rg.relay(s, plan)
