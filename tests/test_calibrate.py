"""`relaygen calibrate`: the statistics on a synthetic scorer whose margins are known, the
logprob alignment on hand-written /generate answers, the bad-input errors, and one whole
run (generate, score, select, write, resume) against the protocol-faithful doubles."""

from __future__ import annotations

import math
import random

import httpx
import orjson
import pytest
from doubles import LARGE, QUESTION, SMALL

from relaygen_sgl.calibration.cache import error_messages, ok_records
from relaygen_sgl.calibration.calibrate import CalibrationPaths, CalibrationSettings, check_writable, run_calibration
from relaygen_sgl.calibration.cue_stats import (
    CalibrationStats,
    CueStat,
    ScoredTrajectory,
    cue_regions,
    cue_statistics,
    select_cues,
    token_pieces,
)
from relaygen_sgl.calibration.scoring import completion_margins, margins_from_meta, probe_logprobs, score_request
from relaygen_sgl.cli.main import main
from relaygen_sgl.client.http import ClientConfig, EngineClient
from relaygen_sgl.client.tokenizer import Tokenizer
from relaygen_sgl.core.cues import load_profile
from relaygen_sgl.core.datasets import Problem
from relaygen_sgl.core.errors import CalibrationError, ConfigError

EASY, HARD = 0.9, 0.2
TEXT_A = "First we add 2 and 3 to get 5. Therefore the answer is 42. Then we multiply by 4! Is it right? Yes."
TEXT_B = "Thus, we know that now the sum is 7. Now, consider the case. Wait, check it."
TEXT_C = "The final answer is 20."  # none of CUES
CUES = ("Therefore", "Thus,", "now", "Now,", "Then", "Wait,", "Hence")


@pytest.fixture(scope="module")
def tok(tiny_tokenizer) -> Tokenizer:
    return Tokenizer(tiny_tokenizer)


def offsets(tok: Tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character spans from the fast tokenizer itself (independent of token_pieces)."""
    enc = tok._tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert tok.decode(enc["input_ids"]) == text
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def synthetic(tok: Tokenizer, tid: str, text: str, easy: list[str]) -> tuple[ScoredTrajectory, list[tuple[int, int]]]:
    """A scorer with known margins: EASY on tokens inside the `easy` substrings, HARD elsewhere."""
    ids, spans = offsets(tok, text)
    ranges = [(text.index(e), text.index(e) + len(e)) for e in easy]
    margins = [EASY if any(a <= s and e <= b for a, b in ranges) else HARD for s, e in spans]
    return ScoredTrajectory(tid, ids, margins), spans


def region_tokens(text: str, spans, cue_end: int) -> list[int]:
    """Independent region: tokens starting at or after the cue's end, through the sentence end."""
    stop = min(text.find(c, cue_end) % (len(text) + 1) for c in ".!?\n") + 1
    return [k for k, (s, e) in enumerate(spans) if s >= cue_end and e <= stop]


# ---------------------------------------------------------------- text <-> tokens
def test_token_pieces_rebuild_the_text_with_multibyte_characters(tok):
    for text in (TEXT_A, "Sum \u2211 of caf\u00e9 is 5. Done.\n\nNow, \u00e9t\u00e9."):
        ids = tok.encode(text)
        pieces = token_pieces(ids, tok.decode)
        assert len(pieces) == len(ids)
        assert "".join(pieces) == tok.decode(ids) == text
    ids = tok.encode("\u2211")  # three byte tokens: the character belongs to the one completing it
    assert len(ids) > 1 and token_pieces(ids, tok.decode)[-1] == "\u2211"


def test_cue_regions_on_hand_made_pieces():
    pieces = ["So", " now", " we", " add", ".\n", " Done", "."]
    assert cue_regions(pieces, "now") == (1, [(2, 5)])
    # the region stops before text the program inserted
    assert cue_regions(pieces, "now", [True, True, True, False, True, True, True]) == (1, [(2, 3)])
    # the cue's own token already ends the sentence: counted, empty region
    assert cue_regions(["We", " are", " done", " now.", " Next", "."], "now") == (1, [])
    # a cue inside a word is no cue
    assert cue_regions(["I", " know", " it", "."], "now") == (0, [])
    # a cue at the very end: counted, nothing after it
    assert cue_regions(["It", " is", " now"], "now") == (1, [])
    # the region starts right after the cue's last token ...
    assert cue_regions(["Thus", ",", " x", " is", " 5", ".", " y"], "Thus") == (1, [(1, 6)])
    # ... which may hold more than the cue
    assert cue_regions(["Thus,", " x", " is", " 5", ".", " y"], "Thus") == (1, [(1, 5)])


# ---------------------------------------------------------------- statistics, synthetic scorer
def test_statistics_equal_an_independent_computation(tok):
    a, spans_a = synthetic(tok, "a", TEXT_A, [" the answer is 42."])
    b, spans_b = synthetic(tok, "b", TEXT_B, [" consider the case."])
    stats = cue_statistics([a, b], CUES, tok.decode)
    all_margins = a.margins + b.margins
    assert stats.n_tokens == len(all_margins) and stats.n_trajectories == 2
    assert stats.baseline_mean_margin == pytest.approx(sum(all_margins) / len(all_margins))

    therefore = region_tokens(TEXT_A, spans_a, TEXT_A.index("Therefore") + len("Therefore"))
    now_comma = [len(a.margins) + k for k in region_tokens(TEXT_B, spans_b, TEXT_B.index("Now,") + 4)]
    for cue, region in (("Therefore", therefore), ("Now,", now_comma)):
        s = stats.cues[cue]
        inside = [all_margins[k] for k in region]
        out = [m for k, m in enumerate(all_margins) if k not in set(region)]
        assert s.occurrences == 1 and s.n_tokens == len(region) > 0
        assert inside == [EASY] * len(region)  # the synthetic scorer's easy sentence, exactly
        assert s.mean_margin == pytest.approx(EASY)
        assert s.delta == pytest.approx(EASY - sum(out) / len(out))
        var_out = sum((m - sum(out) / len(out)) ** 2 for m in out) / (len(out) - 1)
        assert s.stderr == pytest.approx(math.sqrt(0.0 / len(inside) + var_out / len(out)))
    for cue in ("Thus,", "now", "Then", "Wait,"):  # their sentences are hard: below the baseline
        assert stats.cues[cue].occurrences == 1 and stats.cues[cue].delta < 0
    assert stats.cues["Hence"].occurrences == 0 and stats.cues["Hence"].delta is None
    assert select_cues(stats, 0.0, 1) == ["Therefore", "Now,"] or select_cues(stats, 0.0, 1) == ["Now,", "Therefore"]
    assert {c for c, s in stats.cues.items() if s.selected} == {"Therefore", "Now,"}


def test_a_cue_inside_a_word_is_not_counted(tok):
    traj, _ = synthetic(tok, "k", "I know the answer. We know it now. Otherwise we stop.", [])
    stats = cue_statistics([traj], ("now", "Other"), tok.decode)
    assert stats.cues["now"].occurrences == 1  # "now" of "it now", never "know"
    assert stats.cues["Other"].occurrences == 0  # "Otherwise"


def test_a_trajectory_without_a_cue_adds_only_to_the_baseline(tok):
    a, _ = synthetic(tok, "a", TEXT_A, [" the answer is 42."])
    c, _ = synthetic(tok, "c", TEXT_C, [])
    c.margins = [0.5] * len(c.margins)
    without = cue_statistics([a], CUES, tok.decode)
    with_c = cue_statistics([a, c], CUES, tok.decode)
    assert "c" not in with_c.regions
    assert with_c.n_tokens == without.n_tokens + len(c.margins)
    for cue in CUES:
        s0, s1 = without.cues[cue], with_c.cues[cue]
        assert (s1.occurrences, s1.n_tokens, s1.mean_margin) == (s0.occurrences, s0.n_tokens, s0.mean_margin)
        if s0.n_tokens:
            out = [m for k, m in enumerate(a.margins) if k not in
                   {t for x, y in with_c.regions["a"][cue] for t in range(x, y)}] + c.margins
            assert s1.mean_margin_out == pytest.approx(sum(out) / len(out))


@pytest.mark.parametrize("seed", range(5))
def test_selection_is_exactly_the_cues_above_the_threshold(tok, seed):
    rng = random.Random(seed)
    texts = [TEXT_A, TEXT_B, TEXT_C, "Hence the sum is 5. Then we stop. Therefore we add. Now, it is 9.\nWait, no."]
    trajs = []
    for i, text in enumerate(texts):
        ids = tok.encode(text)
        trajs.append(ScoredTrajectory(str(i), ids, [rng.random() for _ in ids]))
    stats = cue_statistics(trajs, CUES, tok.decode)
    deltas = sorted(s.delta for s in stats.cues.values() if s.delta is not None)
    for threshold in (-1.0, 0.0, deltas[len(deltas) // 2], 1.0):
        for min_count in (1, 2):
            chosen = select_cues(stats, threshold, min_count)
            expect = {c for c, s in stats.cues.items()
                      if s.delta is not None and s.delta > threshold and s.occurrences >= min_count}
            assert set(chosen) == expect
            assert [stats.cues[c].delta for c in chosen] == sorted((stats.cues[c].delta for c in chosen), reverse=True)
            assert {c for c, s in stats.cues.items() if s.selected} == expect
            assert [stats.cues[c].rank for c in chosen] == list(range(1, len(chosen) + 1))


def test_selection_is_capped_at_32_best_first():
    cues = {f"cue{i}": CueStat(f"cue{i}", occurrences=5, n_tokens=5, delta=i / 100) for i in range(40)}
    stats = CalibrationStats(cues, 0.5, 1000, 10)
    chosen = select_cues(stats, 0.0, 3)
    assert len(chosen) == 32 and chosen[0] == "cue39" and chosen[-1] == "cue8"
    assert "cue0" not in chosen  # delta 0 is not above the threshold


# ---------------------------------------------------------------- alignment of SGLang's logprobs
def _top(p1: float, p2: float, t1: int, t2: int) -> list:
    return [[math.log(p1), t1, None], [math.log(p2), t2, None]]


def test_margins_follow_sglangs_input_logprob_alignment():
    prompt, completion = [10, 11, 12], [20, 21, 22]
    ids, sampling, extra = score_request(prompt, completion)
    assert ids == [10, 11, 12, 20, 21, 22] and sampling == {"max_new_tokens": 1, "temperature": 0}
    assert extra == {"return_logprob": True, "top_logprobs_num": 2, "logprob_start_len": 2}
    # entry k is the distribution that predicts input token logprob_start_len + k; entry 0 is null
    meta = {
        "input_top_logprobs": [None, _top(0.7, 0.2, 20, 5), _top(0.4, 0.5, 7, 21), _top(0.9, 0.05, 22, 1)],
        "input_token_logprobs": [[None, 12, None], [math.log(0.7), 20, None], [math.log(0.4), 21, None],
                                 [math.log(0.9), 22, None]],
    }
    m = completion_margins(meta, prompt, completion)
    assert m == pytest.approx([0.5, 0.1, 0.85])  # top1 - top2, whatever order the rows come in
    shifted = dict(meta, input_token_logprobs=[[math.log(0.7), 20, None]] + meta["input_token_logprobs"][1:])
    with pytest.raises(CalibrationError, match="alignment"):
        completion_margins(shifted, prompt, completion)
    with pytest.raises(CalibrationError, match="expected 4"):
        completion_margins(dict(meta, input_top_logprobs=meta["input_top_logprobs"][:3]), prompt, completion)
    with pytest.raises(CalibrationError, match="no input_top_logprobs"):
        margins_from_meta({}, ids, 2)
    one = {"input_top_logprobs": [None, [[math.log(0.6), 20, None]]]}  # a single candidate: p2 = 0
    assert margins_from_meta(one, [12, 20], 0) == pytest.approx([0.6])


def _engine(handler) -> EngineClient:
    return EngineClient("http://small.test:2", ClientConfig(retries=0, backoff_s=0.0), httpx.MockTransport(handler))


def _answer(meta: dict) -> httpx.Response:
    return httpx.Response(200, json={"text": "", "output_ids": [1], "meta_info": {
        "finish_reason": {"type": "length", "length": 1}, "prompt_tokens": 3, "completion_tokens": 1, **meta}})


def test_probe_refuses_a_server_without_input_logprobs():
    with pytest.raises(CalibrationError, match="does not return input logprobs"):
        probe_logprobs(_engine(lambda r: _answer({})), [1, 2, 3])
    rejected = _engine(lambda r: httpx.Response(400, json={"error": {"message": "logprobs not supported"}}))
    with pytest.raises(CalibrationError, match="refused a teacher-forced logprob request"):
        probe_logprobs(rejected, [1, 2, 3])
    seen = []

    def good(request):
        body = orjson.loads(request.content)
        seen.append(body)
        n = len(body["input_ids"]) - body["logprob_start_len"]
        return _answer({"input_top_logprobs": [None] + [_top(0.6, 0.3, 1, 2)] * (n - 1)})

    probe_logprobs(_engine(good), [1, 2, 3])
    assert seen[0]["logprob_start_len"] == 0 and seen[0]["top_logprobs_num"] == 2 and seen[0]["return_logprob"]


# ---------------------------------------------------------------- bad input through the CLI
@pytest.fixture
def no_servers(monkeypatch):
    import relaygen_sgl.api

    def refuse(*a, **k):
        raise AssertionError("a server was contacted")

    monkeypatch.setattr(relaygen_sgl.api, "Relay", refuse)


def test_unwritable_output_fails_before_any_server(tmp_path, capsys, no_servers):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc = main(["calibrate", "--data", "amc23", "--large", "http://127.0.0.1:9", "--small", "http://127.0.0.1:9",
               "--out", str(blocker / "profile.json")])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "cannot write the profile" in err
    with pytest.raises(CalibrationError, match="directory"):
        check_writable(tmp_path, "profile")


def test_unknown_data_set_is_one_line(tmp_path, capsys, no_servers):
    rc = main(["calibrate", "--data", "nosuch", "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "unknown data set" in err


def test_cache_paths_sit_beside_the_output(tmp_path):
    p = CalibrationPaths.for_output(tmp_path / "q.json")
    assert (p.trajectories.name, p.margins.name, p.delta_png.name, p.trace_png.name) == (
        "q.trajectories.jsonl", "q.margins.jsonl", "q.delta.png", "q.trace.png")
    p = CalibrationPaths.for_output(tmp_path / "q.json", tmp_path / "c" / "t.jsonl")
    assert p.trajectories == tmp_path / "c" / "t.jsonl" and p.margins == tmp_path / "c" / "t.margins.jsonl"


def test_cache_readers_keep_the_last_record_per_id_by_status(tmp_path):
    path = tmp_path / "c.jsonl"
    assert ok_records(path) == {} and error_messages(path) == {}  # no file yet: nothing cached
    path.write_bytes(b'{"id": "a", "status": "error", "error": "boom"}\n'
                     b'{"id": "a", "status": "ok", "v": 1}\n'
                     b'{"id": "b", "status": "ok", "v": 1}\n'
                     b'{"id": "b", "status": "ok", "v": 2}\n'
                     b'{"id": "c", "status": "error", "error": "late"}\n'
                     b'{"id": "d", "status": "o')  # a torn last line from a killed run
    assert {k: r["v"] for k, r in ok_records(path).items()} == {"a": 1, "b": 2}
    assert error_messages(path) == {"a": "boom", "c": "late"}


# ---------------------------------------------------------------- a whole run on the doubles
COMPLETION = ("First we add 2 and 3 to get 5. Therefore the answer is 42. Thus, we know that now the sum is 7. "
              "Therefore the result follows. Then we multiply by 4! Therefore it is 20.")
EASY_PARTS = [" the answer is 42.", " the result follows.", " it is 20."]


class LogprobDouble:
    """FakeSGLang plus SGLang's input logprobs on the small host: the margin of the token at
    input position p is margin_at[p] (p1 = (1 + m) / 2, p2 = (1 - m) / 2)."""

    def __init__(self, fake, margin_at, logprobs: bool = True) -> None:
        self.fake, self.margin_at, self.logprobs = fake, margin_at, logprobs
        self.scoring: list[dict] = []
        self.fail_ids: set[int] = set()  # completion lengths whose scoring fails once

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/generate" and request.url.netloc.decode() == "small.test:2":
            body = orjson.loads(request.content)
            if body.get("return_logprob"):
                self.scoring.append(body)
                ids, start = body["input_ids"], body["logprob_start_len"]
                meta = {"id": "x", "finish_reason": {"type": "length", "length": 1}, "prompt_tokens": len(ids),
                        "completion_tokens": 1, "cached_tokens": 0}
                if self.logprobs:
                    rows = [None]
                    for p in range(start + 1, len(ids)):
                        m = self.margin_at.get(p, 0.5)
                        rows.append([[math.log((1 + m) / 2), ids[p], None], [math.log((1 - m) / 2), 0, None]])
                    meta["input_top_logprobs"] = rows
                    meta["input_token_logprobs"] = [[None, ids[start], None]] + [[0.0, ids[p], None]
                                                                                 for p in range(start + 1, len(ids))]
                return httpx.Response(200, json={"text": "", "output_ids": [0], "meta_info": meta})
        return self.fake._handle(request)


def _setup(fake, tok, logprobs=True, question=QUESTION):
    from relaygen_sgl.api import Relay

    fake.add_host(LARGE, [])
    fake.add_host(SMALL, [])
    probe = Relay(preset="cpu-tiny", large=LARGE, small=SMALL, transport=fake.transport)
    p_ids = probe.tokenizer.encode(probe.plan("single-large").render(question))
    probe.close()
    c_ids, spans = offsets(tok, COMPLETION)
    for host in fake.hosts.values():
        host.tape = p_ids + c_ids + [fake.eos_id]
    ranges = [(COMPLETION.index(e), COMPLETION.index(e) + len(e)) for e in EASY_PARTS]
    margin_at = {len(p_ids) + k: (EASY if any(a <= s and e <= b for a, b in ranges) else HARD)
                 for k, (s, e) in enumerate(spans)}
    double = LogprobDouble(fake, margin_at, logprobs)
    relay = Relay(preset="cpu-tiny", large=LARGE, small=SMALL, transport=httpx.MockTransport(double.handle),
                  client=ClientConfig(retries=0, backoff_s=0.0))
    return relay, double, p_ids, c_ids


PROBLEMS = [Problem("p1", QUESTION, "5", "math"), Problem("p2", QUESTION, "5", "math")]


def test_a_whole_calibration_run_writes_the_profile_and_resumes(fake, tok, tmp_path):
    relay, double, p_ids, c_ids = _setup(fake, tok)
    settings = CalibrationSettings(data="test", samples=2, max_tokens=500, min_count=3, concurrency=2)
    paths = CalibrationPaths.for_output(tmp_path / "out" / "pair.json")
    rep = run_calibration(relay, PROBLEMS, settings, paths, candidates=CUES + ("Thus", "Other"), progress=False)
    assert rep.trajectories == 4 and not rep.failed, rep.failed
    assert list(rep.profile.cues) == ["Therefore"]  # the only cue followed by the easy sentences
    assert rep.stats.cues["Therefore"].occurrences == 12
    assert rep.stats.cues["Therefore"].mean_margin == pytest.approx(EASY)
    assert rep.stats.cues["now"].occurrences == 4  # "know" never counts
    large_gen = len(fake.hosts["large.test:1"].requests)
    assert len(double.scoring) == 1 + 4  # the probe, then one teacher-forced request per trajectory
    req = double.scoring[-1]
    assert req["input_ids"][len(p_ids):len(p_ids) + len(c_ids)] == c_ids
    assert req["logprob_start_len"] == len(p_ids) - 1

    prof = load_profile(str(paths.out))  # what profile.py reads
    assert prof.cues == ("Therefore",) and prof.stats["cues"]["Therefore"]["selected"] is True
    assert set(prof.stats["cues"]) == set(CUES + ("Thus", "Other"))
    assert prof.stats["cues"]["Therefore"]["delta"] > 0 and prof.stats["baseline_mean_margin"] is not None
    prov = prof.provenance
    assert prov["models"]["large"]["url"] == LARGE and prov["models"]["small"]["model_path"]
    assert (prov["data"], prov["samples"], prov["max_tokens"], prov["trajectories"]) == ("test", 2, 500, 4)
    assert prov["date"].endswith("+00:00") and prov["tokens"] > 0
    assert paths.delta_png.stat().st_size > 0 and paths.trace_png.stat().st_size > 0
    recs = [orjson.loads(x) for x in paths.trajectories.read_bytes().splitlines()]
    assert sorted(r["id"] for r in recs) == ["p1#0", "p1#1", "p2#0", "p2#1"]
    r0 = recs[0]
    assert r0["prompt_ids"] == p_ids and r0["completion_ids"][:len(c_ids)] == c_ids
    # SmolLM2 never closes thinking: the program inserts </think>; those tokens stay in the scored
    # sequence (the large model saw them) but out of every statistic
    assert [s[0] for s in r0["segments"]] == ["large", "inserted", "large"]
    inserted = r0["segments"][1][1]
    assert r0["n_model_tokens"] == len(r0["completion_ids"]) - inserted
    assert rep.stats.n_tokens == 4 * r0["n_model_tokens"] == prov["model_tokens"] == prov["tokens"] - 4 * inserted

    # a rerun generates and scores nothing again (only the probe), and gives the same profile
    rep2 = run_calibration(relay, PROBLEMS, settings, paths, candidates=CUES + ("Thus", "Other"), progress=False)
    assert len(fake.hosts["large.test:1"].requests) == large_gen
    assert len(double.scoring) == 1 + 4 + 1
    assert rep2.profile.cues == rep.profile.cues
    # more samples reuse what is cached and generate only the new ones
    more = CalibrationSettings(data="test", samples=3, max_tokens=500, min_count=3, concurrency=2)
    rep3 = run_calibration(relay, PROBLEMS, more, paths, candidates=CUES, progress=False)
    assert rep3.trajectories == 6 and len(double.scoring) == 1 + 4 + 1 + 1 + 2
    # a trajectory that changed under its cached margins is scored again
    lines = paths.trajectories.read_bytes().splitlines()
    rec = orjson.loads(lines[0])
    rec["completion_ids"][3] = rec["completion_ids"][4]
    paths.trajectories.write_bytes(b"\n".join([orjson.dumps(rec), *lines[1:]]) + b"\n")
    run_calibration(relay, PROBLEMS, more, paths, candidates=CUES, progress=False)
    assert len(double.scoring) == 1 + 4 + 1 + 1 + 2 + 1 + 1
    assert double.scoring[-1]["input_ids"][len(p_ids):] == rec["completion_ids"]
    # other settings never mix with the cache: refused in one line naming them; --fresh starts over
    other = CalibrationSettings(data="test", samples=2, max_tokens=400)
    before = paths.trajectories.read_bytes()
    with pytest.raises(ConfigError) as refused:
        run_calibration(relay, PROBLEMS, other, paths, candidates=CUES, progress=False)
    assert str(refused.value) == (f"{paths.trajectories} was written with max_tokens=500; this run has "
                                  "max_tokens=400 (use --fresh to start over)")
    assert paths.trajectories.read_bytes() == before
    scored = len(double.scoring)
    rep4 = run_calibration(relay, PROBLEMS, other, paths, candidates=CUES, progress=False, fresh=True)
    assert rep4.profile.provenance["max_tokens"] == 400 and rep4.trajectories == 4
    assert len(double.scoring) == scored + 1 + 4  # nothing cached was used
    assert {orjson.loads(x)["config"]["max_tokens"] for x in paths.trajectories.read_bytes().splitlines()} == {400}
    assert not any(p.name.endswith((".lock", ".tmp")) or p.name.startswith(".") for p in paths.out.parent.iterdir())
    relay.close()


def test_a_second_calibration_on_the_same_cache_is_refused(tmp_path):
    from relaygen_sgl.core.errors import RelayGenError
    from relaygen_sgl.jobs.output import claim_output

    paths = CalibrationPaths.for_output(tmp_path / "pair.json")
    with claim_output(None, paths.margins, job="calibrate"):
        with pytest.raises(RelayGenError, match=r"another relaygen calibrate is writing .*pair\.margins\.jsonl"):
            run_calibration(object(), PROBLEMS, CalibrationSettings(data="test"), paths, candidates=CUES)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, no lock left


def test_a_small_server_without_logprobs_stops_before_generation(fake, tok, tmp_path):
    relay, double, _, _ = _setup(fake, tok, logprobs=False)
    paths = CalibrationPaths.for_output(tmp_path / "pair.json")
    with pytest.raises(CalibrationError, match="does not return input logprobs"):
        run_calibration(relay, PROBLEMS, CalibrationSettings(data="test", samples=1, max_tokens=500), paths,
                        candidates=CUES, progress=False)
    assert fake.hosts["large.test:1"].requests == [] and not paths.out.exists()
    relay.close()


def test_no_cue_above_the_threshold_is_one_clear_error_and_keeps_the_cache(fake, tok, tmp_path):
    relay, _, _, _ = _setup(fake, tok)
    paths = CalibrationPaths.for_output(tmp_path / "pair.json")
    settings = CalibrationSettings(data="test", samples=1, max_tokens=500, threshold=0.99)
    with pytest.raises(CalibrationError, match="no candidate cue has delta > 0.99"):
        run_calibration(relay, PROBLEMS, settings, paths, candidates=CUES, progress=False)
    assert not paths.out.exists()
    assert len(paths.trajectories.read_bytes().splitlines()) == 2
    assert len(paths.margins.read_bytes().splitlines()) == 2
    relay.close()


def test_the_cli_runs_a_calibration(fake, tok, tmp_path, capsys, monkeypatch):
    import functools

    import relaygen_sgl.api
    from relaygen_sgl.core.datasets import load_problems

    relay, double, _, _ = _setup(fake, tok, question=load_problems("amc23")[0].question)
    relay.close()
    monkeypatch.setattr(relaygen_sgl.api, "Relay", functools.partial(
        relaygen_sgl.api.Relay, transport=httpx.MockTransport(double.handle)))
    out = tmp_path / "p.json"
    rc = main(["calibrate", "--large", LARGE, "--small", SMALL, "--data", "amc23", "--limit", "1", "--samples", "3",
               "--max-tokens", "500", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert " 1. 'Therefore'" in err and "1 of 91 cues selected from 3 trajectories" in err
    prof = load_profile(str(out))
    assert prof.cues == ("Therefore",) and len(prof.stats["cues"]) == 91
    assert prof.provenance["data"] == "amc23" and prof.provenance["limit"] == 1
    assert (tmp_path / "p.trajectories.jsonl").is_file() and (tmp_path / "p.delta.png").is_file()
