"""Runs at the start of every CPU SGLang server process (this folder is on their PYTHONPATH
only; SGLang spawns its scheduler and detokenizer, which start here too).

With RELAYGEN_EXTEND_ATTENTION=new-rows (set by the CPU presets), SGLang's torch_native
attention backend gets relaygen_sgl.cpu_attention's extend, which computes only the new
query rows; see that module for why. Nothing is imported until SGLang imports the backend.
A sitecustomize found further along sys.path still runs.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_TARGET = "sglang.srt.layers.attention.torch_native_backend"


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # find the real module, once
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):  # type: ignore[no-untyped-def]
            load(module)
            from relaygen_sgl.cpu_attention import patch

            patch(module.TorchNativeAttnBackend)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if os.environ.get("RELAYGEN_EXTEND_ATTENTION") == "new-rows":
    sys.meta_path.insert(0, _PatchAfterImport())
_chain()
