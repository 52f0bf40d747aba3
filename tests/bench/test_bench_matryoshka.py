"""bench.matryoshka runs end to end at a tiny shape: every row computes the same loss, the fused row keeps the
least for its backward, and the tables are saved."""

import json

from bench.matryoshka import main


def test_matryoshka_bench_runs_and_saves(tmp_path):
    assert main(["--n", "32", "--d-in", "16", "--d-sae", "64", "--k", "4", "--widths", "8", "24", "64",
                 "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("matryoshka-cpu-*.json")
    rows = json.loads(report.read_text())["rows"]
    assert len(rows) == 4 and len({round(r["loss"], 4) for r in rows}) == 1
    saved = {r["impl"]: r["saved_for_backward_mb"] for r in rows}
    assert saved["fused (fastsae)"] < min(v for k, v in saved.items() if v is not None and k != "fused (fastsae)")
    assert next(tmp_path.glob("matryoshka-cpu-*.md")).stat().st_size
