"""Where the built models live for tests (shared read-only between test homes)."""

from __future__ import annotations

import os
from pathlib import Path

REAL_HOME = Path(os.environ.get("RELAYGEN_HOME") or Path.home() / ".cache" / "relaygen")
REAL_MODELS = Path(os.environ.get("RELAYGEN_MODELS") or REAL_HOME / "models")
