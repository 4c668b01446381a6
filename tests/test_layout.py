"""The package's layout: subpackages by layer, no module over 400 lines, and tests that mirror the
subpackages. (Classes have no cap of their own: one thing is one class, as ``LatentModel`` is.)"""

from __future__ import annotations

from conftest import REPO

PACKAGE = REPO / "vtrans"
MAX_MODULE_LINES = 400
MODULES = sorted(PACKAGE.rglob("*.py"))


def test_no_module_is_over_400_lines():
    lines = {str(path.relative_to(REPO)): len(path.read_text(encoding="utf-8").splitlines()) for path in MODULES}
    assert {path: n for path, n in lines.items() if n > MAX_MODULE_LINES} == {}


def test_every_subpackage_has_a_folder_of_tests():
    subpackages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert subpackages >= {"backbone", "latent", "estimators", "evaluation", "scoring", "cli"}
    assert subpackages <= {path.name for path in (REPO / "tests").iterdir() if path.is_dir()}
