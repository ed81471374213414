"""Self-consistency over relays: fork k relays from one prompt, grade-normalize each
branch's final answer and take the majority vote.

The prompt is prefilled on both servers before the fork, so every branch's first turn,
on either model, finds it cached. Branch i samples with seed (plan seed or 0) + i.

    relaygen batch programs/self_consistency.py prompts.jsonl -o out.jsonl   # "k" per line, default 4
"""

from concurrent.futures import ThreadPoolExecutor

import sglang as sgl

from relaygen_sgl import program as rg
from relaygen_sgl.core.grading import majority, vote_key


@sgl.function
def self_consistency(s, question, k=4, plan=None):
    plan = plan or rg.backend_of(s).plan()
    rg.prompt(s, question, plan)
    group = s.fork(int(k))
    branches = [group[i] for i in range(int(k))]
    base = plan.seed or 0
    with ThreadPoolExecutor(len(branches)) as pool:
        results = list(pool.map(lambda ib: rg.relay(ib[1], plan.but(seed=base + ib[0])),
                                enumerate(branches)))
    keys = [vote_key(r.text, plan.family.think_end) for r in results]
    answer, votes = majority(keys)
    return {"answer": answer or "", "votes": votes, "k": len(results),
            "branches": [{**r.to_dict(token_ids=False), "vote_key": key} for r, key in zip(results, keys)]}
