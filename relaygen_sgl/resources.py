"""Locations of the data files shipped inside the package and of the repo's programs/."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def data_path(*parts: str) -> Path:
    return _PKG.joinpath("data", *parts)


def cpu_shim_dir() -> Path:
    return _PKG / "_cpu_shim"


def programs_dir() -> Path:
    # programs/ sits beside the package in the repository (editable install).
    return _PKG.parent / "programs"
