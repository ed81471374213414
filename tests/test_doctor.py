"""`relaygen doctor` (issue 21 item 5): one line per check with a verdict, exit 0 when nothing
failed, 1 when something did, never a traceback. nvidia-smi is faked or absent; the smoke test
speaks SGLang's /generate wire format through an httpx transport."""

from __future__ import annotations

import json
import os
import re
import subprocess

import httpx
import pytest
from test_cli import relaygen

from relaygen_sgl.core.config import load_preset, load_settings
from relaygen_sgl.servers import doctor
from relaygen_sgl.servers.doctor import check_driver, check_gpus, smoke_test

LINE = re.compile(r"^(ok|warn|FAIL|skip) {1,3} [a-z ()0-9-]+: \S")


def _path_without_nvidia_smi(tmp_path) -> dict[str, str]:
    folder = tmp_path / "bin"
    folder.mkdir()
    keep = [p for p in os.environ["PATH"].split(os.pathsep) if not os.path.exists(os.path.join(p, "nvidia-smi"))]
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return {**env, "PATH": os.pathsep.join([str(folder), *keep])}


def test_doctor_passes_on_the_cpu_preset_here():
    from relaygen_sgl.servers.processes import port_in_use

    out = relaygen("doctor", "--preset", "cpu-tiny")
    lines = out.stdout.splitlines()
    assert all(LINE.match(line) for line in lines), lines
    names = [line.split(":")[0].split(None, 1)[1] for line in lines]
    assert names[:6] == ["preset", "python", "sglang", "torch", "cuda driver", "gpus"]
    assert {"large model", "small model", "ports", "speculative smoke test"} <= set(names)
    failed = [line for line in lines if line.startswith("FAIL")]
    if any(port_in_use(p, "127.0.0.1") for p in (30000, 30001)):  # servers someone else runs on this machine
        assert out.returncode == 1 and [f.split(":")[0] for f in failed] == ["FAIL  ports"]
    else:
        assert out.returncode == 0 and failed == [] and out.stderr == "", out.stdout + out.stderr


def test_doctor_on_a_gpu_preset_without_a_gpu_names_what_is_missing(tmp_path):
    out = subprocess.run([os.sys.executable, "-m", "relaygen_sgl.cli", "doctor", "--preset", "qwen3-32b-1.7b"],
                         capture_output=True, text=True, timeout=120, env=_path_without_nvidia_smi(tmp_path))
    assert out.returncode == 1 and "Traceback" not in out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert all(LINE.match(line) for line in lines), lines
    # the preset's ports may be taken by servers someone else runs on this machine
    failed = [line for line in lines if line.startswith("FAIL") and not line.startswith("FAIL  ports")]
    assert failed == [
        "FAIL  cuda driver: no GPU: nvidia-smi not found (no NVIDIA driver on this machine); torch is built for "
        "CUDA 13.0",
        "FAIL  gpus: no GPU: qwen3-32b-1.7b needs 3, none visible (CUDA_VISIBLE_DEVICES unset, no GPU from "
        "nvidia-smi)"]
    (tmp_path / "j").mkdir()
    js = subprocess.run([os.sys.executable, "-m", "relaygen_sgl.cli", "doctor", "--preset", "qwen3-32b-1.7b",
                         "--json"], capture_output=True, text=True, timeout=120,
                        env=_path_without_nvidia_smi(tmp_path / "j"))
    report = json.loads(js.stdout)
    assert report["ok"] is False and [c["name"] for c in report["checks"] if c["verdict"] == "FAIL"
                                      and c["name"] != "ports"] == ["cuda driver", "gpus"]


class Smi:
    """nvidia-smi's answers: the banner with the driver's CUDA version, the index list, memory."""

    def __init__(self, cuda: str = "13.0", free_mib: tuple[int, ...] = (81000,), total_mib: int = 81559) -> None:
        self.cuda, self.free, self.total = cuda, free_mib, total_mib

    def __call__(self, argv, **kwargs):
        if argv == ["nvidia-smi"]:
            out = f"| NVIDIA-SMI 580.00   Driver Version: 580.00   CUDA Version: {self.cuda}     |\n"
        elif any("memory.free" in a for a in argv):
            out = "".join(f"{i}, GPU-{i:04d}, {f}, {self.total}\n" for i, f in enumerate(self.free))
        else:
            out = "".join(f"{i}\n" for i in range(len(self.free)))
        return subprocess.CompletedProcess(argv, 0, out, "")


@pytest.mark.parametrize(("driver", "verdict"), [("13.0", "ok"), ("13.1", "ok"), ("12.8", "FAIL")])
def test_the_driver_must_support_the_cuda_torch_was_built_for(driver, verdict):
    got = check_driver(load_preset("qwen3-32b-1.7b"), "13.0", Smi(cuda=driver))
    assert got.verdict == verdict
    if verdict == "FAIL":
        assert got.detail == ("the driver supports CUDA 12.8, torch is built for CUDA 13.0: install an NVIDIA driver "
                              "for CUDA 13")
    assert check_driver(load_preset("qwen3-32b-1.7b"), None, Smi()).detail.startswith(
        "the installed torch is not a CUDA build")
    assert check_driver(load_preset("cpu-tiny"), None, Smi()).verdict == "skip"


def test_gpu_count_and_free_memory_against_the_plan(monkeypatch):
    """The gpus line gives the verdict `up --dry-run` gives on this machine (servers.memory): KV
    tokens per server and trajectories of the budget at once, FAIL where none fits."""
    from relaygen_sgl.servers.launch import devices_memory

    env: dict[str, str] = {}

    def check(preset: str, free: tuple[int, ...], total: int = 81559):
        smi = Smi(free_mib=free, total_mib=total)
        monkeypatch.setattr("relaygen_sgl.servers.gpus.subprocess.run", smi)
        return check_gpus(load_preset(preset), False, env, smi)

    ok = check("qwen3-32b-1.7b", (81000, 81000, 81000))
    assert ok.verdict == "ok" and "large 29" in ok.detail and "8 trajectories of the budget at once" in ok.detail
    short = check("qwen3-32b-1.7b", (81000, 81000, 6000))  # the small server's GPU mostly taken
    assert short.verdict == "FAIL" and "no trajectory of the budget fits (the small server holds fewer KV tokens" \
        in short.detail and "GPU 2 5.9 of 79.6 GiB free" in short.detail
    one = check("qwen3-32b-1.7b-1gpu-80gb", (81000,))
    assert one.verdict == "ok" and "1 trajectory of the budget at once" in one.detail
    from relaygen_sgl.servers.gpus import gpu_memory

    same = devices_memory(load_preset("qwen3-32b-1.7b-1gpu-80gb"), {("large", 0): ("0",), ("small", 0): ("0",)},
                          gpu_memory(Smi(free_mib=(81000,))))
    assert one.detail.endswith(same.verdict)  # the dry run's verdict, word for word
    too_few = check("qwen3-32b-1.7b", (81000,))
    assert too_few.verdict == "FAIL" and "needs 3 GPUs" in too_few.detail
    small = check("qwen3-32b-1.7b-1gpu", (81000,))  # the paper budget on an 80 GB card
    assert small.verdict == "FAIL" and "needs 83.3 GiB free on its GPU" in small.detail


def _sglang(accept: float | None):
    """/generate as a speculative SGLang server answers it (meta_info with spec_accept_length)."""
    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/generate"
        body = json.loads(request.content)
        assert body["text"] and body["sampling_params"]["max_new_tokens"] == 48
        meta = {"id": "x", "finish_reason": {"type": "length", "length": 48}, "prompt_tokens": 12,
                "completion_tokens": 48, "cached_tokens": 0, "e2e_latency": 0.2}
        if accept is not None:
            meta |= {"spec_accept_length": accept, "spec_verify_ct": 14}
        return httpx.Response(200, json={"text": " 4, 5", "output_ids": list(range(48)), "meta_info": meta})
    return httpx.MockTransport(handle)


def test_the_speculative_smoke_test_reports_the_accept_length():
    eagle = load_preset("qwen3-32b-1.7b-eagle3")
    (ok,) = smoke_test(eagle, {"large": "http://127.0.0.1:30000"}, transport=_sglang(3.43))
    assert (ok.verdict, ok.detail) == ("ok", "48 tokens, accept length 3.43 (14 verify steps)")
    (never,) = smoke_test(eagle, {"large": "http://127.0.0.1:30000"}, transport=_sglang(1.0))
    assert never.verdict == "warn" and "never accepted" in never.detail
    (off,) = smoke_test(eagle, {"large": "http://127.0.0.1:30000"}, transport=_sglang(None))
    assert off.verdict == "FAIL" and "no spec_accept_length" in off.detail
    (down,) = smoke_test(eagle, {})
    assert down.verdict == "skip" and "relaygen up --preset qwen3-32b-1.7b-eagle3" in down.detail
    assert smoke_test(load_preset("cpu-tiny"), {})[0].verdict == "skip"


def test_ports_taken_by_another_process_fail_and_a_missing_model_folder_fails(monkeypatch, tmp_path):
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        import dataclasses

        preset = load_preset("cpu-tiny")
        # both roles on the bound port: the preset's own ports may be serving on this machine
        preset = dataclasses.replace(preset, roles={role: dataclasses.replace(r, port=port)
                                                    for role, r in preset.roles.items()})
        got = doctor.check_ports(preset, set())
        assert got.verdict == "FAIL" and f"{port} (large)" in got.detail
        assert doctor.check_ports(preset, {port}).verdict == "ok"  # the preset's own running server
    monkeypatch.setenv("RELAYGEN_MODELS", str(tmp_path / "none"))
    checks = doctor.check_models(load_preset("cpu-tiny"), load_settings(), {})
    assert [c.verdict for c in checks] == ["FAIL", "FAIL"]
    assert "relaygen models fetch --preset cpu-tiny" in checks[0].detail
