from __future__ import annotations

import pytest
from doubles import ANSWER, LARGE, QUESTION, SMALL, FakeSGLang, build_tokenizer
from paths import REAL_MODELS


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every test gets its own RELAYGEN_HOME; built models are shared read-only."""
    monkeypatch.setenv("RELAYGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RELAYGEN_MODELS", str(REAL_MODELS))
    yield


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> str:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(params=[True, False], ids=["incremental", "cumulative"])
def fake(request, tiny_tokenizer) -> FakeSGLang:
    """The SGLang double, once with --incremental-streaming-output (deltas) and once
    without (the whole output so far in every chunk): every test on it runs with both."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_tokenizer).eos_token_id
    return FakeSGLang(tiny_tokenizer, eos_id=eos, incremental=request.param)


@pytest.fixture
def backend(fake):
    """connect() on the doubles (qwen3 family, no prefetch, no retries), both hosts reading one
    tape: QUESTION's prompt, then ANSWER and EOS."""
    from relaygen_sgl.api import close, connect
    from relaygen_sgl.client.http import ClientConfig

    for url in (LARGE, SMALL):
        fake.add_host(url, [])
    be = connect(preset="cpu-tiny", large=LARGE, small=SMALL, family="qwen3", prefetch="off",
                 client=ClientConfig(retries=0, backoff_s=0.0), transport=fake.transport)
    prompt = be.plan().render(QUESTION)
    tape = be.tokenizer.encode(prompt) + be.tokenizer.encode(ANSWER) + [fake.eos_id]
    for h in fake.hosts.values():
        h.tape = tape
    yield be
    close(be)
