"""Import rules, checked on the source (every import statement, including those inside functions):

* moe_core stays pure PyTorch: it imports nothing from lightning, mlflow, optuna, apps or pipelines;
* apps import neither pipelines nor each other (an app package may use the shared top-level ``apps.*``
  modules, e.g. ``apps.datadir``);
* the pipelines modules import each other without a cycle.

Each rule's checker is also run on a small synthetic tree that breaks it, so the checks can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

FORBIDDEN = ("lightning", "pytorch_lightning", "mlflow", "optuna", "optuna_integration", "apps", "pipelines")
REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "moe_core"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, root: Path | None = None) -> list[str]:
    """Absolute names of every module ``path`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path, root).split(".") if root is not None else []
    if root is not None and path.name != "__init__.py":
        package = package[:-1]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if root is None:
                    continue
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{a.name}" for a in node.names if a.name != "*"]
    return [n for n in names if n]


def _imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_moe_core_imports_no_framework_or_app_code():
    files = sorted(ROOT.rglob("*.py"))
    assert files, "moe_core has no Python files"
    bad = [
        f"{f.relative_to(ROOT.parent)} imports {m}"
        for f in files
        for m in _imported_modules(f)
        if m.split(".")[0] in FORBIDDEN
    ]
    assert not bad, "layering violated:\n" + "\n".join(bad)


def test_layering_check_detects_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("import lightning as L\nfrom mlflow import log_metric\n")
    assert [m.split(".")[0] for m in _imported_modules(bad)] == ["lightning", "mlflow"]


# -- apps ------------------------------------------------------------------------------------------------
def app_violations(apps_root: Path) -> list[str]:
    """Imports of ``pipelines`` anywhere under ``apps_root``, and of one app package by another."""
    root = apps_root.parent
    packages = {p.name for p in apps_root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    bad = []
    for f in sorted(apps_root.rglob("*.py")):
        rel = f.relative_to(apps_root).parts
        own = rel[0] if len(rel) > 1 else None  # None: a shared top-level module such as apps/datadir.py
        for m in _imports(f, root):
            parts = m.split(".")
            if parts[0] == "pipelines":
                bad.append(f"{f.relative_to(root)} imports {m}")
            elif parts[0] == apps_root.name and len(parts) > 1 and parts[1] in packages and parts[1] != own:
                bad.append(f"{f.relative_to(root)} imports {m} (another app)")
    return sorted(set(bad))


def test_apps_import_neither_pipelines_nor_each_other():
    assert (REPO / "apps" / "recsys" / "app.py").is_file()
    bad = app_violations(REPO / "apps")
    assert not bad, "layering violated:\n" + "\n".join(bad)


def test_app_check_detects_violations(tmp_path):
    apps = tmp_path / "apps"
    for name in ("one", "two"):
        (apps / name).mkdir(parents=True)
        (apps / name / "__init__.py").write_text("")
    (apps / "__init__.py").write_text("")
    (apps / "datadir.py").write_text("")
    ok = "from apps.datadir import x\nfrom apps.one import y\nfrom . import z\n"
    (apps / "one" / "ok.py").write_text(ok)
    (apps / "one" / "app.py").write_text("def f():\n    from pipelines.apps import get_app\n")
    (apps / "two" / "model.py").write_text("from ..one import model\nimport apps.one.data\n")
    assert app_violations(apps) == [
        "apps/one/app.py imports pipelines.apps",
        "apps/one/app.py imports pipelines.apps.get_app",
        "apps/two/model.py imports apps.one (another app)",
        "apps/two/model.py imports apps.one.data (another app)",
        "apps/two/model.py imports apps.one.model (another app)",
    ]


# -- pipelines -------------------------------------------------------------------------------------------
def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (at module level or inside functions)."""
    root = package.parent
    modules = {_module_name(f, root): f for f in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, f in modules.items():
        graph[name] = {m for m in _imports(f, root) if m in modules and m != name and m != package.name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]``, or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1 on the DFS stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_pipelines_has_no_import_cycle():
    graph = import_graph(REPO / "pipelines")
    assert "pipelines.cli" in graph and graph["pipelines.cli"], graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle among pipelines modules: " + " -> ".join(cycle)


def test_cycle_check_detects_a_cycle_inside_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\nfrom pkg.b import g\n")
    (pkg / "b.py").write_text("def g():\n    from . import c\n")
    (pkg / "c.py").write_text("def h():\n    import pkg.a\n")
    (pkg / "d.py").write_text("from pkg import a\n")
    graph = import_graph(pkg)
    want = {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}, "pkg.d": {"pkg.a"}}
    assert graph == want
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("def h():\n    import os\n")
    assert find_cycle(import_graph(pkg)) is None
