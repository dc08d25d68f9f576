"""The package's import structure: no cycles between its parts (DESIGN.md: one idea per module).

A part is a subpackage (``fuyou.engine``, ``fuyou.store``, ...) or a top-level module (``fuyou.policy``,
``fuyou.config``), except that each subpackage's settings module (``fuyou.engine.config``, ...) is a part
of its own: the sections ``fuyou.config`` gathers sit below both it and what uses them. Every
``import`` counts, function-level ones included (a lazy import hides a cycle from the interpreter, not
from a reader), except those under ``if TYPE_CHECKING:``, which only name types.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fuyou

ROOT = Path(fuyou.__file__).parent


def _part(module: str) -> str | None:
    bits = module.split(".")
    if bits[0] != "fuyou" or len(bits) < 2:
        return None
    if len(bits) >= 3 and bits[2] == "config":
        return f"{bits[1]}.config"
    return bits[1]


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        src = _part(".".join(rel.parts))
        if src is None:
            continue
        deps = graph.setdefault(src, set())
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for top in ast.walk(tree) if isinstance(top, ast.If) and _type_checking(top.test)
                       for n in ast.walk(top)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names] if node.module == "fuyou" \
                    else [node.module]
                for n in names:
                    dst = _part(n)
                    if dst and dst != src:
                        deps.add(dst)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    dst = _part(a.name)
                    if dst and dst != src:
                        deps.add(dst)
    return graph


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, seen = [], set()

    def visit(node, path):
        if node in path:
            cyc = path[path.index(node):] + [node]
            key = frozenset(cyc)
            if key not in seen:
                seen.add(key)
                found.append(cyc)
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])

    for start in sorted(graph):
        visit(start, [])
    return found


def test_no_import_cycles_between_the_parts_of_fuyou():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_parser_does_not_import_torch():
    """`fuyou --help` and every command's parser stay quick: torch (about a second) is imported by the
    commands that need it, not by building the parser (fuyou.data and fuyou.planner import it lazily)."""
    import subprocess
    import sys

    code = ("import sys, fuyou.cli; fuyou.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_two_test_modules_share_a_name():
    """pytest imports test modules by their basename (no packages under tests/): a second test_lora.py stopped the
    whole suite at collection, which CI would have run as a failure of everything."""
    tests = Path(__file__).parent
    seen: dict[str, Path] = {}
    for p in sorted(tests.rglob("*.py")):
        if p.name.startswith("test_") or p.name.endswith("_testutil.py"):  # (conftest.py: one a folder, by design)
            assert p.name not in seen, f"{p} and {seen[p.name]} share a name"
            seen[p.name] = p


def test_every_test_directory_is_collected(pytestconfig):
    """pytest skips directories named as its ``norecursedirs`` (``dist``, ``build``, ``venv``, ...) without a
    word: tests/dist, the data-parallel tests, ran in no suite for as long as it had that name (found in
    session 27; it is tests/distributed now). Every directory holding test files must be one pytest enters."""
    import fnmatch

    skipped = pytestconfig.getini("norecursedirs")
    tests = Path(__file__).parent
    hidden = sorted(str(d.relative_to(tests)) for d in tests.rglob("*") if d.is_dir() and any(d.glob("test_*.py"))
                    and any(fnmatch.fnmatch(part, pat) for part in d.relative_to(tests).parts for pat in skipped))
    assert not hidden, f"test directories pytest never collects (norecursedirs {skipped}): {hidden}"
