"""The library's modules use one another only through names without a leading
underscore (issue 20): no ``from .x import _y`` and no ``x._y`` on a module ``x``
of the package imported as a name. Found by reading the source (``ast``)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dali_rehearsal"

# Known violations, each "path: what"; issue 20 removes them. Empty: keep it so.
ALLOWED: set[str] = set()


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_package_module(module: str | None, level: int, name: str, path: Path,
                       package: Path) -> bool:
    """``from <module> import name`` (relative by ``level``) binds a module of the package."""
    base = path.parent
    for _ in range(level - 1):
        base = base.parent
    if level == 0:
        if not (module or "").startswith("dali_rehearsal"):
            return False
        base = package.parent
    target = base.joinpath(*(module.split(".") if module else []), name)
    return target.with_suffix(".py").exists() or (target / "__init__.py").exists()


def violations(package: Path = PACKAGE) -> set[str]:
    found = set()
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        modules = set()                         # local names bound to package modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if _private(alias.name):
                        found.add(f"{rel}: from {'.' * node.level}{node.module or ''} "
                                  f"import {alias.name}")
                    elif _is_package_module(node.module, node.level, alias.name, path,
                                                package):
                        modules.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("dali_rehearsal") and alias.asname:
                        modules.add(alias.asname)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _private(node.attr)
                    and isinstance(node.value, ast.Name) and node.value.id in modules):
                found.add(f"{rel}: {node.value.id}.{node.attr}")
    return found


def test_no_module_reads_anothers_underscored_members():
    found = violations()
    new = sorted(found - ALLOWED)
    assert not new, "modules read other modules' private names:\n" + "\n".join(new)
    gone = sorted(ALLOWED - found)
    assert not gone, "fixed: remove from ALLOWED:\n" + "\n".join(gone)


def test_the_check_sees_a_violation(tmp_path):
    """Teeth: the scan flags both forms in a module of a package."""
    package = tmp_path / "dali_rehearsal"
    package.mkdir()
    for name in ("__init__", "storage", "checkpoint"):
        (package / f"{name}.py").write_text("")
    (package / "probe.py").write_text(
        "from .storage import _x\nfrom . import checkpoint\ncheckpoint._y\ncheckpoint.__doc__\n")
    assert violations(package) == {"dali_rehearsal/probe.py: from .storage import _x",
                                   "dali_rehearsal/probe.py: checkpoint._y"}
