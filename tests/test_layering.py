"""advtrain's import layering, read from the source with ``ast`` (every
import counts: module level, inside functions and under ``TYPE_CHECKING``).

From the bottom up: ``utils`` imports nothing else of advtrain; attacks,
models and data know nothing of policies, training, the methods, evaluation,
diagnostics, the study or the CLI; policies know nothing of what is above
them; evaluation knows nothing of training, the methods, diagnostics, the
study or the CLI; the training loop knows nothing of the methods (which are
built on it), diagnostics, the study or the CLI.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "advtrain"
UPPER = {"policies", "training", "methods", "evaluation", "diagnostics", "study", "cli"}
FORBIDDEN: Dict[str, Set[str]] = {
    "attacks": UPPER,
    "models": UPPER,
    "data": UPPER,
    "policies": UPPER - {"policies"},
    "evaluation": {"training", "methods", "diagnostics", "study", "cli"},
    "training": {"methods", "diagnostics", "study", "cli"},
    "methods": {"study", "cli"},
    "diagnostics": {"study", "cli"},
}
CLI_MODULES = {"cli", "cli_errors", "cli_methods", "cli_study", "__main__"}


def module_name(path: Path, root: Path) -> str:
    """The dotted name of the module in ``path`` (a package's ``__init__.py``
    names the package), for a package directory ``root``."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> Set[str]:
    """The modules of the package at ``root`` that the file ``path`` imports,
    relative imports resolved; ``from PACKAGE import name`` counts as an
    import of the submodule ``name`` when there is one."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:
                sub = Path(root.parent, *f"{target}.{alias.name}".split("."))
                if sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file():
                    found.add(f"{target}.{alias.name}")
    return {m for m in found if m == root.name or m.startswith(root.name + ".")}


def part_of(module: str) -> str:
    """The layer a module belongs to: its subpackage (``attacks``, ...),
    ``cli`` for the command-line modules, else its own top-level name."""
    parts = module.split(".")
    if len(parts) == 1:
        return parts[0]
    return "cli" if parts[1] in CLI_MODULES else parts[1]


@functools.lru_cache(maxsize=None)
def import_graph(root: Path) -> Dict[str, Set[str]]:
    return {module_name(p, root): imported_modules(p, root) for p in sorted(root.rglob("*.py"))}


def violations(root: Path) -> List[Tuple[str, str]]:
    """``(importer, imported)`` pairs that break the layering."""
    graph = import_graph(root)
    bad = []
    for module, imports in graph.items():
        layer = part_of(module)
        for target in sorted(imports):
            target_layer = part_of(target)
            if layer == "utils" and target_layer != "utils":
                bad.append((module, target))
            elif target_layer in FORBIDDEN.get(layer, set()):
                bad.append((module, target))
    return bad


def test_the_layers_import_only_downwards():
    bad = violations(PACKAGE_DIR)
    assert not bad, "upward imports: " + ", ".join(f"{a} -> {b}" for a, b in bad)


def test_the_utilities_import_nothing_else_of_advtrain():
    graph = import_graph(PACKAGE_DIR)
    utils = {m: i for m, i in graph.items() if part_of(m) == "utils"}
    assert "advtrain.utils.batches" in utils
    assert all(part_of(target) == "utils" for imports in utils.values() for target in imports)


def test_the_import_graph_resolves_relative_and_package_imports():
    graph = import_graph(PACKAGE_DIR)
    assert "advtrain.distributed" in graph["advtrain.diagnostics.monitor"]  # from .. import distributed
    assert "advtrain.utils.progress" in graph["advtrain.training.trainer"]  # from ..utils.progress import ...
    assert "advtrain.utils.modes" in graph["advtrain.utils.batches"]  # from .modes import ...
    assert "advtrain.attacks" in graph["advtrain"]  # the package's __init__
    assert part_of("advtrain.cli_errors") == part_of("advtrain.cli_study") == part_of("advtrain.cli") == "cli"


@pytest.mark.parametrize("importer, source, expected", [
    ("evaluation/report.py", "from ..training.trainer import Trainer\n",
     {"advtrain.training.trainer"}),
    ("attacks/fast.py", "def f():\n    from ..policies import store\n",
     {"advtrain.policies", "advtrain.policies.store"}),
    ("utils/extra.py", "import advtrain.data\n", {"advtrain.data"}),
    ("policies/p.py", "from .. import cli\n", {"advtrain.cli"}),
])
def test_an_upward_import_is_reported(tmp_path, importer, source, expected):
    root = tmp_path / "advtrain"
    for package in ("attacks", "policies", "training", "evaluation", "utils", "data"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "cli.py").write_text("")
    (root / "training" / "trainer.py").write_text("from ..evaluation import report\n")  # allowed
    (root / "policies" / "store.py").write_text("")
    (root / importer).write_text(source)
    importer_name = module_name(root / importer, root)
    bad = violations(root)
    assert {target for module, target in bad if module == importer_name} >= expected
    assert all(module == importer_name for module, _ in bad)
