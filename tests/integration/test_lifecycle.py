"""up/status/down on real servers, and the /generate facts the relay is built on."""

from __future__ import annotations

import pytest

from relaygen_sgl.client.http import EngineClient
from relaygen_sgl.servers import stack

pytestmark = pytest.mark.integration


def test_status_reports_both_servers_healthy(cpu_pair):
    st = stack.status(cpu_pair.settings)
    for role in ("large", "small"):
        assert st[role]["healthy"] is True
        assert st[role]["url"] == getattr(cpu_pair, role)
        assert st[role]["pid"] in cpu_pair.pids


def test_generate_returns_text_and_token_accounting(cpu_pair):
    with EngineClient(cpu_pair.large) as eng:
        info = eng.model_info()
        from relaygen_sgl.client.tokenizer import load_tokenizer

        tok = load_tokenizer(info["tokenizer_path"])
        ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 20)
        first = eng.generate(ids, {"max_new_tokens": 4, "temperature": 0})
        second = eng.generate(ids, {"max_new_tokens": 4, "temperature": 0})
    assert first.text and len(first.output_ids) == first.completion_tokens == 4
    assert first.prompt_tokens == second.prompt_tokens == len(ids)
    # the radix cache: the same long prompt again is served from cache but for one token
    assert second.cached_tokens > first.cached_tokens
    assert second.cached_tokens == len(ids) - 1
    assert second.output_ids == first.output_ids
