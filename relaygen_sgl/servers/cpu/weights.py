"""One copy of the weights for every CPU server that loads the same checkpoint.

cpu-tiny serves one checkpoint in both roles, so two servers each stream their own 540 MB fp32
copy through one memory bus at every decode step. Here each server, once SGLang has loaded its
model, moves its parameters into a file in /dev/shm named by a hash of their bytes, mapped
shared: the first server writes it, the next maps the same pages. Whether that helps is
measured, not assumed (docs/cpu.md, "One copy of the weights"); the CPU servers get it as
relaygen_sgl.servers.cpu.patches says.

The file is published with a hard link, so a server maps only a complete file and two servers
starting at once end up on one inode. `relaygen down` removes it with the servers' other
/dev/shm files once no live process maps it (servers/processes.py).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

SHM = Path("/dev/shm")
PREFIX = "relaygen-weights-"
ALIGN = 64  # bytes: each tensor starts on a cache line


def _tensors(model: Any) -> list[Any]:
    """The model's parameters, each once (tied weights are one tensor), in a fixed order."""
    seen: set[int] = set()
    out = []
    for _, p in model.named_parameters(remove_duplicate=True):
        if p.data.data_ptr() not in seen and p.device.type == "cpu" and p.numel():
            seen.add(p.data.data_ptr())
            out.append(p)
    return out


def _layout(tensors: list[Any]) -> tuple[list[int], int]:
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return offsets, end


def _key(tensors: list[Any]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.data.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def share(model: Any, folder: Path = SHM) -> Path | None:
    """Put `model`'s parameters in the shared file for their bytes; returns it (None: nothing to share)."""
    import torch

    tensors = _tensors(model)
    if not tensors:
        return None
    offsets, size = _layout(tensors)
    path = folder / f"{PREFIX}{_key(tensors)}"
    if not path.exists():
        tmp = folder / f"{path.name}.{os.getpid()}.tmp"
        with tmp.open("wb") as f:
            for t, off in zip(tensors, offsets, strict=True):
                f.seek(off)
                f.write(t.data.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            f.truncate(size)
        try:
            os.link(tmp, path)  # only a complete file is ever at `path`; a second writer loses, harmlessly
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    mapped = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)
    for t, off in zip(tensors, offsets, strict=True):
        n = t.numel() * t.element_size()
        t.data = mapped[off:off + n].view(t.dtype).view(t.shape)
    return path


def shared_copy(original: Any) -> Any:
    """A drop-in for SGLang's `ModelRunner.load_model`: the model loads as SGLang loads it, then
    its CPU parameters move into the shared copy."""

    @functools.wraps(original)
    def load_model(self: Any) -> None:
        original(self)
        if getattr(self, "device", "cpu") == "cpu":
            share(self.model)

    return load_model
