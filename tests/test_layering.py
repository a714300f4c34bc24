"""moe_core stays pure PyTorch: it imports nothing from lightning, mlflow, optuna, apps or pipelines."""

import ast
from pathlib import Path

FORBIDDEN = ("lightning", "pytorch_lightning", "mlflow", "optuna", "optuna_integration", "apps", "pipelines")
ROOT = Path(__file__).resolve().parents[1] / "moe_core"


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
