"""The command line's one handler: a user error is one line `fastsae <command>: <message>` naming the flag, exit 2;
an unexpected error is one line saying where its traceback was written, exit 1; --debug prints the traceback.

Each case of issue #12's list runs in-process on a tiny random model, store and arrays (fast); one runs the
real entry point in a subprocess."""

import os
import subprocess
import sys

import numpy as np
import pytest

from fastsae import SAE, SAEConfig
from fastsae.cli import main

from helpers import cli_error, tiny_causal_lm

pytest.importorskip("transformers")

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, " \
       "must be in want of a wife.\n" * 30


@pytest.fixture(autouse=True)
def _no_loading_bars():
    """transformers draws a bar on stderr while loading weights; only the error line is under test."""
    import transformers.utils.logging as hf_logging

    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny saved model, a corpus, a store of it, good and bad arrays, an SAE of the wrong width."""
    d = tmp_path_factory.mktemp("cli")
    tiny_causal_lm(d / "lm")
    (d / "book.txt").write_text(TEXT)
    assert main(["harvest", "--model", str(d / "lm"), "--corpus", str(d / "book.txt"), "--sites", "resid_post.0",
                 "--tokens", "256", "--context-size", "32", "--out", str(d / "store"), "--no-progress",
                 "--device", "cpu"]) == 0
    rng = np.random.default_rng(0)
    np.save(d / "x.npy", rng.standard_normal((64, 16)).astype(np.float32))
    bad = rng.standard_normal((64, 16)).astype(np.float32)
    bad[5, 3] = np.nan
    np.save(d / "nan.npy", bad)
    np.save(d / "pickled.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    (d / "garbage.npy").write_bytes(bytes(range(256)) * 4)
    SAE(SAEConfig(d_in=16, d_sae=32, activation="topk", k=4)).save(d / "sae16")
    return d


def _train(files, tmp_path, *flags):
    return ["train", *flags, "--out", str(tmp_path / "run"), "--no-progress"]


@pytest.mark.parametrize(("flags", "flag", "words"), [
    (["--steps", "-1"], "--steps", "got -1"),
    (["--steps", "0"], "--steps", "got 0"),
    (["--lr", "-1"], "--lr", "got -1.0"),
    (["--lr", "inf"], "--lr", "got inf"),
    (["--checkpoint-every", "0"], "--checkpoint-every", "got 0"),
    (["--batch-size", "0"], "--batch-size", "got 0"),
    (["--activation", "topk"], "--k", "activation='topk', got None"),
    (["--activation", "topk", "--d-sae", "4", "--k", "8"], "--k", "k <= d_sae=4, got 8"),
    (["--steps", "x"], "--steps", "invalid int value: 'x'"),  # argparse's own, on one line too
    (["--activation", "gelu"], "--activation", "invalid choice: 'gelu'"),
])
def test_train_flags_out_of_range_are_one_line_naming_the_flag(files, tmp_path, capsys, flags, flag, words):
    line = cli_error(capsys, _train(files, tmp_path, *flags))
    assert line.startswith("fastsae train: ") and flag in line and words in line, line
    assert not (tmp_path / "run" / "run.json").exists()


@pytest.mark.parametrize(("data", "words"), [
    ("missing.npy", "expected 'toy', 'stream', an activation store directory"),
    ("garbage.npy", "garbage.npy: not an .npy array (no NUMPY header)"),
    ("pickled.npy", "pickled.npy: holds pickled Python objects, which fastsae never loads"),
    ("nan.npy", "nan.npy: row 5 holds NaN or Inf"),
])
def test_train_bad_data_files_are_one_line_naming_data_and_the_file(files, tmp_path, capsys, data, words):
    line = cli_error(capsys, _train(files, tmp_path, "--data", str(files / data), "--steps", "2", "--batch-size",
                                    "32"))
    assert line.startswith("fastsae train: --data: ") and words in line, line


def test_train_unreadable_data_is_one_line(files, tmp_path, capsys, monkeypatch):
    """(a file of mode 000, as root reads it anyway: its open() refused instead)"""
    import fastsae.train.batches

    def refused(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(fastsae.train.batches, "open", refused, raising=False)
    line = cli_error(capsys, _train(files, tmp_path, "--data", str(files / "x.npy"), "--steps", "2"))
    assert line.startswith("fastsae train: --data: DataConfig.source ") and "x.npy: Permission denied" in line, line


def test_train_unknown_site_of_a_store_names_site(files, tmp_path, capsys):
    line = cli_error(capsys, _train(files, tmp_path, "--data", str(files / "store"), "--site", "bogus.0"))
    assert line.startswith("fastsae train: --site: ") and "'bogus.0' is not in the store" in line, line
    assert "resid_post.0" in line


def test_train_that_diverges_is_one_line_naming_the_step(files, tmp_path, capsys):
    line = cli_error(capsys, _train(files, tmp_path, "--data", str(files / "x.npy"), "--lr", "1e30", "--steps", "5",
                                    "--batch-size", "32", "--checkpoint-every", "1"))
    assert line.startswith("fastsae train: training diverged: the loss at step ") and "step-0000000" in line, line


def _harvest(files, tmp_path, *flags, **given):
    args = {"--model": str(files / "lm"), "--corpus": str(files / "book.txt"), "--sites": "resid_post.0",
            "--tokens": "256", "--context-size": "32", "--out": str(tmp_path / "store"), **given}
    return ["harvest", *[x for kv in args.items() for x in kv], *flags, "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize(("given", "flag", "words"), [
    ({"--model": "MISSING/"}, "--model", "no such directory"),
    ({"--model": "no-such-owner/no-such-model"}, "--model", "a hub id in the local cache"),  # never downloaded
    ({"--sites": "bogus.1"}, "--sites", "unknown site 'bogus.1'"),
    ({"--tokens": "0"}, "--tokens", "tokens must be an int >= context_size=32 (one window), got 0"),
    ({"--corpus": "MISSING.txt"}, "--corpus", "expected a built-in name"),
    ({"--out": "STORE"}, "--resume", "already holds a store"),
])
def test_harvest_errors_are_one_line_naming_the_flag(files, tmp_path, capsys, given, flag, words):
    given = {k: v.replace("MISSING", str(tmp_path / "missing")).replace("STORE", str(files / "store"))
             for k, v in given.items()}
    line = cli_error(capsys, _harvest(files, tmp_path, **given))
    assert line.startswith(f"fastsae harvest: {flag}: ") and words in line, line


def test_eval_errors_are_one_line_naming_the_flag(files, tmp_path, capsys):
    common = ["--out", str(tmp_path / "eval"), "--tokens", "64", "--context-size", "32", "--fit-tokens", "64",
              "--baselines", "none", "--no-progress", "--device", "cpu"]
    line = cli_error(capsys, ["eval", "--sae", str(tmp_path / "nothing"), *common])
    assert line.startswith("fastsae eval: --sae ") and "neither an SAE directory" in line, line
    line = cli_error(capsys, ["eval", "--sae", str(files / "sae16"), "--model", str(files / "lm"), "--site",
                              "resid_post.0", "--corpus", str(files / "book.txt"), *common])
    assert "d_in=16" in line and "has width 32" in line and "--site" in line, line


def test_run_with_a_missing_model_is_one_line(files, tmp_path, capsys):
    line = cli_error(capsys, ["run", "--model", str(tmp_path / "missing") + "/", "--out", str(tmp_path / "r"),
                              "--no-progress"])
    assert line.startswith("fastsae run: --model: ") and "no such directory" in line, line


def test_an_unexpected_error_is_one_line_with_its_traceback_in_a_file(tmp_path, capsys, monkeypatch):
    import fastsae.demo

    def broken(out):
        raise RuntimeError("a bug\non two lines")

    monkeypatch.setattr(fastsae.demo, "run_recovery", broken)
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("fastsae demo: unexpected error RuntimeError: a bug; on two lines")
    written = err.split("the full traceback is in ")[1].split(";")[0]
    text = open(written).read()
    os.remove(written)
    assert "Traceback" in text and "in broken" in text and "fastsae demo --out" in text
    assert main(["--debug", "demo", "--out", str(tmp_path)]) == 1  # --debug: the traceback, then the line
    err = capsys.readouterr().err
    assert "Traceback" in err and "in broken" in err and "printed above" in err.strip().splitlines()[-1]
    assert main(["demo", "--out", str(tmp_path), "--debug"]) == 1  # after the subcommand too
    assert "Traceback" in capsys.readouterr().err


def test_ctrl_c_is_one_line(tmp_path, capsys, monkeypatch):
    import fastsae.demo

    def interrupted(out):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastsae.demo, "run_recovery", interrupted)
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "fastsae demo: interrupted\n"


def test_a_missing_optional_package_is_one_line(tmp_path, capsys, monkeypatch):
    import fastsae.demo

    def needs(out):
        raise ImportError("model 'gemma-3-270m' needs the package 'gguf': pip install 'fastsae[models]'")

    monkeypatch.setattr(fastsae.demo, "run_recovery", needs)
    line = cli_error(capsys, ["demo", "--out", str(tmp_path)])
    assert line == "fastsae demo: model 'gemma-3-270m' needs the package 'gguf': pip install 'fastsae[models]'"


def test_the_real_entry_point_prints_one_line_and_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastsae", "train", "--steps", "-1", "--out", str(tmp_path / "r"),
                           "--no-progress"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == "fastsae train: --steps: ScheduleConfig.total_steps must be an int >= 1 or None, got -1\n"
    assert done.stdout == ""
