"""The routing runtime: an SGLang frontend backend that sends each gen to one of two servers.

The program picks the role (`s["route"] = {"role": ...}`) before each `sgl.gen`; this
backend keeps each program's trajectory as token ids, tokenizes only the text the
program itself adds, and hands the receiving server exactly the ids the models wrote,
so its radix cache already holds the whole shared prefix.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any

from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.chat_template import ChatTemplate, ChatTemplateStyle
from sglang.lang.interpreter import StreamExecutor
from sglang.lang.ir import SglSamplingParams

from .engine import EngineClient
from .errors import ConfigError, EngineFailed, EngineRejected, EngineUnreachable, RelayGenError
from .tokenizer import Tokenizer
from .turn import TurnSpec, run_turn

# The program writes the model's chat template itself; the interpreter must add nothing
# (its own templates would also append their stop strings to every gen).
_RAW = ChatTemplate(name="raw", default_system_prompt=None,
                    role_prefix_and_suffix={"system": ("", ""), "user": ("", ""), "assistant": ("", "")},
                    stop_str=(), style=ChatTemplateStyle.PLAIN)


@dataclass
class _Ledger:
    ids: list[int] = field(default_factory=list)
    consumed: int = 0  # characters of s.text_ already in `ids`
    prompt_len: int | None = None
    degraded: dict[str, Any] | None = None  # set once the small server failed
    slot: int = 0  # this trajectory's data-parallel rank seed (stable for its whole life)


FALLBACKS = ("large", "fail")


class RelayBackend(BaseBackend):
    def __init__(self, engines: dict[str, EngineClient], tokenizer: Tokenizer, on_small_failure: str = "large",
                 dp_sizes: dict[str, int] | None = None) -> None:
        super().__init__()
        # With in-server --dp, each trajectory is pinned to one DP rank per role (SGLang's
        # routed_dp_rank): the rank's radix cache then holds the whole shared prefix.
        self.dp_sizes = {r: n for r, n in (dp_sizes or {}).items() if n > 1}
        self._next_slot = 0
        if on_small_failure not in FALLBACKS:
            raise ConfigError(f"on_small_failure must be one of {FALLBACKS}, got {on_small_failure!r}")
        self.on_small_failure = on_small_failure
        self.engines = engines
        self.tokenizer = tokenizer
        self.chat_template = _RAW
        self._ledgers: dict[str, _Ledger] = {}
        self._lock = threading.Lock()

    def get_chat_template(self) -> ChatTemplate:
        return _RAW

    def get_model_name(self) -> str:
        return "relaygen"

    def begin_program(self, s: StreamExecutor) -> None:
        self._ledger(s)

    def end_program(self, s: StreamExecutor | list[StreamExecutor]) -> None:
        with self._lock:
            for one in s if isinstance(s, list) else [s]:
                self._ledgers.pop(one.sid, None)

    def _ledger(self, s: StreamExecutor) -> _Ledger:
        with self._lock:
            if s.sid not in self._ledgers:
                self._ledgers[s.sid] = _Ledger(slot=self._next_slot)
                self._next_slot += 1
            return self._ledgers[s.sid]

    def _pin(self, role: str, ledger: _Ledger) -> dict[str, Any]:
        n = self.dp_sizes.get(role)
        return {"routed_dp_rank": ledger.slot % n} if n else {}

    def generate(self, s: StreamExecutor, sampling_params: SglSamplingParams, spec_var_name: str | None = None):
        """Run one turn. Errors come back inside meta_info: raised here they would only be
        printed by the interpreter's worker thread, and the program could not attach the
        partial trajectory to them."""
        try:
            return self._generate(s, sampling_params)
        except RelayGenError as e:
            return "", {"error": e}

    def _generate(self, s: StreamExecutor, sp: SglSamplingParams) -> tuple[str, dict[str, Any]]:
        route = s.variables.get("route") or {}
        role = route.get("role")
        if role not in self.engines:
            raise ConfigError(f"the program routed a gen to unknown role {role!r}")
        ledger = self._ledger(s)
        text = s.text_
        added = text[ledger.consumed:]
        inserted = self.tokenizer.encode(added) if added else []
        ledger.ids.extend(inserted)
        ledger.consumed = len(text)
        if ledger.prompt_len is None:
            ledger.prompt_len = len(ledger.ids)

        sampling: dict[str, Any] = {"temperature": sp.temperature, "top_p": sp.top_p, "top_k": sp.top_k}
        if route.get("seed") is not None:
            sampling["sampling_seed"] = int(route["seed"])
        stop = tuple([sp.stop] if isinstance(sp.stop, str) else (sp.stop or ()))
        regex = tuple([sp.stop_regex] if isinstance(sp.stop_regex, str) else (sp.stop_regex or ()))
        spec = TurnSpec(role=role, max_tokens=int(sp.max_new_tokens), stop=stop, cue_patterns=regex,
                        min_tokens=int(sp.min_new_tokens or 0), sampling=sampling, extra=self._pin(role, ledger))
        prefix_len = len(ledger.ids)
        ctx = self.engines[role].context_length
        if ctx is not None and (ledger.prompt_len or 0) >= ctx:
            # what SGLang itself would refuse; the context clamp in run_turn must not hide it
            raise EngineRejected(f"the input ({ledger.prompt_len} tokens) is longer than the model's context "
                                 f"length ({ctx} tokens)", url=self.engines[role].url, status=400)
        sink = s.arguments.get("on_delta")
        if role == "small" and ledger.degraded:
            turn = replace(run_turn(self.engines["large"], self.tokenizer, ledger.ids, text,
                                    replace(spec, role="large", extra=self._pin("large", ledger)), sink=sink),
                           rerouted_from="small")
        else:
            try:
                turn = run_turn(self.engines[role], self.tokenizer, ledger.ids, text, spec, sink=sink)
            except (EngineUnreachable, EngineFailed) as e:
                if role != "small" or self.on_small_failure == "fail":
                    raise
                # The small server is gone: the large model goes on alone from the same prefix.
                ledger.degraded = {"role": "small", "from_token": prefix_len - (ledger.prompt_len or 0),
                                   "error": str(e)}
                turn = replace(run_turn(self.engines["large"], self.tokenizer, ledger.ids, text,
                                        replace(spec, role="large", extra=self._pin("large", ledger)), sink=sink),
                           rerouted_from="small")
        ledger.ids.extend(turn.ids)
        ledger.consumed = len(text) + len(turn.text)
        return turn.text, {"turn": turn, "inserted_ids": inserted, "prefix_len": prefix_len,
                           "degraded": ledger.degraded}
