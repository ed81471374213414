"""The one HTTP client to an SGLang server (http: EngineClient and the wire format) and
the tokenizer that turns token ids into text and back."""

__all__: list[str] = []
