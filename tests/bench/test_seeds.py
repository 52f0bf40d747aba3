"""bench.seeds' machinery: jobs run once and resume, a failure names its job, and the report's rows come from the
evaluation and comparison files (a row whose jobs have not run is 'pending', never made up)."""

import json
import sys

import pytest

from bench import seeds


def _job(name: str, code: int = 0) -> seeds.Job:
    return seeds.Job(name, "train", lambda w: ["--version"] if code == 0 else ["no-such-command"])


def test_a_job_runs_once_and_its_marker_skips_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(seeds.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    seeds.run_job(_job("a"), tmp_path)
    seeds.run_job(_job("a"), tmp_path)
    assert calls == [[sys.executable, "-m", "fastsae", "--version"]]
    assert json.loads((tmp_path / "done" / "a.json").read_text())["argv"] == ["--version"]


def test_a_failed_job_names_itself_and_leaves_no_marker(tmp_path, monkeypatch):
    monkeypatch.setattr(seeds.subprocess, "call", lambda cmd: 3)
    with pytest.raises(SystemExit, match="b failed .exit 3.; rerun"):
        seeds.run_job(_job("b", 3), tmp_path)
    assert not (tmp_path / "done" / "b.json").exists()


def _harvested(w, store="seeds", rows=10_300_001):
    (w / f"harvest-{store}").mkdir(parents=True)
    (w / f"harvest-{store}" / "manifest.json").write_text(json.dumps({"tokens": rows}))
    seeds.run_job(seeds.Job(f"harvest-{store}", "harvest", lambda w: []), w)


def test_train_jobs_never_repeat_a_token_and_resume_their_run(tmp_path, monkeypatch):
    monkeypatch.setattr(seeds.subprocess, "call", lambda cmd: 0)
    with pytest.raises(KeyError, match="harvest-seeds"):  # no steps before the harvest has its rows
        seeds.TRAIN_JOBS[0].argv(tmp_path)
    _harvested(tmp_path)
    _eval(tmp_path, "relu-resample", "technical", l0=30.0)
    steps = {}
    for job in seeds.TRAIN_JOBS:
        argv = job.argv(tmp_path)
        steps[job.name] = int(argv[argv.index("--steps") + 1])
        assert steps[job.name] * seeds.BATCH <= 10_300_001, job.name
        assert "--resume" not in argv
    assert steps["scale-0.25M"] == 64 and steps["scale-10M"] == 10_300_001 // seeds.BATCH == 2514
    (tmp_path / "train" / "scale-1M").mkdir(parents=True)
    (tmp_path / "train" / "scale-1M" / "run.json").write_text("{}")
    assert "--resume" in next(j for j in seeds.JOBS if j.name == "scale-1M").argv(tmp_path)


def _eval(w, name, tag, **m):
    path = w / "eval" / f"{name}-{tag}" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"results": {"model": {}, name: m}}))


def test_the_matched_topk_takes_the_relus_measured_l0(tmp_path, monkeypatch):
    monkeypatch.setattr(seeds.subprocess, "call", lambda cmd: 0)
    job = next(j for j in seeds.JOBS if j.name == "topk-matched")
    _harvested(tmp_path)
    with pytest.raises(KeyError):
        job.argv(tmp_path)
    _eval(tmp_path, "relu-resample", "technical", l0=41.6)
    argv = job.argv(tmp_path)
    assert argv[argv.index("--k") + 1] == "42"


def test_the_report_fills_a_row_from_its_files_and_marks_the_rest_pending(tmp_path):
    for i, name in enumerate(("scale-0.25M", "scale-1M", "scale-4M", "scale-10M")):
        for tag in seeds.EVAL_CORPORA:
            _eval(tmp_path, name, tag, fvu=0.2 - 0.04 * i, ce_loss_recovered=0.9 + 0.02 * i)
    path = seeds.write_report(tmp_path, tmp_path / "out")
    rows = json.loads(path.with_suffix(".json").read_text())["rows"]
    scale = rows[0]
    assert scale["verdict"] == "reproduced" and "10M: FVU 0.080/0.080, CE rec. 0.960/0.960" in scale["ours"]
    assert [r["verdict"] for r in rows[1:]] == ["pending"] * (len(rows) - 1) and len(rows) == len(seeds.ROWS)
    assert "eval-relu-resample-technical" in rows[1]["reason"]
    assert "| Scale:" in path.with_suffix(".md").read_text()


def test_list_and_unknown_jobs(tmp_path, capsys):
    seeds.main(["--list", "--work", str(tmp_path)])
    assert "harvest-seeds" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        seeds.main(["--only", "nope", "--work", str(tmp_path)])


def test_universality_correlates_the_seeds_on_held_out_tokens(tmp_path):
    jobs = {j.name: j for j in seeds.JOBS}
    harvest = jobs["harvest-heldout"].argv(tmp_path)
    for name in ("scale-10M", "seed1-10M", "split-4k", "features-split-4k", "features-scale-10M"):
        seeds.io.write_json(tmp_path / "done" / f"{name}.json", {})
    assert harvest[harvest.index("--corpus") + 1] == "research:test" and harvest[harvest.index("--tokens") + 1] == \
        "16384" and harvest[harvest.index("--sites") + 1] == seeds.SITE
    argv = jobs["compare-seeds"].argv(tmp_path)
    assert argv[argv.index("--correlation-store") + 1] == str(tmp_path / "harvest-heldout")
    assert "--correlation-store" not in jobs["compare-split-4k-16k"].argv(tmp_path)
    path = tmp_path / "compare" / "seeds" / "comparison.json"
    path.parent.mkdir(parents=True)
    summary = {"mmcs_ab": 0.81, "mmcs_ba": 0.8, "frac_a_matched": 0.6, "frac_b_matched": 0.59}
    corr = {"tokens": 16_000, "live_a": 15_000, "live_b": 14_900, "mean_max_corr_ab": 0.72, "mean_max_corr_ba": 0.7,
            "frac_a_matched": 0.55, "frac_b_matched": 0.5}
    path.write_text(json.dumps({"summary": summary, "activation_correlation": {"summary": corr}}))
    row = seeds._universality_row(tmp_path)
    assert "activation correlation: mean max 0.720/0.700, 55.0%/50.0% of live latents have r ≥ 0.7" in row["ours"]
    assert "16,000 held-out tokens" in row["reason"] and row["verdict"] == "reproduced"
    path.write_text(json.dumps({"summary": summary}))  # a comparison from before the held-out harvest
    assert "activation correlation" not in seeds._universality_row(tmp_path)["ours"]


def test_a_job_first_runs_the_job_its_arguments_wait_for(tmp_path, monkeypatch):
    """topk-matched takes its k from the ReLU's evaluation: the train stage runs that evaluation first."""
    ran = []

    def call(cmd):
        ran.extend(cmd[3:4])
        if cmd[3:4] == ["eval"]:
            _eval(tmp_path, "relu-resample", "technical", l0=20.2)
        return 0
    monkeypatch.setattr(seeds.subprocess, "call", call)
    _harvested(tmp_path)
    seeds.run_job(next(j for j in seeds.JOBS if j.name == "topk-matched"), tmp_path)
    assert ran == ["train", "eval", "train"]  # the ReLU, its evaluation, then the matched TopK
    assert (tmp_path / "done" / "relu-resample.json").exists()
    assert (tmp_path / "done" / "eval-relu-resample-technical.json").exists()
    assert (tmp_path / "done" / "topk-matched.json").exists()


def test_the_split_browsers_get_feature_caches_then_the_comparisons_links(tmp_path, monkeypatch):
    """features (the three sizes, on the held-out tokens) -> compare with --cache-a/--cache-b -> browse, each
    waiting for what it reads, every command parsed by its own parser."""
    from tests.bench.test_seeds_causal import _fastsae_parse

    ran = []
    monkeypatch.setattr(seeds.subprocess, "call", lambda cmd: ran.extend(cmd[3:4]) or 0)
    compare = {j.name: j for j in seeds.JOBS if j.stage == "compare"}
    with pytest.raises(KeyError, match="split-4k"):
        compare["compare-split-4k-16k"].argv(tmp_path)
    for name in ("split-4k", "scale-10M", "split-64k", "harvest-heldout"):
        seeds.run_job(seeds.Job(name, "train", lambda w: []), tmp_path)
    with pytest.raises(KeyError, match="features-split-4k"):
        compare["compare-split-4k-16k"].argv(tmp_path)
    ran.clear()
    seeds.run_job(compare["browse-scale-10M"], tmp_path)  # its caches and both comparisons run first
    assert ran == ["features", "features", "compare", "features", "compare", "browse"]
    args = _fastsae_parse(compare["compare-split-16k-64k"].argv(tmp_path))
    assert args.cache_a == str(tmp_path / "features" / "scale-10M") and args.cache_b.endswith("features/split-64k")
    args = _fastsae_parse(compare["features-split-64k"].argv(tmp_path))
    assert args.store == str(tmp_path / "harvest-heldout") and args.effects == "0"
    assert _fastsae_parse(compare["browse-split-4k"].argv(tmp_path)).cache.endswith("features/split-4k")
