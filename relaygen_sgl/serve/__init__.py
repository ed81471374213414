"""`relaygen serve`: the relay as an OpenAI-compatible chat model (FastAPI)."""

__all__: list[str] = []
