"""bench/cpu_step.py and the sparsify peer of the suite run end to end on tiny CPU shapes (no timing assertions)."""

import json

import pytest
import torch

from bench import cpu_step
from bench.suite import Case, run_case


@pytest.mark.parametrize("processes", ["a process per row", "one process"])
def test_cpu_step_measures_every_peer_in_one_run_and_saves_json_and_markdown(tmp_path, processes):
    flags = ["--one-process"] if processes == "one process" else []
    assert cpu_step.main(["--n", "16", "--d-in", "8", "--d-sae", "32", "--k", "4", "--repeats", "2", "--warmup", "1",
                          "--out", str(tmp_path), *flags]) == 0
    [path] = tmp_path.glob("cpu-step-*.json")
    result = json.loads(path.read_text())
    assert result["processes"] == processes
    rows = {r["impl"]: r for r in result["rows"]}
    assert {"floor", "oneDNN floor", "floor: GEMM", "floor: oneDNN GEMM", "floor: Adam", "fastsae"} <= set(rows)
    assert rows["floor"]["ms"] == pytest.approx(rows["floor: GEMM"]["ms"] + rows["floor: Adam"]["ms"])
    assert rows["oneDNN floor"]["ms"] == pytest.approx(rows["floor: oneDNN GEMM"]["ms"] + rows["floor: Adam"]["ms"])
    assert len(rows["fastsae"]["times_ms"]) == 2 and rows["fastsae"]["x_floor"] > 0
    assert rows["fastsae"]["x_onednn_floor"] > 0
    assert result["env"]["torch_threads"] == torch.get_num_threads()
    if result["env"]["sparsify"] is not None:
        assert rows["fastsae"]["speedup_vs_sparsify"] > 0 and "x_floor" in rows["sparsify"]
    assert "| fastsae |" in path.with_suffix(".md").read_text()


@pytest.mark.parametrize("op", ["encode", "step"])
def test_sparsify_is_a_peer_of_the_suite(op):
    pytest.importorskip("sparsify")
    rows = run_case(Case(op, "topk", 64, 16, 128, 4), ("sparsify",), torch.device("cpu"), torch.float32, repeats=1,
                    bandwidth=1e10)
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["sparsify"]["status"] == "ok" and by_impl["sparsify"]["x_floor"] > 0
    assert run_case(Case(op, "relu", 64, 16, 128, density=0.1), ("sparsify",), torch.device("cpu"), torch.float32,
                    repeats=1, bandwidth=1e10)[1:] == []  # TopK only


def test_cpu_parts_times_each_replacement_beside_what_it_replaced(tmp_path):
    from bench import cpu_parts

    assert cpu_parts.main(["--n", "16", "--d-in", "8", "--d-sae", "256", "--k", "2", "--repeats", "2",
                           "--warmup", "1", "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("cpu-parts-*.json")
    rows = {(r["part"], r["impl"]): r for r in json.loads(path.read_text())["rows"]}
    assert {("weight gradient", "fresh, 4 kB pages"), ("top-k", "two-level"), ("decode backward dots", "latent order"),
            ("decoder constraint", "blocks of rows"), ("tanh (640, 4096) float64", "numpy"),
            ("batch top-k", "two-level")} <= set(rows)
    assert all(len(r["times_ms"]) == 2 and r["ms"] >= 0 for r in rows.values())


def test_cpu_gemm_compares_both_gemms_and_saves_json_and_markdown(tmp_path):
    from bench import cpu_gemm

    assert cpu_gemm.main(["--small", "--repeats", "2", "--warmup", "1", "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("cpu-gemm-*.json")
    [row] = json.loads(path.read_text())["rows"]
    assert row["f_linear_ms"] > 0 and row["onednn_ms"] > 0 and row["onednn_error"] < 1e-5
    assert "| small |" in path.with_suffix(".md").read_text()
