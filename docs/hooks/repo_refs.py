"""MkDocs hook: every repository path and `fastsae.` name that a page cites in a code span must exist.

The docs cite files outside `docs/` (results in `bench/results/`, modules, tests) as code spans, since MkDocs
cannot link out of its docs directory. This hook makes those citations as strict as links: a path that is not
in the checkout, or a dotted `fastsae.…` name whose module or attribute is gone, is logged as a warning, which
`mkdocs build --strict` turns into a failed build. Names are checked statically (no import): the longest
prefix that is a module file, then each remaining part must be defined or imported in that file.
"""

from __future__ import annotations

import glob
import logging
import re
from pathlib import Path

log = logging.getLogger("mkdocs.plugins.repo_refs")
ROOT = Path(__file__).resolve().parents[2]
# Top-level folders whose files the docs cite; `runs/` and the like are outputs, not checked.
PATH_ROOTS = ("bench/", "fastsae/", "kernels/", "tests/", "examples/", "scripts/", "docs/", ".ci/")
FENCE = re.compile(r"^( {0,3})(```|~~~).*?^\1\2[^\n]*$", re.S | re.M)
INDENTED = re.compile(r"(?:^(?: {4}|\t).*\n?)+", re.M)
SPAN = re.compile(r"`([^`\n]+)`")
PATH = re.compile(r"^[\w.\-/*]+$")
NAME = re.compile(r"^fastsae(?:\.\w+)+")


def _module_file(parts: list[str]) -> Path | None:
    base = ROOT.joinpath(*parts)
    if parts[:2] == ["fastsae", "kernels"]:  # installed from kernels/ (pyproject's package-dir)
        base = ROOT.joinpath("kernels", *parts[2:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _missing_name(dotted: str) -> str | None:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = _module_file(parts[:cut])
        if module is None:
            continue
        text = module.read_text(encoding="utf-8")
        for attr in parts[cut:]:
            if not re.search(rf"\b{re.escape(attr)}\b", text):
                return f"{attr!r} not found in {module.relative_to(ROOT)}"
        return None
    return "no such module"


def _missing_path(path: str) -> bool:
    if any(ch in path for ch in "*?["):
        return not glob.glob(str(ROOT / path))
    return not (ROOT / path.rstrip("/")).exists()


def on_page_markdown(markdown: str, page, **_) -> str:
    prose = INDENTED.sub("", FENCE.sub("", markdown))
    for span in SPAN.findall(prose):
        span = span.strip()
        if span.startswith(PATH_ROOTS) and PATH.match(span) and _missing_path(span):
            log.warning("%s: `%s` is not in the repository", page.file.src_path, span)
        name = NAME.match(span)
        if name and not span.startswith("fastsae/"):
            why = _missing_name(name.group(0))
            if why:
                log.warning("%s: `%s`: %s", page.file.src_path, span, why)
    return markdown
