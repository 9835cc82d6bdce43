"""Tests of the import graph of the project's own modules, read with `ast` (imports at module level
and inside functions): dependencies flow one way, rewards <- envs <- agents <- the entry points,
and no two files import each other, directly or around a longer cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rewards", "envs", "agents", "bench")
SCRIPTS = ("train.py", "evaluate.py", "serve.py")
LIBRARY = ("rewards", "envs", "agents")
# What each library package may not import: the floors above it, the entry points and the benchmarks.
FORBIDDEN = {
    "rewards": ("envs", "agents", "train", "evaluate", "serve", "bench"),
    "envs": ("agents", "train", "evaluate", "serve", "bench"),
    "agents": ("train", "evaluate", "serve", "bench"),
}
TASKS = ("envs.routeworld", "envs.tasks")  # chosen by the entry points; the routers know none of them


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    target: str  # the imported project module, dotted (the deepest one that is a file)
    where: str  # "path:line" of the import statement


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files(roots=PACKAGES + SCRIPTS) -> dict[str, Path]:
    files = {}
    for root in roots:
        path = ROOT / root
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.exists() else []:
            files[module_name(file)] = file
    return files


def _deepest_module(dotted: str, modules) -> str | None:
    """The longest prefix of `dotted` that names one of `modules` (a module's parent packages run
    too, but a file depends on what it names, so `import envs.episode` is an edge to envs.episode only)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in modules:
            return name
    return None


def imports_of(name: str, path: Path, modules) -> list[Import]:
    """Every import of a project module in one file, wherever in the file it is written."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import: climb from this file's package
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from a import b` imports the module a.b when b is one, else a name in a
            targets = [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
        else:
            continue
        where = f"{path.relative_to(ROOT)}:{node.lineno}"
        for dotted in targets:
            target = _deepest_module(dotted, modules)
            if target is not None and target != name:
                found.append(Import(name, target, where))
    return list(dict.fromkeys(found))  # one edge per statement and target


def import_graph(roots=PACKAGES + SCRIPTS) -> list[Import]:
    files = project_files(roots)
    every = set(project_files()) | set(files)
    return [edge for name, path in files.items() for edge in imports_of(name, path, every)]


def find_cycle(edges: list[Import]) -> list[Import] | None:
    """One cycle of the graph as the list of its edges, or None (an iterative depth-first search)."""
    out: dict[str, list[Import]] = {}
    for edge in edges:
        out.setdefault(edge.source, []).append(edge)
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    for start in sorted(out):
        if state.get(start):
            continue
        path: list[Import] = []
        stack = [(start, iter(out.get(start, ())))]
        state[start] = 1
        while stack:
            node, todo = stack[-1]
            edge = next(todo, None)
            if edge is None:
                state[node] = 2
                stack.pop()
                if path:
                    path.pop()
                continue
            if state.get(edge.target) == 1:
                cycle = path + [edge]
                first = next(i for i, e in enumerate(cycle) if e.source == edge.target)
                return cycle[first:]
            if not state.get(edge.target):
                state[edge.target] = 1
                path.append(edge)
                stack.append((edge.target, iter(out.get(edge.target, ()))))
    return None


def _top(module: str) -> str:
    return module.split(".")[0]


def test_no_two_project_files_import_each_other_directly_or_around_a_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(
        f"{e.source} ({e.where})" for e in cycle) + f" -> {cycle[0].source}"


def test_each_library_package_imports_only_the_floors_below_it():
    wrong = [f"{e.where}: {e.source} imports {e.target}" for e in import_graph()
             if _top(e.target) in FORBIDDEN.get(_top(e.source), ())]
    assert not wrong, "imports against the layering rewards <- envs <- agents <- scripts:\n" + "\n".join(wrong)


def test_the_routers_know_no_task():
    wrong = [f"{e.where}: {e.source} imports {e.target}" for e in import_graph(("agents",))
             if e.source.startswith("agents.routers") and e.target.startswith(TASKS)]
    assert not wrong, "a router imports a task (pass in what it needs where the task is chosen):\n" + "\n".join(wrong)


def test_tests_do_not_import_the_benchmarks():
    wrong = [f"{e.where}: {e.source} imports {e.target}" for e in import_graph(("tests",))
             if _top(e.target) == "bench"]
    assert not wrong, "tests import bench/ (move what both need into the library or tests/):\n" + "\n".join(wrong)


def test_importing_rewards_starts_no_environment():
    # a fresh interpreter: the test session has long imported gymnasium through envs
    code = "import rewards, sys; assert 'gymnasium' not in sys.modules and 'envs' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_the_graph_reader_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    # the checker itself: an import hidden in a function and a relative import are both edges
    pkg = tmp_path / "envs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from envs import b\n")
    (pkg / "b.py").write_text("from . import a\nimport agents.x\n")
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "x.py").write_text("")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    edges = import_graph(("envs", "agents"))
    assert {(e.source, e.target, e.where) for e in edges} == {
        ("envs.a", "envs.b", "envs/a.py:2"), ("envs.b", "envs.a", "envs/b.py:1"),
        ("envs.b", "agents.x", "envs/b.py:2")}
    assert {e.source for e in find_cycle(edges)} == {"envs.a", "envs.b"}
