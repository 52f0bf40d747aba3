"""Every repository path the docs and the README name in backticks exists: a guide that points a reader at a test,
a module or a committed result must not point at nothing after a rename."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
# a path under one of these folders, ending in a file name or a folder's slash; globs and placeholders are skipped
PATH = re.compile(r"`((?:tests|bench|fastsae|kernels|scripts|docs)/[^`\s*<>{}]+?)`")


def named_paths(doc: Path) -> list[tuple[int, str]]:
    return [(n, m.group(1).split("::")[0].rstrip(".,:;)"))
            for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1) for m in PATH.finditer(line)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_named_path_exists(doc):
    missing = [f"{doc.relative_to(ROOT)}:{n}: {p}" for n, p in named_paths(doc) if not (ROOT / p).exists()]
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)


def test_the_pattern_finds_a_path_and_skips_placeholders(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("see `tests/test_layers.py::test_x`, `bench/results/a-<device>/` and `fastsae/*.py`\n")
    assert named_paths(doc) == [(1, "tests/test_layers.py")]
