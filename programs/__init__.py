"""The bundled SGLang programs (installed as relaygen_sgl.programs)."""

__all__: list[str] = []
