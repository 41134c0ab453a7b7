"""The import arrows: rwmn -> kernels, bench -> rwmn and kernels, never back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Package -> the project packages it must never import.
FORBIDDEN = {"kernels": {"rwmn", "bench", "tests"}, "rwmn": {"bench", "tests"}}


def _imported_packages(path: Path) -> set[str]:
    """Top-level packages of every import in the file, function-level imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_points_back(package):
    wrong = {
        str(path.relative_to(ROOT)): sorted(_imported_packages(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    wrong = {name: bad for name, bad in wrong.items() if bad}
    assert not wrong, f"imports against the arrows: {wrong}"


def test_the_check_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from bench import census\n")
    assert "bench" in _imported_packages(bad)
