"""Imports run one way (ARCHITECTURE.md): cli → daemon → enforce → core → probes.

Every import of every module counts, those inside functions too: an import put off to
run time is still a dependency, and hiding a cycle that way is what this test is for.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("probes", "core", "enforce", "daemon", "cli")      # lowest first
L7 = "agentwarden.daemon.l7"


def modules(root: Path = REPO) -> dict[str, Path]:
    out = {}
    for top in LAYERS:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(["agentwarden", *parts])] = path
    return out


def imports(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """The modules of ours that `name` imports (a `from package import module` names the module)."""
    known = set(known)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                head = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{head}.{base}" if base else head
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m.startswith("agentwarden.")}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def violations(mods: dict[str, Path]) -> list[str]:
    out = []
    for name, path in mods.items():
        for dep in sorted(imports(name, path, mods)):
            if dep.split(".")[1] not in LAYERS:
                out.append(f"{name} imports {dep}, which is in no layer")
            elif layer(dep) > layer(name):
                out.append(f"{name} imports {dep}: {dep.split('.')[1]} is above {name.split('.')[1]}")
            elif name.startswith("agentwarden.probes") and not dep.startswith("agentwarden.probes"):
                out.append(f"{name} imports {dep}: probes import nothing of ours")
            elif name.startswith(L7) and not dep.startswith(L7):
                out.append(f"{name} imports {dep}: the protocol parsers are sans-IO, bytes in, messages out")
    return out


def cycles(mods: dict[str, Path]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {n: sorted(d for d in imports(n, p, mods) if d in mods and d != n) for n, p in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_imports_run_one_way() -> None:
    mods = modules()
    assert len(mods) > 40 and all(any(m.startswith(f"agentwarden.{t}") for m in mods) for t in LAYERS)
    assert violations(mods) == []


def test_no_module_imports_itself_round_a_cycle() -> None:
    assert cycles(modules()) == []


def test_the_checker_sees_a_wrong_way_import_and_a_cycle(tmp_path: Path) -> None:
    for top in LAYERS:
        (tmp_path / top).mkdir()
        (tmp_path / top / "__init__.py").write_text("")
    (tmp_path / "core" / "a.py").write_text("from agentwarden.daemon import b\n")
    (tmp_path / "daemon" / "b.py").write_text("def f():\n    from agentwarden.core import a\n")
    (tmp_path / "daemon" / "l7").mkdir()
    (tmp_path / "daemon" / "l7" / "__init__.py").write_text("")
    (tmp_path / "daemon" / "l7" / "p.py").write_text("from agentwarden.core.a import x\n")
    (tmp_path / "probes" / "q.py").write_text("import agentwarden.core.a\n")
    mods = modules(tmp_path)
    found = violations(mods)
    assert any(v.startswith("agentwarden.core.a imports agentwarden.daemon.b") for v in found)
    assert any(v.startswith("agentwarden.daemon.l7.p imports agentwarden.core.a") for v in found)
    assert any(v.startswith("agentwarden.probes.q imports agentwarden.core.a") for v in found)
    assert cycles(mods) == [["agentwarden.core.a", "agentwarden.daemon.b"]]
