"""The bundled SGLang programs (installed as relaygen_sgl.programs)."""
