"""Server management: how a preset's servers launch (launch: commands, ports, order), the
GPUs they get (gpus), the memory and KV cache each gets there (memory), their processes,
`relaygen up/status/down`, local model weights, and the CPU servers' patches."""

__all__: list[str] = []
