"""`fastsae harvest` and `fastsae train` on a store, end to end on a tiny saved model."""

import json
import re

import pytest

from fastsae import SAE
from fastsae.cli import main
from fastsae.harvest import ActivationStore

from helpers import cli_error, tiny_causal_lm

pytest.importorskip("transformers")

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, " \
       "must be in want of a wife.\n" * 30


@pytest.fixture
def corpus_and_model(tmp_path):
    tiny_causal_lm(tmp_path / "lm")
    (tmp_path / "book.txt").write_text(TEXT)
    return tmp_path


def test_harvest_then_train_on_the_store(corpus_and_model, capsys):
    d = corpus_and_model
    args = ["harvest", "--model", str(d / "lm"), "--corpus", str(d / "book.txt"), "--sites", "resid_post.0",
            "mlp_hidden.1", "--tokens", "1024", "--context-size", "32", "--dtype", "float32", "--out",
            str(d / "store"), "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and str((d / "store").resolve()) in printed
    store = ActivationStore(d / "store")
    assert store.sites == {"resid_post.0": 32, "mlp_hidden.1": 64}
    assert store.tokens == 32 * 31  # 32 windows of 32, BOS dropped (the text has no unknown characters)
    assert store.meta["source"]["corpus"] == str(d / "book.txt") and store.meta["excluded_token_ids"] == [0, 1, 2, 3]
    assert main(args + ["--resume"]) == 0  # a finished harvest resumes to itself
    assert "already holds a store" in cli_error(capsys, args)
    assert re.search(r"DataConfig\.site: the store .* holds \['mlp_hidden\.1', 'resid_post\.0'\]", cli_error(
        capsys, ["train", "--data", str(d / "store"), "--out", str(d / "run"), "--steps", "3", "--no-progress"]))
    assert re.search(r"'resid_post\.7' is not in the store .* \['mlp_hidden\.1', 'resid_post", cli_error(
        capsys, ["train", "--data", str(d / "store"), "--site", "resid_post.7", "--out", str(d / "run"), "--steps",
                 "3", "--no-progress"]))
    assert main(["train", "--data", str(d / "store"), "--site", "resid_post.0", "--activation", "topk", "--k", "4",
                 "--d-sae", "64", "--steps", "6", "--batch-size", "64", "--out", str(d / "run"),
                 "--no-progress"]) == 0
    sae = SAE.load(d / "run" / "sae")
    assert sae.metadata["site"] == "resid_post.0" and sae.metadata["model"] == str(d / "lm")
    assert sae.metadata["input_scale_folded"] == pytest.approx(store.norm_scale("resid_post.0"))
    run = json.loads((d / "run" / "run.json").read_text())
    assert run["format_version"] == 2 and run["data"]["normalize"] is True and run["data"]["site"] == "resid_post.0"
    assert run["train"]["schedule"]["total_steps"] == 6 and run["sae"]["d_in"] == 32
    # which windows it trained on: every window the store holds, by index into the seeded corpus order
    assert run["windows"]["ranges"] == [[0, 32]] == store.meta["source"]["windows"]
    assert sae.metadata["windows"] == run["windows"] and run["windows"]["corpus"] == str(d / "book.txt")


def test_eval_end_to_end_on_a_tiny_model(corpus_and_model, capsys):
    d = corpus_and_model
    assert main(["harvest", "--model", str(d / "lm"), "--corpus", str(d / "book.txt"), "--sites", "resid_post.1",
                 "--tokens", "1024", "--context-size", "32", "--dtype", "float32", "--out", str(d / "store"),
                 "--no-progress"]) == 0
    for k in (2, 8):
        assert main(["train", "--data", str(d / "store"), "--activation", "topk", "--k", str(k), "--d-sae", "64",
                     "--steps", "4", "--batch-size", "64", "--out", str(d / "sweep" / f"k{k}"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--sae", str(d / "sweep"), "--tokens", "512", "--baselines", "pca", "random",
                 "--fit-tokens", "256", "--out", str(d / "eval"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "self-check" in printed and "| topk k=2 64 |" in printed and "| pca |" in printed
    report = json.loads((d / "eval" / "metrics.json").read_text())
    assert set(report["results"]) == {"model", "topk k=2 64", "topk k=8 64", "pca", "random"}
    assert report["meta"]["site"] == "resid_post.1" and report["meta"]["eval_windows"] == 16
    assert set(report["meta"]["seconds"]) == {"baseline_activations", "fit_baselines", "evaluate"}
    assert report["meta"]["baseline_fit_source"] == "store"  # a float32 store: its rows as they are
    # held out by record: the store took the first 32 windows of the seeded order, eval the last 16 of the rest
    trained = SAE.load(d / "sweep" / "k2" / "sae").metadata["windows"]["ranges"]
    assert trained == [[0, 32]] and report["meta"]["overlap_windows"] == 0
    total = report["meta"]["eval_window_ranges"][-1][1]
    assert report["meta"]["eval_window_ranges"] == [[total - 16, total]] and total - 16 >= 32
    assert report["results"]["topk k=2 64"]["l0"] == pytest.approx(2) and report["results"]["pca"]["k"] == 2
    for name in ("topk k=2 64", "topk k=8 64"):
        r = report["results"][name]
        assert r["ce_loss_with_sae_and_error"] == pytest.approx(report["results"]["model"]["ce_loss_without_sae"],
                                                                rel=1e-5)
        assert sum(r["density_histogram"]["counts"]) + r["density_histogram"]["dead"] == 64
    assert (d / "eval" / "pareto.png").stat().st_size > 0 and (d / "eval" / "density.png").stat().st_size > 0


def test_run_is_the_whole_job_and_resumes(corpus_and_model, capsys):
    d = corpus_and_model
    args = ["run", "--model", str(d / "lm"), "--site", "resid_post.0", "--corpus", str(d / "book.txt"),
            "--tokens", "1024", "--d-sae", "64", "--k", "4", "--steps", "8", "--batch-size", "64",
            "--eval-tokens", "256", "--out", str(d / "job"), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "[4/4]" in printed and str((d / "job").resolve()) in printed
    index = d / "job" / "features" / "browser" / "index.html"
    assert f"feature browser: {index.resolve()}" in printed and index.is_file()  # the job ends with the browser
    assert "| latent | one-token score |" in printed
    run = json.loads((d / "job" / "train" / "run.json").read_text())
    assert run["train"]["dead_latents"]["window_tokens"] == 8 * 64 // 4  # a quarter of the run: AuxK starts
    first = json.loads((d / "job" / "eval" / "metrics.json").read_text())["results"]
    assert set(first) >= {"model", "topk k=4 64", "pca", "neurons", "random"}
    assert main(args) == 0  # a finished job resumes each step and ends with the same report
    again = json.loads((d / "job" / "eval" / "metrics.json").read_text())["results"]
    assert again["topk k=4 64"]["fvu"] == first["topk k=4 64"]["fvu"]


def test_train_streaming_straight_from_the_model(corpus_and_model, capsys):
    d = corpus_and_model
    args = ["train", "--data", "stream", "--model", str(d / "lm"), "--site", "resid_post.0", "--corpus",
            str(d / "book.txt"), "--tokens", "2048", "--context-size", "32", "--activation", "topk", "--k", "4",
            "--d-sae", "64", "--steps", "5", "--batch-size", "64", "--out", str(d / "stream"), "--no-progress"]
    assert main(args) == 0
    sae = SAE.load(d / "stream" / "sae")
    run = json.loads((d / "stream" / "run.json").read_text())
    assert sae.metadata["site"] == "resid_post.0" and run["data"]["norm_scale"] > 0
    assert sae.metadata["input_scale_folded"] == pytest.approx(run["data"]["norm_scale"])
    assert sae.metadata["windows"]["ranges"] == [[0, 2048 // 32]] and run["windows"] == sae.metadata["windows"]
    assert "--model: DataConfig.model must be given" in cli_error(
        capsys, ["train", "--data", "stream", "--site", "resid_post.0", "--out", str(d / "x"), "--no-progress"])


@pytest.mark.parametrize("data", ["store", "stream"])
def test_an_unknown_site_is_named_where_it_is_resolved(corpus_and_model, data, capsys):
    """Never "d_in must be a positive int, got 0": the train path resolves the site before building anything."""
    d = corpus_and_model
    if data == "store":
        assert main(["harvest", "--model", str(d / "lm"), "--corpus", str(d / "book.txt"), "--sites", "resid_post.0",
                     "--tokens", "256", "--context-size", "32", "--out", str(d / "store"), "--no-progress"]) == 0
    source = str(d / "store") if data == "store" else "stream"
    import transformers.utils.logging as hf_logging

    hf_logging.disable_progress_bar()  # the weights' loading bar on stderr
    try:
        line = cli_error(capsys, ["train", "--data", source, "--model", str(d / "lm"), "--site", "resid_post.9",
                                  "--corpus", str(d / "book.txt"), "--tokens", "256", "--context-size", "32",
                                  "--steps", "2", "--out", str(d / "x"), "--no-progress"])
    finally:
        hf_logging.enable_progress_bar()
    assert "--site" in line and "resid_post.9" in line and "resid_post.0" in line and "d_in" not in line
    assert not (d / "x" / "run.json").exists()


def test_train_resume_with_more_steps_extends_the_run(tmp_path, capsys):
    """`--resume --steps N` sets the run's new length (the rest of run.json is kept); fewer steps than the
    checkpoint's is one line, exit 2."""
    args = ["train", "--out", str(tmp_path), "--batch-size", "16", "--checkpoint-every", "2", "--no-progress"]
    assert main(args + ["--steps", "4"]) == 0
    assert main(args + ["--steps", "6", "--resume", "--lr", "0.5"]) == 0  # --lr: run.json's is kept
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6 and steps == sorted(set(steps))
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["train"]["schedule"]["total_steps"] == 6 and run["train"]["optimizer"]["lr"] != 0.5
    line = cli_error(capsys, args + ["--steps", "3", "--resume"])
    assert "--steps: " in line and "total_steps=3 is less than the checkpoint's step 6" in line, line
    assert json.loads((tmp_path / "run.json").read_text()) == run  # refused before run.json was touched
