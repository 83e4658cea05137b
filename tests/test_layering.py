"""The areas of `vfnet/` import one way (docs/design.md §1): each area imports only the areas
listed for it here, so a newcomer can read them bottom-up and an upward import fails this test."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# area -> the vfnet areas (and outside packages of the project) it may import
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "evaluate": {"core"},
    "model": {"core", "kernels"},
    "interop": {"core", "model", "kernels"},
    "api": {"core", "data", "model", "interop"},
    "train": {"core", "data", "model", "evaluate", "interop", "kernels"},
    "cli": {"core", "data", "model", "evaluate", "interop", "train", "api", "kernels"},
}


def _area(module: str) -> str | None:
    """'vfnet.model.head' -> 'model'; 'kernels.ops' -> 'kernels'; other packages -> None."""
    parts = module.split(".")
    if parts[0] in ("kernels", "orchestration", "benchmarks"):
        return parts[0]
    if parts[0] != "vfnet":
        return None
    return parts[1] if len(parts) > 1 else "vfnet"


def imported_areas(path: Path) -> set[str]:
    """The project areas a module imports anywhere in its body (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"vfnet.{a.name}" for a in node.names] if node.module == "vfnet" else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(a for a in map(_area, names) if a is not None)
    return found


def test_every_area_imports_only_the_areas_below_it():
    problems = []
    for path in sorted((ROOT / "vfnet").rglob("*.py")):
        rel = path.relative_to(ROOT / "vfnet")
        area = rel.parts[0].removesuffix(".py")
        if area == "__init__":
            continue  # the package's lazy re-export of vfnet.api
        assert area in ALLOWED, f"vfnet/{rel}: area {area!r} is not in the layering table"
        bad = imported_areas(path) - ALLOWED[area] - {area}
        if bad:
            problems.append(f"vfnet/{rel} ({area}) imports {sorted(bad)}")
    assert not problems, problems


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "engine_user.py"
    bad.write_text("def f():\n    from vfnet.train.engine import train\n    return train\n")
    assert imported_areas(bad) == {"train"}
