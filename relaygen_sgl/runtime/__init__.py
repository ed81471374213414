"""The relay's machinery under an SGLang program: the routing backend that `connect()`
returns, the policy that says what runs next, one turn of one model, the trajectory, the
prefetch, seeded sampling, server pairing and `sgl.select` scoring."""

__all__: list[str] = []
