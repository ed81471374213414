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


STREAM_MODES = ("incremental", "cumulative")


def pytest_generate_tests(metafunc):
    """Tests on the SGLang double run in the presets' stream mode (--incremental-streaming-output:
    deltas); a module that tests the stream parser itself sets `STREAM_MODES = "both"` and runs
    each test in both modes (deltas, and the whole output so far in every chunk)."""
    if "fake" in metafunc.fixturenames:
        both = getattr(metafunc.module, "STREAM_MODES", None) == "both"
        metafunc.parametrize("stream_mode", STREAM_MODES if both else STREAM_MODES[:1])


@pytest.fixture
def fake(stream_mode, tiny_tokenizer) -> FakeSGLang:
    """The SGLang double in the test's stream mode (see pytest_generate_tests)."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_tokenizer).eos_token_id
    return FakeSGLang(tiny_tokenizer, eos_id=eos, incremental=stream_mode == "incremental")


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
