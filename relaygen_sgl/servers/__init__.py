"""Server management: the plan of a preset's servers (commands, GPUs, ports), their
processes, `relaygen up/status/down`, local model weights, and the CPU servers' patches."""

__all__: list[str] = []
