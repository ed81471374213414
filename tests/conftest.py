from __future__ import annotations

import pytest
from doubles import FakeSGLang, build_tokenizer
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
