"""The Python API: a `Relay` bound to two servers, and the one-call `relay()` / `stream_relay()`."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from .backend import RelayBackend
from .config import load_family, load_preset, load_settings
from .cues import CueProfile, load_profile
from .engine import ClientConfig, EngineClient
from .errors import ConfigError, RelayAborted, RelayGenError
from .policy import DEFAULT_BUDGET, RelayPlan
from .programs import load_program
from .result import RelayResult
from .stack import read_state, role_urls
from .tokenizer import check_same_vocabulary, load_tokenizer


def resolve_urls(preset_name: str, large: str | None, small: str | None) -> dict[str, str]:
    """Explicit URLs win; then the servers `relaygen up` recorded for this preset; then
    the preset's ports on localhost."""
    preset = load_preset(preset_name)
    urls = {"large": preset.url("large"), "small": preset.url("small")}
    state = read_state(load_settings())
    if state and state.get("preset") == preset_name:
        urls.update(role_urls(state))
    if large:
        urls["large"] = large
    if small:
        urls["small"] = small
    return urls


def _dp_size(engine: EngineClient) -> int:
    """The server's --dp (1 where it does not say, e.g. behind a router)."""
    try:
        return int(engine.server_info().get("dp_size") or 1)
    except (RelayGenError, ValueError, TypeError):
        return 1


class Relay:
    """Two SGLang servers, one tokenizer, one routing backend; reusable and thread-safe."""

    def __init__(self, *, preset: str = "cpu-tiny", large: str | None = None, small: str | None = None,
                 profile: str | CueProfile | None = None, family: str | None = None,
                 client: ClientConfig = ClientConfig(), transport: Any = None,
                 on_small_failure: str = "large") -> None:
        self.preset = load_preset(preset)
        self.family = load_family(family or self.preset.family)
        self.profile = profile if isinstance(profile, CueProfile) else load_profile(profile or self.preset.profile)
        self.urls = resolve_urls(preset, large, small)
        shared = self.urls["large"] == self.urls["small"]
        self.engines = {"large": EngineClient(self.urls["large"], client, transport)}
        self.engines["small"] = (self.engines["large"] if shared
                                 else EngineClient(self.urls["small"], client, transport))
        paths = {role: e.model_info().get("tokenizer_path") for role, e in self.engines.items()}
        if not paths["large"]:
            raise ConfigError(f"{self.urls['large']} did not report its tokenizer path")
        self.tokenizer = load_tokenizer(paths["large"])
        check_same_vocabulary(self.tokenizer, load_tokenizer(paths["small"] or paths["large"]))
        self.backend = RelayBackend(self.engines, self.tokenizer, on_small_failure,
                                    dp_sizes={role: _dp_size(e) for role, e in self.engines.items()})

    def close(self) -> None:
        for e in set(self.engines.values()):
            e.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def plan(self, method: str = "relay", *, max_tokens: int = DEFAULT_BUDGET, answer_role: str = "small",
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             seed: int | None = None) -> RelayPlan:
        sampling = dict(self.family.sampling)
        for key, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)):
            if value is not None:
                sampling[key] = value
        return RelayPlan(method=method, profile=self.profile, family=self.family,
                         tokenizer_path=self.tokenizer.path, budget=max_tokens, answer_role=answer_role,
                         sampling=sampling, seed=seed)

    def run(self, question: str, method: str = "relay", *, program: str | None = None,
            on_delta: Any = None, **plan_kwargs: Any) -> RelayResult:
        plan = self.plan(method, **plan_kwargs)
        func = load_program(program or method)
        state = func.run(question=question, plan=plan, on_delta=on_delta, backend=self.backend)
        result = state.ret_value
        if not isinstance(result, RelayResult):
            raise RelayAborted(f"the program {program or method} returned no RelayResult")
        return result

    def stream(self, question: str, method: str = "relay", **kwargs: Any) -> Iterator[tuple[str, str]]:
        """Yield (role, text delta) as tokens arrive, across switches; the last item is
        ("result", RelayResult)."""
        q: queue.Queue = queue.Queue()
        done = object()

        def work() -> None:
            try:
                q.put(("result", self.run(question, method, on_delta=lambda r, d: q.put((r, d)), **kwargs)))
            except BaseException as e:  # handed to the consumer, raised there
                q.put(("error", e))
            finally:
                q.put(done)

        threading.Thread(target=work, daemon=True).start()
        while (item := q.get()) is not done:
            if item[0] == "error":
                raise item[1]
            yield item


def relay(question: str, *, large: str | None = None, small: str | None = None, preset: str = "cpu-tiny",
          profile: str | CueProfile | None = None, method: str = "relay", **kwargs: Any) -> RelayResult:
    """One relay (or single-model) run. kwargs: max_tokens, answer_role, temperature, top_p,
    top_k, seed."""
    with Relay(preset=preset, large=large, small=small, profile=profile) as r:
        return r.run(question, method, **kwargs)


def stream_relay(question: str, *, large: str | None = None, small: str | None = None,
                 preset: str = "cpu-tiny", profile: str | CueProfile | None = None,
                 method: str = "relay", **kwargs: Any) -> Iterator[tuple[str, str]]:
    with Relay(preset=preset, large=large, small=small, profile=profile) as r:
        yield from r.stream(question, method, **kwargs)
