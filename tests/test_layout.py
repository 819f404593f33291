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


# --------------------------------------------------------------- imports
#: Packages a module may import inside a function: optional third-party
#: libraries (and DALI), loaded only when the feature that needs them runs.
OPTIONAL = ("mpi4py", "torch", "cupy", "cupyx", "nvidia", "nvtx")

# Imports inside functions allowed, each "path: module". Empty: keep it so.
ALLOWED_INNER: set[str] = set()


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts) if parts[-1] != "__init__" else ".".join(parts[:-1]) + ".__init__"


def _targets(node, path: Path, package: Path) -> list[str]:
    """The modules an import statement loads: package modules by dotted name
    (``x.__init__`` for a package), other modules by their own name."""
    root = package.name
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level == 0:
        base, names = (node.module or "").split("."), node.names
        if base[0] != root:
            return [node.module]
        base_dir = package.parent.joinpath(*base)
    else:
        base_dir = path.parent
        for _ in range(node.level - 1):
            base_dir = base_dir.parent
        if node.module:
            base_dir = base_dir.joinpath(*node.module.split("."))
    found = []
    for alias in node.names:
        sub = base_dir / alias.name
        if sub.with_suffix(".py").exists():
            found.append(_module_name(sub.with_suffix(".py"), package))
        elif (sub / "__init__.py").exists():
            found.append(_module_name(sub / "__init__.py", package))
        elif base_dir.with_suffix(".py").exists():
            found.append(_module_name(base_dir.with_suffix(".py"), package))
        else:
            found.append(_module_name(base_dir / "__init__.py", package))
    return found


def _imports(package: Path):
    """``(path, module, target, inside_function)`` for every import statement."""
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        inner = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                inner.update(id(n) for n in ast.walk(fn) if n is not fn)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, path, package):
                    yield path, _module_name(path, package), target, id(node) in inner


def inner_imports(package: Path = PACKAGE) -> set[str]:
    """Imports placed inside functions, other than of optional packages."""
    found = set()
    for path, _, target, inside in _imports(package):
        if inside and target.split(".")[0] not in OPTIONAL:
            found.add(f"{path.relative_to(package.parent).as_posix()}: {target}")
    return found


def import_cycles(package: Path = PACKAGE) -> list[list[str]]:
    """Cycles of the graph of the package's modules (every import statement,
    at module level or in a function). Importing ``p.x`` runs ``p/__init__``
    first: a module outside ``p`` that imports ``p.x`` depends on ``p.__init__``
    too."""
    root = package.name
    graph: dict[str, set[str]] = {}
    for _, module, target, _ in _imports(package):
        if not target.startswith(root + ".") and target != root:
            continue
        edges = graph.setdefault(module, set())
        edges.add(target)
        parts = target.split(".")
        for i in range(1, len(parts)):
            pkg = ".".join(parts[:i])
            if not module.startswith(pkg + "."):
                edges.add(pkg + ".__init__")
        edges.discard(module)
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_no_imports_hidden_in_functions():
    found = inner_imports()
    new = sorted(found - ALLOWED_INNER)
    assert not new, "imports inside functions (move them to the top; a circle they dodge " \
                    "must be cut instead):\n" + "\n".join(new)
    gone = sorted(ALLOWED_INNER - found)
    assert not gone, "fixed: remove from ALLOWED_INNER:\n" + "\n".join(gone)


#: Known cycles. Empty: keep it so.
ALLOWED_CYCLES: set[str] = set()


def test_the_import_graph_has_no_cycle():
    cycles = {" -> ".join(c) for c in import_cycles()}
    new = sorted(cycles - ALLOWED_CYCLES)
    assert not new, "import cycles:\n" + "\n".join(new)


def test_the_import_checks_see_a_hidden_circle(tmp_path):
    """Teeth: a circle dodged by an import inside a function is seen by both checks."""
    package = tmp_path / "dali_rehearsal"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from . import a\n")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("from .b import f\n")
    (package / "sub" / "b.py").write_text(
        "def f():\n    from ..a import g\n    import torch\n    return g\n")
    assert inner_imports(package) == {"dali_rehearsal/sub/b.py: dali_rehearsal.a"}
    cycles = import_cycles(package)
    assert any({"dali_rehearsal.a", "dali_rehearsal.sub.b"} <= set(c) for c in cycles), cycles
