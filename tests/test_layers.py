"""The package's import graph, checked from the source alone (ast; nothing here imports relaygen_sgl).

The package is cut into groups (GROUPS: module prefixes below relaygen_sgl). MAY_IMPORT, the table
below, is the whole of what may import what: per group, the other groups its modules may import.
A module may import any module of its own group, and of the groups its row lists; nothing else.
Being lower is not enough: servers and jobs do not import the runtime, the apps (bench,
calibration, serve, show) do not import each other, nothing imports cli. The table lists only the
edges the code uses (a test keeps it so: when the last import along an edge goes, so does the edge),
it has no cycle, and each edge points down the old order of layers (core, client, runtime, program,
programs, api, servers, jobs, the apps, cli), which is what docs/design.md states. Every import
counts: at module level, inside functions, and under TYPE_CHECKING. Renaming a module inside its
group changes nothing here; a new module outside every group fails until GROUPS names it.

group        prefixes                   what it holds
core         core                       settings, presets, families, roles, methods, cue profiles,
                                        results, JSONL records, locks, data sets, grading, the
                                        `up` state record, typed errors
client       client                     the one HTTP client to SGLang, its wire format; tokenizer
runtime      runtime                    routing backend, plan, protocol rules, policy, turn,
                                        trajectory, prefetch, seeding, pairing, choices scoring
program      program                    the relay as a building block of @sgl.function programs
programs     programs                   the bundled programs (repository folder programs/)
api          (the package), api, loader connect(), Relay, program loading, the public names
servers      servers                    the server plan (commands, GPUs, ports), processes,
                                        up/status/down, weights, CPU patches
jobs         jobs                       batch runs over prompt files, their output, evaluation
bench        bench                      the bench runner, its report, the handoff replay
calibration  calibration                cue calibration: the runs, their cache, scoring, plots
serve        serve                      the OpenAI-compatible server
show         show                       records in the terminal and as an HTML page
cli          cli                        argv parsing and the commands; nothing imports it
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = "relaygen_sgl"

# group -> its module prefixes below relaygen_sgl ("" = the package itself, its __init__ only)
GROUPS: dict[str, tuple[str, ...]] = {
    "core": ("core",),
    "client": ("client",),
    "runtime": ("runtime",),
    "program": ("program",),
    "programs": ("programs",),
    "api": ("", "api", "loader"),
    "servers": ("servers",),
    "jobs": ("jobs",),
    "bench": ("bench",),
    "calibration": ("calibration",),
    "serve": ("serve",),
    "show": ("show",),
    "cli": ("cli",),
}

# group -> the other groups it may import: the allowed edges, and the only ones
MAY_IMPORT: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "client": frozenset({"core"}),
    "runtime": frozenset({"core", "client"}),
    "program": frozenset({"core", "runtime"}),
    "programs": frozenset({"core", "program"}),
    "api": frozenset({"core", "client", "runtime", "programs"}),  # programs: the loader finds the bundled ones
    "servers": frozenset({"core", "client"}),  # client: health checks on the servers it starts
    "jobs": frozenset({"core"}),
    "bench": frozenset({"core", "client", "api"}),  # client: the handoff replay and cache flushes
    "calibration": frozenset({"core", "api", "jobs"}),  # jobs: the calibration runs are batch runs
    "serve": frozenset({"core"}),  # it runs relays through the Relay it is given, never the runtime itself
    "show": frozenset({"core"}),
    "cli": frozenset({"core", "client", "api", "servers", "jobs", "bench", "calibration", "serve", "show"}),
}

# the old layers, lowest first (a tuple: one layer of groups); every edge above points down this list
ORDER: list[str | tuple[str, ...]] = ["core", "client", "runtime", "program", "programs", "api", "servers", "jobs",
                                      ("bench", "calibration", "serve", "show"), "cli"]


def sources() -> dict[str, str]:
    """{dotted module name: source} of the package, programs/ included (shipped as relaygen_sgl.programs)."""
    out: dict[str, str] = {}
    for base, dotted in ((ROOT / PKG, PKG), (ROOT / "programs", f"{PKG}.programs")):
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if "shim" in rel.parts:  # the CPU servers' sitecustomize: runs inside SGLang, not part of the package
                continue
            out[".".join([dotted, *parts])] = path.read_text()
    return out


def is_package(name: str, mods: Mapping[str, str]) -> bool:
    return any(m.startswith(name + ".") for m in mods)


def imports(name: str, source: str, mods: Mapping[str, str]) -> Iterable[tuple[str, int, list[str]]]:
    """(imported relaygen_sgl module, line, names taken from it) for every import in `source`."""
    package = name if is_package(name, mods) else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PKG or alias.name.startswith(PKG + "."):
                    yield alias.name, node.lineno, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not (module == PKG or module.startswith(PKG + ".")):
                continue
            taken = []
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                if sub in mods:  # `from relaygen_sgl.core import config`: the module itself
                    yield sub, node.lineno, []
                else:
                    taken.append(alias.name)
            if taken:
                yield module, node.lineno, taken


def group_of(module: str) -> str:
    """The group a module belongs to: the one with the longest prefix that covers it."""
    rest = module[len(PKG) + 1:] if module != PKG else ""
    best: tuple[str, int] | None = None
    for group, prefixes in GROUPS.items():
        for prefix in prefixes:
            hit = rest == prefix if prefix == "" else (rest == prefix or rest.startswith(prefix + "."))
            if hit and (best is None or len(prefix) > best[1]):
                best = (group, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no group: add it to GROUPS (and its edges to MAY_IMPORT)")
    return best[0]


def group_edges(mods: Mapping[str, str]) -> dict[tuple[str, str], list[str]]:
    """{(importing group, imported group): ["module:line imports module", ...]} for imports across groups."""
    edges: dict[tuple[str, str], list[str]] = {}
    for name, src in mods.items():
        here = group_of(name)
        for target, line, _ in imports(name, src, mods):
            there = group_of(target)
            if there != here:
                edges.setdefault((here, there), []).append(f"{name}:{line} imports {target}")
    return edges


def layer_violations(mods: Mapping[str, str]) -> list[str]:
    """Every import across groups that MAY_IMPORT does not allow, with the edge it lacks."""
    return [f"{use}: no edge {here} -> {there} in MAY_IMPORT"
            for (here, there), uses in group_edges(mods).items() if there not in MAY_IMPORT[here]
            for use in uses]


def private_imports(mods: Mapping[str, str]) -> list[str]:
    return [f"{name}:{line} takes {n} from {target}"
            for name, src in mods.items() for target, line, names in imports(name, src, mods)
            for n in names if n.startswith("_") and target != name]


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def cycles(mods: Mapping[str, str]) -> list[list[str]]:
    """Import cycles between modules. A package's __init__ counts as the package's module."""
    return strongly_connected({name: sorted({t for t, _, _ in imports(name, src, mods) if t in mods and t != name})
                               for name, src in mods.items()})


def public_names(source: str) -> tuple[set[str], list[str] | None, set[str]]:
    """(public names bound at module level, __all__, names a module __getattr__ serves)."""
    tree = ast.parse(source)
    bound: set[str] = set()
    declared: list[str] | None = None
    lazy: set[str] = set()
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
            if node.name == "__getattr__":
                lazy |= {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
        elif isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        for t in targets:
            if isinstance(t, ast.Name) and t.id == "__all__":
                declared = list(ast.literal_eval(node.value))  # type: ignore[arg-type]
            elif isinstance(t, ast.Name):
                bound.add(t.id)
    return {n for n in bound if not n.startswith("_")}, declared, lazy


def sample(group: str) -> str:
    """A made-up module name inside a group (for the self-tests)."""
    return f"{PKG}.{next(p for p in GROUPS[group] if p)}.sample"


# ---------------------------------------------------------------- the table itself
def test_the_table_names_every_group_and_only_groups():
    assert set(MAY_IMPORT) == set(GROUPS)
    for group, allowed in MAY_IMPORT.items():
        assert allowed <= set(GROUPS), f"{group} may import unknown groups {sorted(allowed - set(GROUPS))}"
        assert group not in allowed, f"{group} lists itself (its own modules need no edge)"
    prefixes = [p for ps in GROUPS.values() for p in ps]
    assert len(prefixes) == len(set(prefixes)), "a prefix is in two groups"


def test_the_table_has_no_cycle_and_points_down_the_old_layers():
    assert strongly_connected({g: sorted(a) for g, a in MAY_IMPORT.items()}) == []
    rank = {g: i for i, layer in enumerate(ORDER) for g in ((layer,) if isinstance(layer, str) else layer)}
    assert set(rank) == set(GROUPS)
    up = [f"{g} -> {h}" for g, allowed in MAY_IMPORT.items() for h in allowed if rank[h] >= rank[g]]
    assert up == [], f"edges that do not point down the layers: {up}"


def test_nothing_imports_cli_and_the_apps_import_no_app():
    apps = {"bench", "calibration", "serve", "show"}
    for group, allowed in MAY_IMPORT.items():
        assert "cli" not in allowed, f"{group} may import cli"
        if group in apps:
            assert not allowed & apps, f"app {group} may import app(s) {sorted(allowed & apps)}"


# ---------------------------------------------------------------- the rules, on the tree
def test_every_import_is_an_edge_of_the_table():
    bad = layer_violations(sources())
    assert not bad, "imports the table does not allow:\n" + "\n".join(bad)


def test_every_edge_of_the_table_is_used():
    used = set(group_edges(sources()))
    unused = sorted(f"{g} -> {h}" for g, allowed in MAY_IMPORT.items() for h in allowed if (g, h) not in used)
    assert unused == [], f"no import uses these edges any more: drop them from MAY_IMPORT: {unused}"


def test_every_group_has_a_module():
    have = {group_of(m) for m in sources()}
    assert have == set(GROUPS), f"groups with no module: {sorted(set(GROUPS) - have)}"


def test_no_import_cycles():
    assert cycles(sources()) == []


def test_no_private_name_is_imported_from_another_module():
    assert private_imports(sources()) == []


def test_each_package_all_is_exactly_its_public_names():
    for init in sorted((ROOT / PKG).rglob("__init__.py")) + [ROOT / "programs" / "__init__.py"]:
        if "shim" in init.parts:
            continue
        bound, declared, lazy = public_names(init.read_text())
        where = init.relative_to(ROOT)
        assert declared is not None, f"{where} has no __all__"
        assert len(declared) == len(set(declared)), f"{where}: __all__ repeats a name"
        assert bound <= set(declared), f"{where}: public names not in __all__: {sorted(bound - set(declared))}"
        missing = sorted(set(declared) - bound - lazy)
        assert not missing, f"{where}: __all__ names nothing defines: {missing}"


def test_the_wheel_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join((PKG, *p.parent.relative_to(ROOT / PKG).parts)) for p in (ROOT / PKG).rglob("__init__.py")
               if "shim" not in p.parts} | {f"{PKG}.programs"}
    assert listed == on_disk


def test_the_runtime_imports_no_server_stack_web_or_plotting():
    mods = sorted(m for m in sources() if m.startswith(f"{PKG}.runtime") or m in (f"{PKG}.api", f"{PKG}.program"))
    code = ("import sys\n" + "".join(f"import {m}\n" for m in mods) +
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'uvicorn', 'matplotlib') "
            f"or m.startswith('{PKG}.servers.') or m.startswith('{PKG}.cli.'))\nprint(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""


# ---------------------------------------------------------------- the checks catch what they guard
def test_an_import_the_table_does_not_list_is_caught():
    mods = {f"{PKG}.servers.x": f'"""doc"""\nimport os\n\nfrom {PKG}.runtime.y import thing\n',
            f"{PKG}.runtime.y": "thing = 1\n",
            f"{PKG}.core.z": f"from {PKG}.client import http\n",
            f"{PKG}.client.http": "",
            f"{PKG}.client": ""}
    assert layer_violations(mods) == [
        f"{PKG}.servers.x:4 imports {PKG}.runtime.y: no edge servers -> runtime in MAY_IMPORT",
        f"{PKG}.core.z:1 imports {PKG}.client.http: no edge core -> client in MAY_IMPORT"]


def test_an_allowed_import_is_not_reported():
    mods = {f"{PKG}.servers.x": f"from {PKG}.client.y import thing\nfrom . import w\nfrom .w import other\n",
            f"{PKG}.servers.w": f"import {PKG}.core.errors\nother = 1\n",
            f"{PKG}.servers": "",
            f"{PKG}.client.y": "thing = 1\n",
            f"{PKG}.core.errors": ""}
    assert layer_violations(mods) == []
    assert set(group_edges(mods)) == {("servers", "client"), ("servers", "core")}


def test_an_upward_import_inside_a_function_or_under_type_checking_is_caught():
    inside = {f"{PKG}.core.x": f"def f():\n    if True:\n        from {PKG}.cli.commands import run\n    return run\n"}
    assert layer_violations(inside) == [f"{PKG}.core.x:3 imports {PKG}.cli.commands: no edge core -> cli in MAY_IMPORT"]
    typed = {f"{PKG}.jobs.x": f"from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import {PKG}.runtime.turn\n"}
    assert layer_violations(typed) == [
        f"{PKG}.jobs.x:3 imports {PKG}.runtime.turn: no edge jobs -> runtime in MAY_IMPORT"]


def test_each_pair_of_groups_follows_the_table():
    wrong = []
    for here in GROUPS:
        for there in GROUPS:
            if there == here:
                continue
            mods = {sample(here): f"import os\n\n\ndef f():\n    from {sample(there)} import x\n    return x\n"}
            want = [] if there in MAY_IMPORT[here] else [
                f"{sample(here)}:5 imports {sample(there)}: no edge {here} -> {there} in MAY_IMPORT"]
            if layer_violations(mods) != want:
                wrong.append(f"{here} -> {there}")
    assert wrong == []


def test_the_package_itself_and_its_top_modules_are_placed():
    assert [group_of(m) for m in (PKG, f"{PKG}.api", f"{PKG}.loader", f"{PKG}.program", f"{PKG}.programs.relay",
                                  f"{PKG}.servers.cpu.patches")] == ["api", "api", "api", "program", "programs",
                                                                     "servers"]


def test_a_module_in_no_group_is_caught():
    with pytest.raises(AssertionError, match="in no group"):
        layer_violations({f"{PKG}.newthing": ""})
    with pytest.raises(AssertionError, match="in no group"):
        layer_violations({f"{PKG}.core.x": f"from {PKG}.elsewhere import y\n"})


def test_a_cycle_is_caught():
    mods = {f"{PKG}.core": "",
            f"{PKG}.core.a": f"from {PKG}.core.b import x\n",
            f"{PKG}.core.b": f"def f():\n    from {PKG}.core import a\n",
            f"{PKG}.core.c": f"from {PKG}.core.a import y\n"}
    assert cycles(mods) == [[f"{PKG}.core.a", f"{PKG}.core.b"]]


def test_a_private_import_is_caught():
    mods = {f"{PKG}.runtime.turn": f"from {PKG}.client.http import _one_line\n",
            f"{PKG}.client.http": "_one_line = 1\n",
            f"{PKG}.core.x": "from .errors import _hidden\n",
            f"{PKG}.core.errors": "_hidden = 1\n"}
    assert private_imports(mods) == [f"{PKG}.runtime.turn:1 takes _one_line from {PKG}.client.http",
                                     f"{PKG}.core.x:1 takes _hidden from {PKG}.core.errors"]


def test_an_unlisted_public_name_is_caught():
    bound, declared, _ = public_names('"""doc"""\nfrom x import thing\n__all__ = []\n')
    assert bound == {"thing"} and declared == []
