"""What the CPU presets change in SGLang's CPU compute: the patch table (patches), the
extend attention and few-row linear maps they install, and the sitecustomize shim (shim/)
that applies them inside each CPU server process."""

__all__: list[str] = []
