"""The package's layout (issue 19): subpackages by layer, no module over 400 lines, no class over 150,
and tests that mirror the subpackages."""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGE = REPO / "vtrans"
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 150
MODULES = sorted(PACKAGE.rglob("*.py"))


def test_no_module_is_over_400_lines():
    lines = {str(path.relative_to(REPO)): len(path.read_text(encoding="utf-8").splitlines()) for path in MODULES}
    assert {path: n for path, n in lines.items() if n > MAX_MODULE_LINES} == {}


def test_no_class_is_over_150_lines():
    long = {}
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long[f"{path.relative_to(REPO)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert long == {}


def test_every_subpackage_has_a_folder_of_tests():
    subpackages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert subpackages >= {"backbone", "latent", "estimators", "evaluation", "scoring", "cli"}
    assert subpackages <= {path.name for path in (REPO / "tests").iterdir() if path.is_dir()}
