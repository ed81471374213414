"""Loading SGLang programs (@sgl.function) from programs/ or from a user's file."""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from typing import Any

from .config import programs_dir
from .errors import ConfigError

BUILTIN = {"relay": ("relay.py", "relay"), "single-large": ("single.py", "single"),
           "single-small": ("single.py", "single")}


_LOCK = threading.Lock()  # concurrent first loads must not see a half-executed module


def _load_module(path: Path) -> Any:
    with _LOCK:
        return _load_module_locked(path)


def _load_module_locked(path: Path) -> Any:
    name = f"relaygen_programs.{path.stem}"
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


def load_program(name_or_path: str) -> Any:
    """A built-in program by method name, or the single @sgl.function in a .py file."""
    from sglang.lang.ir import SglFunction

    if name_or_path in BUILTIN:
        file, attr = BUILTIN[name_or_path]
        return getattr(_load_module(programs_dir() / file), attr)
    path = Path(name_or_path)
    if not path.is_file() or path.suffix != ".py":
        raise ConfigError(f"unknown program {name_or_path!r}: use {', '.join(BUILTIN)} or a path to a .py file")
    module = _load_module(path.resolve())
    funcs = [v for v in vars(module).values() if isinstance(v, SglFunction)]
    if len(funcs) != 1:
        raise ConfigError(f"{path} must define exactly one @sgl.function, found {len(funcs)}")
    return funcs[0]
