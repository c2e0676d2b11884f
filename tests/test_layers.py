"""The layers of the package: what may import what (AST, no imports run)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dem_ray"


def runtime_imports(path: Path) -> set[str]:
    """Modules a file imports when it runs (imports under `if TYPE_CHECKING:` left out)."""
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            skipped.update(id(n) for n in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_core_imports_neither_ray_nor_anything_above_it():
    for path in sorted((PACKAGE / "core").glob("*.py")):
        for module in runtime_imports(path):
            assert not module.startswith("ray"), f"{path.name} imports {module}"
            if module.startswith("dem_ray"):
                assert module.startswith("dem_ray.core"), f"{path.name} imports {module}"


def test_the_run_directory_modules_do_not_import_the_stages_or_the_pipeline():
    for path in sorted((PACKAGE / "run").glob("*.py")):
        for module in runtime_imports(path):
            assert not module.startswith(("dem_ray.stages", "dem_ray.pipeline", "dem_ray.cli")), (
                f"run/{path.name} imports {module}"
            )
    assert not any(m.startswith("ray") for m in runtime_imports(PACKAGE / "run" / "trials.py"))


def test_stages_never_import_the_pipeline_or_the_cli():
    for path in sorted((PACKAGE / "stages").glob("*.py")):
        for module in runtime_imports(path):
            assert module not in ("dem_ray.pipeline", "dem_ray.cli"), f"{path.name}: {module}"


def test_manifest_and_storage_do_not_import_each_other_both_ways():
    storage = runtime_imports(PACKAGE / "run" / "storage.py")
    assert "dem_ray.run.manifest" not in storage
