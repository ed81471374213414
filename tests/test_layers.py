"""The package's layers, checked from the source alone (ast; nothing here imports relaygen_sgl).

Layers, lowest first. A module may import a module of a lower layer, or one in its own
group; never one of a higher layer, nor a sibling group of its own layer (the apps do not
import each other). Every import counts: at module level, inside functions, and under
TYPE_CHECKING.

layer     groups (prefixes below relaygen_sgl)   what it holds
core      core                                 settings, presets, families, roles, methods, cue profiles,
                                               results, JSONL records, locks, data sets, grading, the
                                               `up` state record, typed errors
client    client                               the one HTTP client to SGLang, its wire format; tokenizer
runtime   runtime                              routing backend, policy, turn, trajectory, prefetch,
                                               seeding, pairing, select scoring
program   program                              the relay as a building block of @sgl.function programs
programs  programs                             the bundled programs (repository folder programs/)
api       (the package itself), api, loader    connect(), Relay, program loading, the public names
servers   servers                              the server plan (commands, GPUs, ports), processes,
                                               up/status/down, weights, CPU patches
jobs      jobs                                 batch runs over prompt files, their output, evaluation
apps      bench | calibration | serve | show   each its own group: the apps do not import each other
cli       cli                                  argv parsing and the commands; nothing imports it
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

# (layer, groups); a group is a tuple of module prefixes below relaygen_sgl ("" = the package itself)
LAYERS: list[tuple[str, list[tuple[str, ...]]]] = [
    ("core", [("core",)]),
    ("client", [("client",)]),
    ("runtime", [("runtime",)]),
    ("program", [("program",)]),
    ("programs", [("programs",)]),
    ("api", [("", "api", "loader")]),
    ("servers", [("servers",)]),
    ("jobs", [("jobs",)]),
    ("apps", [("bench",), ("calibration",), ("serve",), ("show",)]),
    ("cli", [("cli",)]),
]


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


def place(module: str) -> tuple[int, int]:
    """(layer index, group index) of a module."""
    rest = module[len(PKG) + 1:] if module != PKG else ""
    best: tuple[int, int, int] | None = None
    for li, (_, groups) in enumerate(LAYERS):
        for gi, group in enumerate(groups):
            for prefix in group:
                hit = rest == prefix if prefix == "" else (rest == prefix or rest.startswith(prefix + "."))
                if hit and (best is None or len(prefix) > best[2]):
                    best = (li, gi, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best[0], best[1]


def layer_violations(mods: Mapping[str, str]) -> list[str]:
    bad = []
    for name, src in mods.items():
        here = place(name)
        for target, line, _ in imports(name, src, mods):
            there = place(target)
            if there[0] > here[0] or (there[0] == here[0] and there[1] != here[1]):
                bad.append(f"{name}:{line} imports {target} ({LAYERS[there[0]][0]} layer, from {LAYERS[here[0]][0]})")
    return bad


def private_imports(mods: Mapping[str, str]) -> list[str]:
    return [f"{name}:{line} takes {n} from {target}"
            for name, src in mods.items() for target, line, names in imports(name, src, mods)
            for n in names if n.startswith("_") and target != name]


def cycles(mods: Mapping[str, str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), over module imports.
    A package's __init__ counts as the package's module."""
    graph = {name: sorted({t for t, _, _ in imports(name, src, mods) if t in mods and t != name})
             for name, src in mods.items()}
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


# ---------------------------------------------------------------- the rules, on the tree
def test_every_import_goes_down_the_layer_table():
    assert layer_violations(sources()) == []


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
def _with(extra: Mapping[str, str]) -> dict[str, str]:
    return {**sources(), **extra}


@pytest.mark.parametrize("low, high", [("core.config", "servers.plan"), ("runtime.backend", "serve.app"),
                                       ("client.http", "runtime.turn"), ("servers.stack", "cli.commands"),
                                       ("bench.runner", "show.render")])
def test_an_upward_or_sideways_import_is_caught(low, high):
    mods = sources()
    name = f"{PKG}.{low}"
    assert layer_violations({**mods, name: mods[name] + f"\n\ndef f():\n    from {PKG}.{high} import x\n"})
    assert layer_violations({**mods, name: mods[name] + f"\nif TYPE_CHECKING:\n    import {PKG}.{high}\n"})


def test_a_cycle_is_caught():
    mods = sources()
    name = f"{PKG}.core.records"
    assert cycles({**mods, name: mods[name] + f"\nfrom {PKG}.core.datasets import load_problems\n"})


def test_a_private_import_is_caught():
    mods = sources()
    name = f"{PKG}.runtime.turn"
    assert private_imports({**mods, name: mods[name] + f"\nfrom {PKG}.client.http import _one_line\n"})
    assert private_imports(_with({f"{PKG}.core.x": "from .errors import _hidden\n"}))


def test_an_unlisted_public_name_is_caught():
    bound, declared, _ = public_names('"""doc"""\nfrom x import thing\n__all__ = []\n')
    assert bound == {"thing"} and declared == []
