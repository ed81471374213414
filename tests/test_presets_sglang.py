"""Every preset's server command line, parsed by SGLang 0.5.23's own server argument parser:
a GPU preset that was never started still cannot carry a flag SGLang does not know, a value
outside its choices, or a malformed number."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from relaygen_sgl.core.config import ROLES, Settings, load_preset, preset_names
from relaygen_sgl.servers.launch import server_command


def _sglang_parser() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(prog="sglang serve", exit_on_error=False)
    ServerArgs.add_cli_args(parser)
    return parser


@pytest.mark.parametrize("name", preset_names())
@pytest.mark.parametrize("role", ROLES)
def test_every_preset_parses_with_sglangs_own_parser(name, role, tmp_path):
    preset = load_preset(name)
    cmd = server_command(preset, role, Settings(home=tmp_path))
    argv = list(cmd.argv)
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = _sglang_parser().parse_args(argv[3:])
    except (SystemExit, argparse.ArgumentError) as e:
        pytest.fail(f"{name}.{role}: SGLang refuses {argv[3:]}: {e} {err.getvalue()[-300:]}")
    assert ns.port == preset.roles[role].port
    assert not ns.disable_radix_cache  # the relay needs the radix cache on
    if ns.speculative_algorithm is not None:  # validated past argparse, by the same name lookup SGLang does
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        SpeculativeAlgorithm.from_string(ns.speculative_algorithm)
        assert ns.speculative_draft_model_path, f"{name}.{role}: a speculative server needs its draft model"


def test_the_parser_does_refuse_what_sglang_would():
    parser = _sglang_parser()
    with pytest.raises((SystemExit, argparse.ArgumentError)), contextlib.redirect_stderr(io.StringIO()):
        parser.parse_args(["--model-path", "m", "--attention-backend", "no_such_backend"])
    with pytest.raises((SystemExit, argparse.ArgumentError)), contextlib.redirect_stderr(io.StringIO()):
        parser.parse_args(["--model-path", "m", "--no-such-flag"])
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    with pytest.raises((ValueError, KeyError)):
        SpeculativeAlgorithm.from_string("EAGLE9")


@pytest.mark.parametrize("name", [n for n in preset_names() if load_preset(n).share_device])
def test_the_sized_one_gpu_commands_parse_and_say_what_the_memory_plan_read(name, tmp_path, monkeypatch):
    """The commands `up` runs on a shared GPU (with the plan's --mem-fraction-static and
    --max-total-tokens) parse with SGLang's parser, and SGLang reads the flags the memory plan
    sized them by (servers.memory.shape) as the plan did."""
    from relaygen_sgl.servers import memory
    from relaygen_sgl.servers.launch import launch_plan

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr("relaygen_sgl.servers.launch.gpu_memory", lambda *a, **k: {})
    preset = load_preset(name)
    plan = launch_plan(preset, Settings(home=tmp_path))
    for p in plan.processes:
        ns = _sglang_parser().parse_args(list(p.command.argv[3:]))
        s = memory.shape(preset, p.role)
        assert ns.mem_fraction_static == p.memory.fraction and ns.max_total_tokens == p.memory.kv_tokens
        assert (ns.context_length, ns.max_running_requests, ns.chunked_prefill_size, ns.cuda_graph_max_bs_decode,
                ns.tp_size) == (s.context, s.max_running_requests, s.chunked_prefill, s.decode_max_bs, s.tp)
        assert ns.dtype == "bfloat16" and s.dtype_bytes == 2 and ns.kv_cache_dtype == "auto"
