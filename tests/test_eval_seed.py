"""`relaygen eval` samples unseeded by default, as the reference does, and seeds sample j
with S+j under --seed S; its report says which. Run on the SGLang doubles."""

from __future__ import annotations

import orjson
import pytest
from doubles import LARGE, SMALL

from relaygen_sgl.api import Relay
from relaygen_sgl.cli import commands
from relaygen_sgl.cli.main import build_parser
from relaygen_sgl.client.http import ClientConfig
from relaygen_sgl.core.cues import CueProfile

TEXT = "First we add 2 and 3 to get 5. Therefore the sum is 5. Thus, the answer is 5.</think>\n\n\\boxed{5}"


@pytest.mark.parametrize("seed", [None, 7])
def test_eval_is_unseeded_unless_asked_and_says_which(fake, tmp_path, monkeypatch, seed):
    fake.add_host(LARGE, [])
    fake.add_host(SMALL, [])

    def open_relay(args):
        profile = CueProfile(name="t", models={}, cues=("Therefore", "Thus,")).validate()
        relay = Relay(preset="cpu-tiny", large=LARGE, small=SMALL, profile=profile, family="qwen3",
                      client=ClientConfig(retries=0, backoff_s=0.0), transport=fake.transport)
        tape = relay.tokenizer.encode(TEXT * 40) + [fake.eos_id]
        for host in fake.hosts.values():
            host.tape = list(tape)
        return relay

    monkeypatch.setattr(commands, "open_relay", open_relay)
    out = tmp_path / "eval"
    argv = ["eval", "--dataset", "amc23", "--limit", "1", "--k", "2", "--max-tokens", "24", "--temperature", "0.6",
            "--out", str(out), "--no-progress", *(["--seed", str(seed)] if seed is not None else [])]
    args = build_parser().parse_args(argv)
    args.func(args)
    records = [orjson.loads(line) for line in (out / "relay.jsonl").read_bytes().splitlines()]
    sent = [r["sampling_params"].get("sampling_seed") for h in fake.hosts.values() for r in h.requests
            if r["sampling_params"].get("max_new_tokens")]
    report = orjson.loads((out / "report.json").read_bytes())
    md = (out / "report.md").read_text()
    if seed is None:
        assert [r["seed"] for r in records] == [None, None] and set(sent) == {None}
        assert report["seeded"] is False and "; unseeded" in md
    else:
        assert sorted(r["seed"] for r in records) == [7, 8] and set(sent) == {7, 8}
        assert report["seeded"] is True and report["seed"] == 7 and "seeded (seeds 7..8)" in md
