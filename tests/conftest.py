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


@pytest.fixture
def fake(tiny_tokenizer) -> FakeSGLang:
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_tokenizer).eos_token_id
    return FakeSGLang(tiny_tokenizer, eos_id=eos)
