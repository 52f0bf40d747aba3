"""The benchmark suite runs end to end on tiny CPU shapes; a few small cases go through pytest-benchmark
so regressions show in ordinary test runs (no timing assertions)."""

import pytest
import torch

from bench.__main__ import markdown, plot
from bench.suite import OPS, Case, build, dense_flops, min_bytes, run_case
from fastsae import SAE, SAEConfig, use_backend

TINY = dict(n=64, d_in=16, d_sae=128)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("activation,k,density", [("topk", 4, None), ("relu", None, 0.05), ("batchtopk", 4, None)])
def test_every_op_runs_and_reports(op, activation, k, density):
    case = Case(op, activation, k=k, density=density, **TINY)
    rows = run_case(case, ("naive", "fastsae_torch", "fastsae_triton"), torch.device("cpu"), torch.float32,
                    repeats=1, bandwidth=1e10)
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["floor"]["status"] == "ok" and by_impl["floor"]["ms"] > 0
    assert "fastsae_triton" not in by_impl  # needs CUDA
    assert by_impl["fastsae_torch"]["status"] == "ok" and by_impl["fastsae_torch"]["x_floor"] > 0
    assert by_impl["fastsae_torch"]["gbps"] > 0


def test_floors_and_reports(tmp_path):
    case = Case("step", "topk", k=4, **TINY)
    assert dense_flops(case) == 6 * 2 * 64 * 16 * 128
    assert dense_flops(Case("decode", "topk", k=4, **TINY)) is None
    assert min_bytes(case, torch.bfloat16) < min_bytes(case, torch.float32)
    rows = []
    for d_sae in (64, 128):
        rows += run_case(Case("step", "topk", 64, 16, d_sae, 4), ("naive", "fastsae_torch"), torch.device("cpu"),
                         torch.float32, repeats=1, bandwidth=1e10)
    env = {"device": "cpu", "dtype": "float32", "torch": "x", "triton": "y", "date": "today", "copy_gbps": 10.0}
    table = markdown(rows, env)
    assert table.count("\n| step topk") == len(rows)
    pytest.importorskip("matplotlib")
    paths = plot(rows, env, tmp_path / "run")
    assert [p.name for p in paths] == ["run-time.png"] and paths[0].stat().st_size > 1000


def test_naive_reference_matches_fastsae_loss():
    case = Case("step", "relu", density=0.05, **TINY)
    step = build(case, "naive", torch.device("cpu"), torch.float32)
    step()  # runs; the loss itself is compared below
    from bench.suite import _sae, naive_forward

    sae = _sae(case, torch.device("cpu"), torch.float32)
    x = torch.randn(64, 16)
    with use_backend("torch"):
        ours = sae(x).loss
    theirs = naive_forward(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, "relu", None, sae.cfg.l1_coefficient)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation,k", [("topk", 32), ("relu", None)])
def test_benchmark_cpu_training_step(benchmark, activation, k):
    sae = SAE(SAEConfig(128, 2048, activation=activation, k=k), seed=0)
    x = torch.randn(512, 128)

    def step():
        sae.zero_grad(set_to_none=True)
        out = sae(x)
        out.loss.backward()
        return out

    out = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert out.x_hat.shape == x.shape and sae.W_dec.grad is not None


def test_benchmark_cpu_encode(benchmark):
    sae = SAE(SAEConfig(128, 4096, activation="topk", k=32), seed=0).eval()
    x = torch.randn(512, 128)
    lat = benchmark.pedantic(lambda: sae.encode(x), rounds=3, warmup_rounds=1)
    assert lat.values.shape == (512, 32)


def test_data_path_throughput_report(tmp_path, capsys):
    pytest.importorskip("transformers")
    import json

    from bench import harvest as bench_harvest

    assert bench_harvest.main(["--model", "tiny", "--tokens", "1024", "--batch-size", "64", "--trainer-steps", "2",
                               "--loader-seconds", "0.2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "harvest:" in out and "loader alone" in out and "trainer:" in out
    (report,) = tmp_path.glob("harvest-*.json")
    rows = json.loads(report.read_text())["rows"]
    assert len(rows) == 4 and all(r["tokens_per_s"] > 0 for r in rows)


def test_eval_speed_runs_end_to_end_on_a_tiny_model(tmp_path):
    """bench.eval_speed on a tiny model's SAE: the three paths run, the metrics agree, the tables are saved."""
    import json

    from bench.eval_speed import main as eval_speed
    from fastsae.cli import main

    from helpers import tiny_causal_lm

    tiny_causal_lm(tmp_path / "lm")
    (tmp_path / "book.txt").write_text("It is a truth universally acknowledged, that a single man. " * 60)
    assert main(["harvest", "--model", str(tmp_path / "lm"), "--corpus", str(tmp_path / "book.txt"), "--sites",
                 "resid_post.0", "--tokens", "1024", "--context-size", "32", "--dtype", "float32", "--out",
                 str(tmp_path / "store"), "--no-progress"]) == 0
    assert main(["train", "--data", str(tmp_path / "store"), "--activation", "topk", "--k", "4", "--d-sae", "64",
                 "--steps", "4", "--batch-size", "64", "--out", str(tmp_path / "sae"), "--no-progress"]) == 0
    assert eval_speed(["--sae", str(tmp_path / "sae" / "sae"), "--tokens", "256", "--out", str(tmp_path)]) == 0
    saved = json.loads(next(tmp_path.glob("eval-speed-*.json")).read_text())
    assert saved["summary"]["metrics_agree"] and saved["summary"]["before_metrics_agree"]
    assert saved["meta"]["variants"] == 9
    assert {"before", "reference", "fastsae"} == set(saved["runs"])
    assert next(tmp_path.glob("eval-speed-*.md")).stat().st_size


def test_interventions_summary_keeps_the_parts_run_separately(tmp_path):
    from bench.interventions import write_summary

    write_summary(tmp_path, "# header", {"patch": ["## IOI patching", "curve"]})
    write_summary(tmp_path, "# header", {"circuit": ["## Circuit", "graph"], "erasure": ["## Concept erasure"]})
    text = (tmp_path / "summary.md").read_text()
    assert text.count("# header") == 1
    assert text.index("## IOI patching") < text.index("## Concept erasure") < text.index("## Circuit")
    write_summary(tmp_path, "# header", {"patch": ["## IOI patching", "new curve"]})
    text = (tmp_path / "summary.md").read_text()
    assert "new curve" in text and "## Circuit" in text
