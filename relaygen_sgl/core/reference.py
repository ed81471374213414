"""The protocols a relay runs under: ours ("relaygen-sgl", the default) and the reference
implementation's ("reference", jiwonsong-dev/RelayGen on vLLM), and the bytes the reference
sends, read from data/reference.toml.

docs/fidelity.md lists every difference between the two, with the reference's file and line.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass
from typing import Any

from relaygen_sgl.core.config import data_path
from relaygen_sgl.core.errors import ConfigError

__all__ = ["PROTOCOLS", "DEFAULT_PROTOCOL", "REFERENCE", "check_protocol", "reference_protocol", "math_prompt",
           "gpqa_prompt", "Rendering", "rendering", "continued"]

DEFAULT_PROTOCOL = "relaygen-sgl"
REFERENCE = "reference"
PROTOCOLS = (DEFAULT_PROTOCOL, REFERENCE)


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return protocol


@functools.lru_cache(maxsize=1)
def _data() -> dict[str, Any]:
    return tomllib.loads(data_path("reference.toml").read_text(encoding="utf-8"))


def reference_protocol() -> dict[str, Any]:
    """min_large_tokens, budget, repeats, concurrency, think_close."""
    return dict(_data()["protocol"])


def math_prompt(problem: str) -> str:
    """The user message the reference sends for a MATH/AIME problem, byte for byte: its
    leading newline, 8-space indentation and the backspace where "\\boxed" was meant."""
    return _data()["prompts"]["math"].replace("{problem}", problem, 1)


def gpqa_prompt(problem: str, options: dict[str, str]) -> str:
    """The reference's GPQA user message; `options` A-D (the correct answer is its A)."""
    text = _data()["prompts"]["gpqa"].replace("{problem}", problem, 1)
    for letter in "ABCD":
        text = text.replace("{" + letter + "}", options[letter], 1)
    return text


@dataclass(frozen=True)
class Rendering:
    """How vLLM rendered the reference's chat requests with its modified templates. A relay's
    first request ends in the generation prompt after an EMPTY assistant turn; each later one
    is the user turn plus the assistant's text so far (continue_final_message); the one-model
    baseline's single request has no empty turn."""

    family: str
    user: str
    empty_assistant: str
    generation: str
    continuation: str
    assistant_prefix: str = ""  # text the assistant's message starts with (the CPU stand-in's "<think>\n")

    def _user(self, content: str) -> str:
        return self.user.replace("{content}", content, 1)

    def first_prompt(self, content: str, relay: bool = True) -> str:
        return (self._user(content) + (self.empty_assistant if relay else "") + self.generation
                + self.assistant_prefix)

    def content_of(self, prompt: str, relay: bool = True) -> str | None:
        """The user message inside a first prompt (None: not this rendering's)."""
        head, _, tail = self.user.partition("{content}")
        tail += (self.empty_assistant if relay else "") + self.generation + self.assistant_prefix
        if len(prompt) < len(head) + len(tail) or not (prompt.startswith(head) and prompt.endswith(tail)):
            return None
        return prompt[len(head): len(prompt) - len(tail)]

    def continuation_prompt(self, content: str, completion: str) -> str:
        """A later request: the user turn, then the assistant's text so far (`completion`: what
        the models and inserts wrote after the first prompt)."""
        text = continued(self.assistant_prefix + completion)
        return self._user(content) + self.continuation + text


def continued(assistant_text: str) -> str:
    """The assistant text as transformers' apply_chat_template(continue_final_message=True)
    leaves it: it cuts the rendered chat after the message's stripped content, and keeps the
    trailing whitespace only when the message has no leading whitespace."""
    if assistant_text == assistant_text.lstrip():
        return assistant_text
    lead = assistant_text[: len(assistant_text) - len(assistant_text.lstrip())]
    return lead + assistant_text.strip()


def rendering(family: str) -> Rendering:
    templates = _data()["templates"]
    if family not in templates:
        raise ConfigError(f"--protocol reference has no rendering for model family {family!r} "
                          f"(known: {', '.join(sorted(templates))})")
    t = templates[family]
    return Rendering(family, t["user"], t["empty_assistant"], t["generation"], t["continuation"],
                     t.get("assistant_prefix", ""))
