"""Every environment variable the project reads, in one typed place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    home: Path
    models_override: Path | None = None

    @property
    def models_dir(self) -> Path:
        return self.models_override or self.home / "models"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "stack.json"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"


def load_settings() -> Settings:
    home = os.environ.get("RELAYGEN_HOME") or str(Path.home() / ".cache" / "relaygen")
    models = os.environ.get("RELAYGEN_MODELS")  # share built models between homes (tests)
    return Settings(home=Path(home).expanduser(), models_override=Path(models).expanduser() if models else None)
