"""The Python API.

    backend = relaygen_sgl.connect(preset="cpu-tiny")        # any @sgl.function runs on it
    state = my_program.run(question=..., backend=backend)

    with relaygen_sgl.Relay(preset="cpu-tiny") as r:          # the bundled relay program
        result = r.run("What is 2 + 3?", max_tokens=512)
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

from relaygen_sgl.client.http import ClientConfig, EngineClient
from relaygen_sgl.client.tokenizer import check_same_vocabulary, load_tokenizer
from relaygen_sgl.core.config import ROLES, load_family, load_preset, load_settings, sglang_api_key
from relaygen_sgl.core.cues import CueProfile, load_profile
from relaygen_sgl.core.errors import (
    ConfigError,
    DoesNotFit,
    EngineFailed,
    EngineUnreachable,
    RelayAborted,
    RelayGenError,
)
from relaygen_sgl.core.result import RelayResult
from relaygen_sgl.core.run_settings import DEFAULT_BUDGET, DEFAULT_PREFETCH, RunSettings
from relaygen_sgl.core.state import read_state, role_urls
from relaygen_sgl.loader import accepts, load_program
from relaygen_sgl.runtime.backend import RelayBackend
from relaygen_sgl.runtime.pairing import (
    SmallDown,
    check_preset,
    default_preset,
    detect,
    expected_model,
    same_model,
    served_models,
)
from relaygen_sgl.runtime.plan import RelayPlan, RunControl
from relaygen_sgl.runtime.prefetch import PrefetchRule
from relaygen_sgl.runtime.trajectory import KEY


def resolve_urls(preset_name: str | None, large: str | None, small: str | None) -> dict[str, str]:
    """Explicit URLs win; then the servers `relaygen up` recorded for this preset; then
    the preset's ports on localhost. With no preset both URLs must be given."""
    urls: dict[str, str] = {}
    if preset_name is not None:
        preset = load_preset(preset_name)
        urls = {"large": preset.url("large"), "small": preset.url("small")}
        state = read_state(load_settings())
        if state and state.get("preset") == preset_name:
            urls.update(role_urls(state))
    if large:
        urls["large"] = large
    if small:
        urls["small"] = small
    missing = [r for r in ROLES if r not in urls]
    if missing:
        raise ConfigError(f"no URL for the {' and '.join(missing)} server: give --{missing[0]} URL or --preset")
    return urls


def _small_at_start(engines: dict[str, EngineClient], urls: dict[str, str], on_small_failure: str) -> str | None:
    """None when the small server answers. When it does not: with on_small_failure "fail"
    one line and no relay; with "large" why not, and the relay starts degraded (the large
    model alone) as a run whose small server failed mid-way goes on."""
    if engines["small"] is engines["large"]:
        return None
    try:
        engines["small"].model_info()
        return None
    except (EngineUnreachable, EngineFailed) as e:
        if on_small_failure == "fail":
            raise type(e)(f"the small server does not answer ({e}); start it (`relaygen up --preset NAME` restarts "
                          "what is down) or give --on-small-failure large to run on the large model alone",
                          url=e.url, status=e.status) from None
        return f"down at start: {e}"


def _small_back(engine: EngineClient, spec: Any) -> bool:
    """The small server answers a one-token generation and, with a preset, serves its small model."""
    if not engine.health(10.0):
        return False
    if spec is None:
        return True
    info = engine.model_info()
    return same_model(str(info.get("model_path") or info.get("served_model_name") or ""),
                      expected_model(spec, "small"))


def _server_info(engine: EngineClient) -> dict[str, Any]:
    """The server's /server_info ({} where it does not answer, e.g. behind a router)."""
    try:
        info = engine.server_info()
    except RelayGenError:
        return {}
    return info if isinstance(info, dict) else {}


def _dp_size(info: dict[str, Any]) -> int:
    """The server's --dp (1 where it does not say)."""
    try:
        return int(info.get("dp_size") or 1)
    except (ValueError, TypeError):
        return 1


def _speculative(info: dict[str, Any], preset: Any, role: str) -> bool:
    """Whether a server decodes speculatively: its /server_info says, else the preset's args."""
    if "speculative_algorithm" in info:
        return info["speculative_algorithm"] not in (None, "", "NONE")
    return preset is not None and "--speculative-algorithm" in preset.roles[role].args


def connect(*, preset: str | None = None, large: str | None = None, small: str | None = None,
            profile: str | CueProfile | None = None, family: str | None = None,
            client: ClientConfig = ClientConfig(), transport: Any = None,
            on_small_failure: str = "large", prefetch: str = DEFAULT_PREFETCH) -> RelayBackend:
    """The routing backend over two servers, for `sgl.set_default_backend(...)` or
    `prog.run(..., backend=...)`. With a preset (or no URLs: the preset `relaygen up`
    recorded, else cpu-tiny) the served models are checked against it; with only URLs the
    preset, family and shipped cue profile are picked from what the servers serve.
    `prefetch` is the mode of runs that set none (auto | on | off)."""
    if profile is not None and not isinstance(profile, CueProfile):
        profile = load_profile(profile)  # a bad profile is refused before any server is asked
    name = preset if preset is not None or (large and small) else default_preset()
    urls = resolve_urls(name, large, small)
    client = client if client.api_key is not None else dataclasses.replace(client, api_key=sglang_api_key())
    engines = {"large": EngineClient(urls["large"], client, transport)}
    engines["small"] = engines["large"] if urls["small"] == urls["large"] else EngineClient(urls["small"], client,
                                                                                             transport)
    small_error = _small_at_start(engines, urls, on_small_failure)
    down = frozenset({"small"} if small_error else ())
    spec, fam, prof = _pair(name, engines, urls, down, profile, family)
    paths = {role: None if role in down else e.model_info().get("tokenizer_path") for role, e in engines.items()}
    if not paths["large"]:
        raise ConfigError(f"{urls['large']} did not report its tokenizer path")
    tokenizer = load_tokenizer(paths["large"])
    check_same_vocabulary(tokenizer, load_tokenizer(paths["small"] or paths["large"]))
    infos = {role: _server_info(e) for role, e in engines.items() if role not in down}
    for role in infos:  # read now: a run must not wait on an info call to a server that stalls later
        _ = engines[role].limits
    small_down = SmallDown(small_error, lambda: _small_back(engines["small"], spec)) if small_error else None
    backend = RelayBackend(engines, tokenizer, fam, prof, on_small_failure=on_small_failure,
                           dp_sizes={role: _dp_size(info) for role, info in infos.items()},
                           prefetch=prefetch, prefetch_rule=PrefetchRule.of(spec),
                           speculative=[urls[role] for role, info in infos.items() if _speculative(info, spec, role)],
                           preset=spec, small_down=small_down)
    # A failed turn reaches the caller as a typed exception carrying the partial result;
    # SGLang's worker thread would also print its traceback as a warning.
    warnings.filterwarnings("ignore", message=r"Error in stream_executor:(?s:.*)relaygen_sgl\.core\.errors\.")
    return backend


def _pair(name: str | None, engines: dict[str, EngineClient], urls: dict[str, str], down: frozenset[str],
          profile: CueProfile | None, family: str | None) -> tuple[Any, Any, CueProfile]:
    """The preset, family and cue profile of the servers: the named preset's, checked against
    what they serve, or the ones detected from it."""
    served = served_models(engines, down)
    if name is not None:
        spec = load_preset(name)
        check_preset(spec, served, urls)
        return spec, load_family(family or spec.family), profile or load_profile(spec.profile)
    found = detect(served)
    if profile is None and found.profile is None:
        raise ConfigError(f"no shipped cue profile fits these servers (large {served['large']!r}, small "
                          f"{served['small']!r}); give --profile NAME|PATH (`relaygen calibrate` makes one)")
    prof = profile or found.profile
    return found.preset, (load_family(family) if family else found.family), (
        prof if isinstance(prof, CueProfile) else load_profile(prof))


def close(backend: RelayBackend) -> None:
    for engine in backend.servers.values():
        engine.close()


class Relay:
    """The routing backend plus the bundled programs; reusable and thread-safe."""

    def __init__(self, *, preset: str | None = None, large: str | None = None, small: str | None = None,
                 profile: str | CueProfile | None = None, family: str | None = None,
                 client: ClientConfig = ClientConfig(), transport: Any = None,
                 on_small_failure: str = "large", prefetch: str = DEFAULT_PREFETCH) -> None:
        self.backend = connect(preset=preset, large=large, small=small, profile=profile, family=family,
                               client=client, transport=transport, on_small_failure=on_small_failure,
                               prefetch=prefetch)

    # what jobs (bench, calibrate, serve) read; the backend owns them
    engines = property(lambda self: self.backend.engines)
    tokenizer = property(lambda self: self.backend.tokenizer)
    family = property(lambda self: self.backend.family)
    profile = property(lambda self: self.backend.profile)
    urls = property(lambda self: self.backend.urls)
    preset = property(lambda self: self.backend.preset)

    @property
    def small_down(self) -> str | None:
        """Why the small server is down, while runs start degraded (it did not answer at start)."""
        down = self.backend.small_down
        return down.error if down is not None and not down.back else None

    def close(self) -> None:
        close(self.backend)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def plan(self, method: str | None = None, settings: RunSettings | None = None, **kwargs: Any) -> RelayPlan:
        """A run's plan, as `run` would make it (settings whole or as keyword arguments)."""
        return self.backend.plan(RunSettings.given(settings, kwargs, **({"method": method} if method else {})))

    def run(self, question: str | list[dict[str, str]], method: str | None = None, *,
            settings: RunSettings | None = None, on_delta: Any = None, cancel: threading.Event | None = None,
            **kwargs: Any) -> RelayResult:
        """One relay (method relay) or one-model baseline (single-large, single-small). The
        run's settings come as `settings` or as keyword arguments (core/run_settings.py:
        max_tokens, answer_role, temperature, top_p, top_k, seed, cue_match, prefetch,
        protocol, answer_reserve, deadline_s, profile ...). `on_delta(role, text)` hears the
        text as it is written; a set `cancel` stops the run."""
        settings = RunSettings.given(settings, kwargs, **({"method": method} if method else {}))
        control = RunControl(on_delta, cancel or threading.Event())
        with _deadline(settings, control):
            plan = self.backend.plan(settings, control)
            result = self._run(load_program(settings.method), {"question": question, "plan": plan})
        if not isinstance(result, RelayResult):
            raise RelayAborted(f"the program {settings.method} returned no RelayResult")
        return result

    def run_program(self, program: str | Any, arguments: dict[str, Any], settings: RunSettings | None = None,
                    **kwargs: Any) -> dict[str, Any]:
        """Any program (a bundled name, a .py path or an SglFunction) as one JSON-ready record:
        its trajectory's result, then what it returned (a dict's keys, else under "output")."""
        func = load_program(program) if isinstance(program, str) else program
        args = {k: v for k, v in arguments.items() if accepts(func, k)}
        settings = RunSettings.given(settings, kwargs)
        control = RunControl()
        with _deadline(settings, control):
            if accepts(func, "plan"):
                args["plan"] = self.backend.plan(settings, control)
            value, state = self._run(func, args, with_state=True)
        record = self._state_result(state).to_dict(token_ids=False)
        if isinstance(value, RelayResult):
            record.update(value.to_dict(token_ids=False))
        elif isinstance(value, dict):
            record.update(value)
        elif value is not None:
            record["output"] = value
        return record

    def _state_result(self, state: Any) -> RelayResult:
        traj = state.stream_executor.variables.get(KEY)
        if traj is None:
            return RelayResult("program", "", [], [], _empty_stats())
        traj.absorb(state.stream_executor.text_)
        return traj.result("program", "done", self.family.think_end)

    def _run(self, func: Any, args: dict[str, Any], with_state: bool = False) -> Any:
        state = func.run(backend=self.backend, **args)
        error = state.error()
        if isinstance(error, DoesNotFit):  # refused before any request: a setting to change, nothing lost
            raise error
        if error is not None:  # a plain program's failed gen (the relay loop raises its own)
            traj = state.stream_executor.variables.get(KEY)
            partial = traj.result("program", "error", self.family.think_end) if traj is not None else None
            what = str(error) if isinstance(error, RelayGenError) else f"{type(error).__name__}: {error}"
            raise RelayAborted(f"the program failed: {what}", partial=partial) from error
        return (state.ret_value, state) if with_state else state.ret_value

    def stream(self, question: str | list[dict[str, str]], method: str | None = None,
               **kwargs: Any) -> Iterator[tuple[str, Any]]:
        """Yield (role, text delta) as tokens arrive, across switches; the last item is
        ("result", RelayResult). An item ("rerouted", text) says the small server failed
        mid-turn: `text`, already yielded, is void, and the large model's version follows; an
        item ("inserted", text) is text the relay wrote itself (the "</think>" closing thinking).
        Closing the generator (or dropping it) before its end stops the run: its SGLang
        requests are aborted, as when a `cancel` event is set."""
        q: queue.Queue = queue.Queue()
        done = object()
        cancel = kwargs.pop("cancel", None) or threading.Event()

        def work() -> None:
            try:
                q.put(("result", self.run(question, method, on_delta=lambda r, d: q.put((r, d)), cancel=cancel,
                                          **kwargs)))
            except BaseException as e:  # handed to the consumer, raised there
                q.put(("error", e))
            finally:
                q.put(done)

        threading.Thread(target=work, daemon=True).start()
        ended = False
        try:
            while (item := q.get()) is not done:
                if item[0] == "error":
                    ended = True
                    raise item[1]
                yield item
            ended = True
        finally:
            if not ended:  # closed or collected part way (GeneratorExit): nobody listens any more
                cancel.set()


@contextlib.contextmanager
def _deadline(settings: RunSettings, control: RunControl) -> Iterator[None]:
    """Past the settings' deadline the run stops as a cancelled one (its SGLang requests aborted)."""
    if settings.deadline_s is None:
        yield
        return
    control.deadline = time.monotonic() + settings.deadline_s  # no read waits past it
    timer = threading.Timer(settings.deadline_s, control.cancel.set)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _empty_stats() -> Any:
    from relaygen_sgl.core.result import compute_stats

    return compute_stats([], 0.0, 0.0, 0, "done")


def relay(question: str, *, large: str | None = None, small: str | None = None, preset: str | None = None,
          profile: str | CueProfile | None = None, method: str | None = None, **kwargs: Any) -> RelayResult:
    """One relay (or single-model) run; kwargs are run settings (core/run_settings.py)."""
    with Relay(preset=preset, large=large, small=small, profile=profile) as r:
        return r.run(question, method, **kwargs)


def stream_relay(question: str, *, large: str | None = None, small: str | None = None,
                 preset: str | None = None, profile: str | CueProfile | None = None,
                 method: str | None = None, **kwargs: Any) -> Iterator[tuple[str, Any]]:
    with Relay(preset=preset, large=large, small=small, profile=profile) as r:
        yield from r.stream(question, method, **kwargs)


__all__ = ["ROLES", "DEFAULT_BUDGET", "Relay", "RunSettings", "connect", "relay", "stream_relay", "resolve_urls"]
