"""Runs at the start of every CPU SGLang server process (this folder is on their PYTHONPATH
only; SGLang spawns its scheduler and detokenizer, which start here too).

Two patches of SGLang's CPU compute, each on only when the preset's environment asks for it
(the CPU presets do), each applied when SGLang imports the module it patches:
- RELAYGEN_EXTEND_ATTENTION=new-rows: the torch_native backend's extend attention computes
  only the new query rows (relaygen_sgl/cpu_attention.py);
- RELAYGEN_LINEAR=few-rows-as-columns: linear maps of 2-5 rows as W x^T
  (relaygen_sgl/cpu_linear.py).
A sitecustomize found further along sys.path still runs.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

# module SGLang imports -> (variable, value, our module, the class it patches)
_PATCHES = {
    "sglang.srt.layers.attention.torch_native_backend":
        ("RELAYGEN_EXTEND_ATTENTION", "new-rows", "relaygen_sgl.cpu_attention", "TorchNativeAttnBackend"),
    "sglang.srt.layers.quantization.unquant":
        ("RELAYGEN_LINEAR", "few-rows-as-columns", "relaygen_sgl.cpu_linear", "UnquantizedLinearMethod"),
}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, wanted: dict[str, tuple[str, str]]) -> None:
        self.wanted = wanted  # module -> (our module, class)

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name not in self.wanted:
            return None
        ours, cls = self.wanted.pop(name)  # popped first: the lookup below passes here again
        if not self.wanted:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # the real module
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):  # type: ignore[no-untyped-def]
            load(module)
            importlib.import_module(ours).patch(getattr(module, cls))

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_wanted = {mod: (ours, cls) for mod, (var, value, ours, cls) in _PATCHES.items() if os.environ.get(var) == value}
if _wanted:
    sys.meta_path.insert(0, _PatchAfterImport(_wanted))
_chain()
