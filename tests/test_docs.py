"""The documentation matches the tree: every relative link and anchor in the Markdown pages resolves,
every "docs/design.md §n" (and "benchmarks/NOTES.md §n") reference names an existing section, the
README's layout names every module and config, the README links every docs page and stays short."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TRACKED = ("kernels", "vfnet", "orchestration", "benchmarks", "tests", "configs", "tools", "docs")
# Documents with numbered sections ("## 3. The model", "### 2.1 Which ..."), by the name code cites.
NUMBERED = {"design": ROOT / "docs" / "design.md", "NOTES": ROOT / "benchmarks" / "NOTES.md"}
# "docs/design.md §3", "design §3", "`benchmarks/NOTES.md` §4", "§2.1" (bare: the document itself).
REFERENCE = re.compile(r"(?:\b(design|NOTES)(?:\.md)?`?\s+)?§(\d+(?:\.\d+)*)")
README_MAX_LINES = 250


def _pages() -> list[Path]:
    """The Markdown pages whose links must resolve."""
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def _sources() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", ROOT / "pyproject.toml"]
    found = [p for d in TRACKED for pattern in ("*.py", "*.md", "*.toml") for p in (ROOT / d).rglob(pattern)]
    return files + [p for p in found if p != Path(__file__).resolve()]  # this file's examples are wrong on purpose


def _prose(text: str) -> str:
    """The text outside fenced code blocks, inline code spans removed (links inside them are not links)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: lower case, punctuation dropped, spaces -> hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page, repeated headings numbered as GitHub does (-1, -2, ...)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.MULTILINE):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """The relative links and images of `page` whose file or anchor does not exist, as `target` strings."""
    broken = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...: not checked here
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    return broken


def sections(document: Path) -> set[str]:
    """The section numbers of a numbered document: "## 3. Title" -> "3", "### 2.1 Title" -> "2.1"."""
    return set(re.findall(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", document.read_text(), re.MULTILINE))


def bad_references(source: Path, text: str) -> list[str]:
    """The "design §n" / "NOTES.md §n" references in `text` (read from `source`) to no existing section."""
    own = next((name for name, doc in NUMBERED.items() if doc == source), None)
    bad = []
    for name, number in REFERENCE.findall(text):
        name = name or own  # a bare "§n" cites the document it is in; elsewhere it is not checked
        if name and number not in sections(NUMBERED[name]):
            bad.append(f"{name} §{number}")
    return bad


def test_links_resolve():
    broken = {str(p.relative_to(ROOT)): b for p in _pages() if (b := broken_links(p))}
    assert broken == {}


def test_link_checker_catches_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "there.md").write_text("# Title\n\n## A section: `with` code, & more\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n## Own heading\n\n"
        "[ok](../there.md) [ok](../there.md#a-section-with-code--more) [ok](#own-heading) [web](https://x.invalid/y)\n"
        "[missing file](../nowhere.md) and ![missing image](img/none.png), [bad anchor](../there.md#no-such)\n"
        "[bad own anchor](#nope) `[in code](../nowhere2.md)`\n\n```\n[in a block](../nowhere3.md)\n```\n")
    assert broken_links(page) == ["../nowhere.md", "img/none.png", "../there.md#no-such", "#nope"]


def test_design_references_resolve():
    cited = {(str(p.relative_to(ROOT)), n) for p in _sources() for n in REFERENCE.findall(p.read_text()) if n[0]}
    assert cited, "no references found: the pattern is wrong"
    bad = {str(p.relative_to(ROOT)): b for p in _sources() if (b := bad_references(p, p.read_text()))}
    assert bad == {}
    assert not [p for p in _sources() if "DESIGN.md" in p.read_text()]


def test_reference_checker_catches_a_missing_section(tmp_path):
    text = ("see docs/design.md §3 and design §2.1, `benchmarks/NOTES.md`\n§4;"
            " docs/design.md §99, design §2.9, NOTES.md §9")
    assert bad_references(tmp_path / "x.py", text) == ["design §99", "design §2.9", "NOTES §9"]
    assert bad_references(NUMBERED["design"], "as in §1 and §42") == ["design §42"]


def _section(text: str, heading: str) -> str:
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_layout_names_every_module():
    layout = _section((ROOT / "README.md").read_text(), "Layout")
    names = {p.name for d in ("kernels", "vfnet", "orchestration", "tools") for p in (ROOT / d).glob("*.py")}
    names |= {p.stem for p in (ROOT / "vfnet").glob("*/*.py")}  # subpackages: data/ (coco, ...), ...
    names |= {p.name for d in ("configs", "vfnet/configs") for p in (ROOT / d).glob("*.toml")}
    names |= {"harness.py", "workload.py", "design.md"}
    missing = sorted(n for n in names - {"__init__.py", "__init__"} if not re.search(rf"\b{re.escape(n)}\b", layout))
    assert missing == [], f"README.md ## Layout does not name {missing}"


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"](docs/{p.name})" not in readme] == []


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail to docs/ (at most {README_MAX_LINES})"


@pytest.mark.parametrize("page", ["LICENSE", "CONTRIBUTING.md", "CHANGELOG.md", ".pre-commit-config.yaml"])
def test_contributor_files_exist(page):
    assert (ROOT / page).is_file()
