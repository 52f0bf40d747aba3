"""bench/results/README.md indexes every result: each entry of a topic folder (and of its history/) is named
in it, and every path it names exists."""

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
INDEX = RESULTS / "README.md"


def _expand(span: str) -> list[str]:
    """`a.{json,md}` -> a.json, a.md (one brace group at most)."""
    found = re.search(r"\{([^{}]*)\}", span)
    if not found:
        return [span]
    return [span[:found.start()] + part + span[found.end():] for part in found.group(1).split(",")]


def _named() -> set[str]:
    """The paths the index names: code spans whose first segment is a folder of bench/results, relative to
    it (a leading bench/results/ dropped, a trailing / kept off); a pattern (`kernels/gpu-<device>-<date>/`)
    names nothing."""
    topics = {p.name for p in RESULTS.iterdir() if p.is_dir()}
    named = set()
    for span in re.findall(r"`([^`\s]+)`", INDEX.read_text()):
        span = span.removeprefix("bench/results/")
        if span.split("/", 1)[0] in topics and "/" in span and "<" not in span:
            named.update(path.rstrip("/") for path in _expand(span))
    return named


def _results() -> set[str]:
    """What must be indexed: every entry of each topic folder, and of its history/ folder; a result that is a
    folder of files counts as one."""
    entries = {p.name for p in RESULTS.iterdir() if p.is_file() and p.name != "README.md"}
    for topic in (p for p in RESULTS.iterdir() if p.is_dir()):
        for entry in topic.iterdir():
            if entry.name == "history" and entry.is_dir():
                entries.update(str(e.relative_to(RESULTS)) for e in entry.iterdir())
            else:
                entries.add(str(entry.relative_to(RESULTS)))
    return entries


def test_every_result_is_in_the_index():
    missing = sorted(_results() - _named())
    assert not missing, f"not in bench/results/README.md: {missing}"


def test_every_path_the_index_names_exists():
    named = _named()
    assert len(named) >= 20  # the index's paths were found at all
    absent = sorted(path for path in named if not (RESULTS / path).exists())
    assert not absent, f"bench/results/README.md names what is not there: {absent}"


def test_no_code_lives_in_results():
    assert not sorted(RESULTS.rglob("*.py")), "scripts belong in scripts/, not among the results"
