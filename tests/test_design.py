"""docs/design.md's "Where it happens" table names real functions, and the relay's own code
stays short enough to read (checked from the source with ast; nothing is imported)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\|[^|]+\|\s*`([^`]+\.py)`\s+`([A-Za-z_][\w.]*)`\s*\|\s*$")
MAX_LINES = 80  # per function in the runtime, the program and the API
SHORT = ("relaygen_sgl/runtime", "relaygen_sgl/program.py", "relaygen_sgl/api.py")


def table(text: str) -> list[tuple[str, str]]:
    """(path, dotted name) of each row of the "Where it happens" table."""
    section = text.split("## Where it happens", 1)[1].split("\n## ", 1)[0]
    return [m.groups() for line in section.splitlines() if (m := ROW.match(line))]


def defined(source: str, dotted: str) -> bool:
    """Whether `dotted` (a function, a class, or Class.method) is defined at the top of `source`."""
    scope: list[ast.stmt] = ast.parse(source).body
    for part in dotted.split("."):
        node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            return False
        scope = node.body
    return True


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    return [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > limit]


def test_the_where_it_happens_table_names_functions_that_exist_where_it_says():
    rows = table((ROOT / "docs/design.md").read_text())
    assert len(rows) >= 12  # every row parsed: a row the pattern misses would go unchecked
    missing = [f"{path} {name}" for path, name in rows
               if not (ROOT / path).is_file() or not defined((ROOT / path).read_text(), name)]
    assert not missing, f"docs/design.md names what is not there: {missing}"


def test_the_table_check_catches_a_moved_or_renamed_function():
    doc = "## Where it happens\n\n| what | where |\n|---|---|\n| x | `relaygen_sgl/program.py` `_loop` |\n"
    (path, name), = table(doc)
    source = (ROOT / path).read_text()
    assert defined(source, name) and not defined(source, "_loop_gone")
    assert defined((ROOT / "relaygen_sgl/runtime/policy.py").read_text(), "RelayPolicy.after")
    assert not defined((ROOT / "relaygen_sgl/runtime/policy.py").read_text(), "RelayPolicy.handoff")


def test_no_function_in_the_runtime_program_or_api_is_longer_than_80_lines():
    files = [p for base in SHORT for p in ((ROOT / base).rglob("*.py") if (ROOT / base).is_dir() else [ROOT / base])]
    assert len(files) > 5
    long = {str(p.relative_to(ROOT)): found for p in files if (found := long_functions(p.read_text()))}
    assert not long, f"split these (at most {MAX_LINES} lines each): {long}"


@pytest.mark.parametrize("n, flagged", [(80, False), (81, True)])
def test_the_length_check_counts_a_functions_lines(n, flagged):
    source = "def f():\n" + "    x = 1\n" * (n - 2) + "    return x\n"
    assert bool(long_functions(source)) is flagged


def test_no_callable_goes_into_an_sglang_state_variable():
    """The relay's turns travel as typed requests on the trajectory, not as a control dict
    (with a lambda in it) in SGLang's `s[...]` variables, which SGLang documents as strings."""
    for path in [ROOT / "relaygen_sgl/program.py", *sorted((ROOT / "programs").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            state_var = any(isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id == "s"
                            for t in getattr(node, "targets", ()))
            if isinstance(node, ast.Assign) and state_var:
                assert not isinstance(node.value, (ast.Dict, ast.Lambda)), f"{path.name}:{node.lineno}"
