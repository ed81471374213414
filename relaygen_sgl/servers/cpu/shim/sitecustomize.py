"""Runs at the start of every CPU SGLang server process (this folder is on their PYTHONPATH
only; SGLang spawns its scheduler and detokenizer, which start here too).

Applies the patches of relaygen_sgl.servers.cpu.patches that the environment asks for, each when
SGLang imports the module it patches; with none asked for, nothing is installed. A
sitecustomize found further along sys.path still runs.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, wanted) -> None:  # type: ignore[no-untyped-def]
        self.wanted = wanted  # SGLang module -> cpu_patches.Patch

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name not in self.wanted:
            return None
        patch = self.wanted.pop(name)  # popped first: the lookup below passes here again
        if not self.wanted:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # the real module
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):  # type: ignore[no-untyped-def]
            load(module)
            from relaygen_sgl.servers.cpu.patches import apply

            apply(patch, getattr(module, patch.cls))

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def _install() -> None:
    from relaygen_sgl.servers.cpu.patches import wanted

    asked = wanted(os.environ)
    if asked:
        sys.meta_path.insert(0, _PatchAfterImport(asked))


_install()
_chain()
