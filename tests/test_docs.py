"""The documentation matches the tree: "docs/design.md §n" references resolve, and the README's
layout section names every module and config."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"(?:docs/)?design\.md §(\d+)")


TRACKED = ("kernels", "vfnet", "orchestration", "benchmarks", "tests", "configs", "tools", "docs")


def _sources() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "pyproject.toml"]
    return files + [p for d in TRACKED for pattern in ("*.py", "*.md", "*.toml") for p in (ROOT / d).rglob(pattern)]


def test_design_references_resolve():
    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "design.md").read_text(), re.MULTILINE))
    cited = {(str(p.relative_to(ROOT)), n) for p in _sources() for n in REFERENCE.findall(p.read_text())}
    assert cited, "no references found: the pattern is wrong"
    assert [c for c in sorted(cited) if c[1] not in sections] == []
    assert not [p for p in _sources() if "DESIGN.md" in p.read_text() and p.name != "test_docs.py"]


def test_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    names = {p.name for d in ("kernels", "vfnet", "orchestration", "tools") for p in (ROOT / d).glob("*.py")}
    names |= {p.stem for p in (ROOT / "vfnet").glob("*/*.py")}  # subpackages: data/ (coco, ...), ...
    names |= {p.name for p in (ROOT / "configs").glob("*.toml")} | {"harness.py", "workload.py", "design.md"}
    missing = sorted(n for n in names - {"__init__.py", "__init__"} if not re.search(rf"\b{re.escape(n)}\b", layout))
    assert missing == [], f"README.md ## Layout does not name {missing}"
