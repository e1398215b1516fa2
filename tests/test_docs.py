"""README.md and docs/RELIABILITY.md against the repository: the paths and tests they name exist,
the README's layout lists the tree, and it links every report in docs/. (The README's cluster
commands are checked in test_distributed.py.)"""

from __future__ import annotations

import fnmatch
import re

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def _top_level() -> set[str]:
    """The repository's top-level entries: not hidden, not ignored by .gitignore."""
    ignored = [p.strip().strip("/") for p in (ROOT / ".gitignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    return {p.name for p in ROOT.iterdir() if not p.name.startswith(".")
            and not any(fnmatch.fnmatch(p.name, pattern) for pattern in ignored)}


def _section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_every_repository_path_the_readme_names_exists():
    """A path in backticks that starts at the repository's top level (`q8/lit/resume.py`,
    `conf/optimizer/sgd.yaml`, `docs/RESULTS.md`...) names a file or folder that is there."""
    roots = _top_level() | {".ci"}
    named = {m for m in re.findall(r"`([\w./-]+)`", README)
             if m.split("/")[0] in roots}
    assert len(named) > 20
    missing = sorted(m for m in named if not (ROOT / m).exists())
    assert missing == []


def test_the_layout_lists_every_top_level_entry():
    layout = _section("Development")
    unlisted = sorted(name for name in _top_level() - {"README.md"}
                      if f"`{name}`" not in layout and f"`{name}/`" not in layout)
    assert unlisted == []


def test_every_report_in_docs_is_linked():
    links = _section("Further reading")
    reports = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert reports and [r for r in reports if f"`docs/{r}`" not in links] == []


def test_every_test_the_reliability_notes_name_exists():
    """docs/RELIABILITY.md names the test of each fault: `file.py::test_name`, a bare
    `test_name`, or `test_prefix_*`; each is defined in that file, or in some file of tests/."""
    text = (ROOT / "docs" / "RELIABILITY.md").read_text()
    sources = {p.name: p.read_text() for p in (ROOT / "tests").glob("test_*.py")}
    named = re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+\*?)`", text)
    assert len(named) > 15
    missing = []
    for file, name in named:
        where = [sources[file]] if file else list(sources.values())
        pattern = re.escape(name.rstrip("*")) + (r"\w*" if name.endswith("*") else r"\b")
        if not any(re.search(rf"^def {pattern}", source, re.M) for source in where):
            missing.append(f"{file}::{name}" if file else name)
    assert missing == []
