"""Typed errors. The CLI turns each into one line on stderr and a non-zero exit."""

from __future__ import annotations

from typing import Any

EXIT_USAGE = 2  # bad input: a refused argument, setting or file (the CLI's exit status)


def one_line(text: object, limit: int | None = None) -> str:
    """Text as one line (newlines and runs of spaces folded), cut to `limit` characters:
    what a user sees of an error."""
    line = " ".join(str(text).split())
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


class RelayGenError(Exception):
    """Base of every error a user can cause or fix; `str(e)` is the one line shown."""

    exit_code = 1


class ConfigError(RelayGenError):
    """A preset, profile, family or argument is invalid."""

    exit_code = EXIT_USAGE


class ModelFetchError(RelayGenError):
    """A model folder could not be built or verified."""


class LaunchError(RelayGenError):
    """A server could not be started, or never became healthy."""


class StackError(RelayGenError):
    """`up`/`down`/`status` found the recorded servers in an unexpected state."""


class EngineError(RelayGenError):
    """An SGLang server failed a request."""

    def __init__(self, message: str, *, url: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class EngineUnreachable(EngineError):
    """Connection refused, reset or timed out before an answer."""


class EngineRejected(EngineError):
    """The server answered 4xx: the request itself is wrong; retrying will not help."""


class EngineFailed(EngineError):
    """The server answered 5xx or aborted the request."""


class DoesNotFit(ConfigError):
    """A run whose prompt and budget cannot fit a server's KV pool or context: refused before
    any request. `fits`: the largest budget that does (0 when the prompt alone does not)."""

    def __init__(self, message: str, fits: int = 0) -> None:
        super().__init__(message)
        self.fits = fits


class TokenizerMismatch(ConfigError):
    """Two roles use different vocabularies; token-exact handoff is impossible."""


class CalibrationError(RelayGenError):
    """Calibration cannot go on: bad input, a server without logprobs, nothing usable."""


STOPPED = "the run was stopped: cancelled by its caller or past its deadline"


class Cancelled(RelayGenError):
    """The caller stopped listening (a client went away, a deadline passed): the turn was
    stopped and its SGLang request aborted."""


class RelayAborted(RelayGenError):
    """A relay stopped part way; `partial` holds the segments finished so far."""

    def __init__(self, message: str, partial: Any = None, role: str | None = None) -> None:
        super().__init__(message)
        self.partial = partial
        self.role = role
