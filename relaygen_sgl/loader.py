"""Loading SGLang programs (@sgl.function): the bundled ones by name, a user's by file path.

The bundled programs live in the repository's top-level programs/ folder and ship inside
the package as relaygen_sgl.programs (pyproject maps the folder), so an installed wheel
has them too.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from pathlib import Path
from typing import Any

from relaygen_sgl.core.errors import ConfigError

# name -> (module in relaygen_sgl.programs, function)
BUNDLED = {
    "relay": ("relay", "relay"),
    "single-large": ("relay", "relay"),  # the plan's method makes it the one-model baseline
    "single-small": ("relay", "relay"),
    "self-consistency": ("self_consistency", "self_consistency"),
    "multiple-choice": ("multiple_choice", "multiple_choice"),
}

_LOCK = threading.Lock()  # concurrent first loads must not see a half-executed module


def _load_file(path: Path) -> Any:
    with _LOCK:
        name = f"relaygen_user_programs.{path.stem}"
        if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot load a program from {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise ConfigError(f"cannot load the program in {path}: {type(e).__name__}: {e}") from e
        return module


def _bundled_file(path: Path) -> str | None:
    """The bundled program a path names (programs/relay.py in a checkout is the bundled relay)."""
    from relaygen_sgl import programs

    folder = Path(programs.__file__).resolve().parent
    if path.resolve().parent == folder:
        return next((n for n, (mod, _) in BUNDLED.items() if mod == path.stem), None)
    return None


def load_program(name_or_path: str) -> Any:
    """A bundled program by name (relay, single-large, single-small, self-consistency,
    multiple-choice), or the single @sgl.function in a .py file."""
    from sglang.lang.ir import SglFunction

    path = Path(name_or_path)
    name = name_or_path if name_or_path in BUNDLED else (_bundled_file(path) if path.is_file() else None)
    if name is not None:
        module, attr = BUNDLED[name]
        with _LOCK:
            return getattr(importlib.import_module(f"relaygen_sgl.programs.{module}"), attr)
    if not path.is_file() or path.suffix != ".py":
        raise ConfigError(f"unknown program {name_or_path!r}: use {', '.join(BUNDLED)} or a path to a .py file")
    module = _load_file(path.resolve())
    funcs = [v for v in vars(module).values() if isinstance(v, SglFunction)]
    if len(funcs) != 1:
        raise ConfigError(f"{path} must define exactly one @sgl.function, found {len(funcs)}")
    return funcs[0]


def accepts(func: Any, name: str) -> bool:
    return name in getattr(func, "arg_names", ())
