"""The relay as an SGLang building block, on the real CPU pair: plain programs on connect(),
select, fork, streaming, run_batch, the bundled composed programs, and the installed wheel."""

from __future__ import annotations

import json
import site
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
import pytest
import sglang as sgl

import relaygen_sgl
from relaygen_sgl.api import Relay, close
from relaygen_sgl.loader import load_program
from relaygen_sgl.runtime.trajectory import KEY

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@sgl.function
def plain(s, question):
    # Plain SGLang: no route anywhere, a select, a fork.
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("first", max_tokens=12, temperature=0))
    s += sgl.user("Is that right? Answer yes or no.")
    s += sgl.assistant(sgl.select("yn", choices=["yes", "no"]))
    branches = s.fork(2)
    branches[1]["route"] = "small"  # nothing is queued in the new branch yet
    for b in branches:
        b += sgl.gen("more", max_tokens=6, temperature=0)
    branches.join()
    return [branches[i].stream_executor.variables[KEY] for i in range(2)]


@pytest.fixture(scope="module")
def backend(cpu_pair):
    be = relaygen_sgl.connect(preset="cpu-tiny", large=cpu_pair.large, small=cpu_pair.small)
    yield be
    close(be)


def test_a_plain_sglang_program_runs_on_connect(backend):
    state = plain.run(question=f"What is 2 + 3? ({uuid.uuid4().hex[:6]})", backend=backend)
    assert state.error() is None
    trunk = state.stream_executor.variables[KEY]
    first = next(seg for seg in trunk.segments if seg.role != "inserted")
    assert first.role == "large"  # a gen with no route goes to the large model
    # SGLang counts a matched EOS in completion_tokens and leaves it out of the text (and the
    # ids the next gen goes on from)
    assert state["first"] == first.text and first.completion_tokens == len(first.token_ids) + (first.finish == "eos")
    # the question carries a random tag, so the model may end its answer before the budget
    assert first.completion_tokens == 12 or (first.finish == "eos" and first.completion_tokens < 12)
    assert state["yn"] in ("yes", "no")
    scores = state.get_meta_info("yn")["normalized_prompt_logprobs"]
    assert len(scores) == 2 and all(x < 0 for x in scores)
    branches = state.ret_value
    assert len({b.sid for b in branches} | {trunk.sid}) == 3  # each branch its own trajectory
    roles = []
    for b in branches:
        seg = b.segments[-1]
        roles.append(seg.role)
        assert b.ids[: len(b.ids) - len(seg.token_ids)] == trunk.ids  # the trunk's history, token-exact
        # the shared prefix was prefilled on both servers before the branches ran
        assert seg.prompt_tokens - seg.cached_tokens == 1, (seg.role, seg.prompt_tokens, seg.cached_tokens)
    assert sorted(roles) == ["large", "small"]


def test_run_batch_runs_programs_concurrently(backend):
    states = plain.run_batch([{"question": f"What is {n} + 1?"} for n in range(4)], backend=backend,
                             num_threads=4, progress_bar=True)
    assert len(states) == 4
    assert [s.error() for s in states] == [None] * 4
    assert all(s["yn"] in ("yes", "no") and len(s.ret_value) == 2 for s in states)


def test_stream_text_iter_across_switches(backend):
    question = ("Tom has 3 apples and buys 5 more. Then he gives 2 away. How many apples does he have? "
                "Explain step by step.")
    plan = backend.plan(max_tokens=160, temperature=0.0)
    state = load_program("relay").run(question=question, plan=plan, backend=backend, stream=True)
    chunks = list(state.text_iter())
    result = state.ret_value
    assert len(chunks) > 10 and "".join(chunks) == state.text()
    assert result.stats.switches >= 1 and {"large", "small"} <= {s.role for s in result.segments}
    assert state.text().endswith(result.text)


def test_self_consistency_batch_writes_each_record_with_its_branches(cpu_pair, tmp_path):
    src, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{n}", "question": f"What is {n} times 4?", "k": 2}) + "\n"
                           for n in (3, 5)))
    proc = subprocess.run([sys.executable, "-m", "relaygen_sgl.cli", "batch", "programs/self_consistency.py",
                           str(src), "-o", str(out), "--large", cpu_pair.large, "--small", cpu_pair.small,
                           "--max-tokens", "40", "--no-progress"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr
    recs = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert sorted(r["id"] for r in recs) == ["q3", "q5"]
    for r in recs:
        assert r["status"] == "ok" and len(r["branches"]) == 2
        assert all(b["segments"] and b["stats"]["large_tokens"] > 0 for b in r["branches"])
        assert sum(r["votes"].values()) == sum(b["vote_key"] is not None for b in r["branches"])


def test_multiple_choice_from_python(cpu_pair):
    with Relay(preset="cpu-tiny", large=cpu_pair.large, small=cpu_pair.small) as r:
        rec = r.run_program("multiple-choice", {"question": "Which planet is the largest?",
                                                "options": ["Mars", "Jupiter", "Venus"]}, max_tokens=40)
    assert rec["answer"] in ("A", "B", "C") and rec["letters"] == ["A", "B", "C"]
    assert rec["text"].endswith(f"The answer is ({rec['answer']})")
    assert "</think>" in rec["text"] and rec["stats"]["large_tokens"] > 0


@pytest.mark.slow  # builds a wheel and a venv
def test_an_installed_wheel_runs_the_bundled_relay(cpu_pair, tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("relaygen_sgl-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "relaygen_sgl/programs/relay.py" in names and "relaygen_sgl/programs/self_consistency.py" in names
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "relaygen_sgl").rglob("__init__.py")
                if "shim" not in p.parts}
    assert not [p for p in packages if f"{p}/__init__.py" not in names], "a subpackage is missing from the wheel"
    for data in ("relaygen_sgl/data/presets.toml", "relaygen_sgl/servers/cpu/shim/sitecustomize.py",
                 "relaygen_sgl/servers/cpu/shim/sgl_kernel/__init__.py"):
        assert data in names, data
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    # the dependencies come from this environment; the package itself only from the wheel
    target = next((venv / "lib").glob("python3*/site-packages"))
    (target / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(venv / "bin" / "pip"), "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    py, cli = venv / "bin" / "python", venv / "bin" / "relaygen"
    where = subprocess.run([str(py), "-c", "import relaygen_sgl.programs.relay as m; print(m.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert where.stdout.strip().startswith(str(target)), where.stdout + where.stderr
    run = subprocess.run([str(cli), "run", "What is 2 + 2?", "--large", cpu_pair.large, "--small", cpu_pair.small,
                          "--max-tokens", "24", "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["segments"] and out["stats"]["large_tokens"] > 0
    # a plain SGLang program (no relaygen import in it) on connect(), from the installed package
    program = (
        "import sglang as sgl, relaygen_sgl\n"
        "@sgl.function\n"
        "def qa(s, q):\n"
        "    s += sgl.user(q)\n"
        "    s += sgl.assistant(sgl.gen('a', max_tokens=8, temperature=0))\n"
        f"be = relaygen_sgl.connect(preset='cpu-tiny', large={cpu_pair.large!r}, small={cpu_pair.small!r})\n"
        "st = qa.run(q='Say hi.', backend=be)\n"
        "print(repr(st['a']), relaygen_sgl.__file__)\n")
    plain = subprocess.run([str(py), "-c", program], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert plain.stdout.strip().endswith(str(target / "relaygen_sgl" / "__init__.py")), plain.stdout
