"""bench.seeds' causal stage: its jobs' argv parse with their commands' own parsers, its rows read the files those
commands write (built here by the writers' own code where it is cheap, checked by their readers elsewhere), a
missing file gives a pending row naming its job, and `--stage causal --only` runs one job."""

import argparse
import importlib
import json
import sys
from types import SimpleNamespace

import pytest
import torch

from bench import seeds, seeds_causal
from fastsae.analysis.autointerp.autointerp_report import summarize_kinds
from fastsae.analysis.compare import connect_report, connect_run
from fastsae.analysis.interventions import circuit_ablation, erasure, ioi_patching

CAUSAL = [job for job in seeds.JOBS if job.stage == "causal"]


class _Parsed(Exception):
    """Raised in place of loading a model: the command's parser accepted the argv."""


def _harvested(w, rows=5_200_000):
    (w / "harvest-layers").mkdir(parents=True)
    (w / "harvest-layers" / "manifest.json").write_text(json.dumps({"tokens": rows}))
    (w / "done").mkdir(exist_ok=True)
    (w / "done" / "harvest-layers.json").write_text("{}")


BALANCED = ["causal-ioi-corpus", "harvest-ioi-control", "harvest-ioi-balanced", "harvest-ioi-heldout",
            "causal-L3-control", "causal-L3-balanced", "causal-ioi-balanced", "causal-L3-balanced-k16",
            "causal-L3-balanced-k64", "causal-ioi-balanced-curves"]
LARGE = ["causal-ioi-corpus-large", "harvest-ioi-balanced-large", "causal-L3-balanced-large",
         "causal-L3-balanced-large-k64", "causal-ioi-balanced-large", "causal-ioi-balanced-large-curves"]


def _balanced_done(w, rows=2_080_000):
    """bench.ioi_balanced's jobs done, its stores holding rows vectors each."""
    for name in BALANCED + LARGE:
        (w / "done" / f"{name}.json").write_text("{}")
    for store, held in (("control", rows), ("balanced", rows), ("balanced-large", rows * 5 // 2)):
        (w / f"harvest-ioi-{store}").mkdir()
        (w / f"harvest-ioi-{store}" / "manifest.json").write_text(json.dumps({"tokens": held}))


def _fastsae_parse(argv):
    """argv parsed by the fastsae command's own register() (a renamed or removed flag exits)."""
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(f"fastsae.commands.{argv[0]}").register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def _bench_parse(module, argv, monkeypatch):
    """argv parsed by the bench module's main(), stopped where it would load a model; returns what it got."""
    got = {}

    def stop(*args, **kwargs):
        got.update(kwargs, args=args)
        raise _Parsed

    if module in ("bench.interventions", "bench.ioi_names", "bench.ioi_balanced"):
        bench_module = importlib.import_module(module)
        monkeypatch.setattr(bench_module, "load", stop)
        with pytest.raises(_Parsed):
            bench_module.main(argv)
    else:
        from bench import autointerp
        monkeypatch.setattr(autointerp, "run_autointerp", stop)
        with pytest.raises(_Parsed):
            autointerp.main(argv)
    return got


def test_every_causal_job_parses_with_its_commands_parser(tmp_path, monkeypatch):
    _harvested(tmp_path)
    harvest = next(job for job in CAUSAL if job.name == "harvest-ioi-balanced")
    with pytest.raises(KeyError, match="causal-ioi-corpus"):  # bench.seeds runs the corpus job first
        harvest.argv(tmp_path)
    large = next(job for job in CAUSAL if job.name == "harvest-ioi-balanced-large")
    with pytest.raises(KeyError, match="causal-ioi-corpus-large"):
        large.argv(tmp_path)
    _balanced_done(tmp_path)
    measure = next(job for job in CAUSAL if job.name == "causal-ioi-balanced-large").argv(tmp_path)
    assert measure[measure.index("--store") + 1] == str(tmp_path / "harvest-ioi-control")  # the 2M names' ranking
    assert measure[-1] == str(tmp_path / seeds_causal.LARGE_OUT) and len(measure) == 9
    assert measure[measure.index("--heldout-store") + 1] == str(tmp_path / "harvest-ioi-heldout")
    names = [job.name for job in CAUSAL]
    assert names[-26:] == ["causal-ioi", "causal-ioi-names", *BALANCED, *LARGE, "causal-erasure",
                           "causal-erasure-names", "causal-circuit", "causal-connect",
                           "causal-autointerp", "causal-features", "causal-browse", "causal-logit-hist"]  # SAEs first
    for job in CAUSAL:
        argv = job.argv(tmp_path)
        if job.module == "fastsae" and argv[0] == "harvest":
            args = _fastsae_parse(argv)
            assert args.sites == ["resid_post.3"] and args.resume
            continue
        if job.name.startswith(("causal-L3-control", "causal-L3-balanced")):  # the same steps on either store
            args, large = _fastsae_parse(argv), "-large" in job.name
            store = job.name.split("-")[2] + ("-large" if large else "")
            assert args.data == str(tmp_path / f"harvest-ioi-{store}") and args.site == "resid_post.3"
            steps = 1200 if large else 480  # 2.5x the budget, within the large store's vectors
            assert args.steps == steps and int(args.tokens) == steps * seeds.BATCH
            assert int(args.k) == (int(job.name[-2:]) if job.name[-3:-2] == "k" else 32)
            continue
        if job.module == "fastsae":
            args = _fastsae_parse(argv)
            if args.command in ("features", "browse"):
                cache = args.out if args.command == "features" else args.cache
                assert cache == str(tmp_path / seeds_causal.FEATURES_OUT)
                continue
            if args.command == "train":
                assert args.site in seeds.LAYER_SITES and str(tmp_path / "harvest-layers") == args.data
                assert args.steps * seeds.BATCH <= 5_200_000 and args.steps == 5_200_000 // seeds.BATCH
            else:
                assert args.linear_only and args.sae_max_l0 == 30 and args.threshold == 0.001 and not args.no_resume
                assert args.max_outputs == seeds_causal.CONNECT_OUTPUTS
        elif job.module == "bench.features":
            from bench.features import _parser
            args = _parser().parse_args(argv)
            assert args.screenshot == [str(tmp_path / seeds_causal.FEATURES_OUT / "browser"), "best"]
            assert args.element == "#logit-hist-box" and args.out == str(tmp_path / seeds_causal.FIGURES_OUT)
        else:
            _bench_parse(job.module, argv, monkeypatch)
    got = _bench_parse("bench.autointerp", next(j for j in CAUSAL if j.name == "causal-autointerp").argv(tmp_path),
                       monkeypatch)
    assert got["features"] == "100" and "random" in got["baselines"] and got["sae"].endswith("causal-L6-k32/sae")
    sites = {job.name: _fastsae_parse(job.argv(tmp_path)).site for job in CAUSAL
             if job.argv(tmp_path)[0] == "train" and job.name not in BALANCED + LARGE}
    assert sites == {"causal-L3-k32": "resid_post.3", "causal-L9-k32": "resid_post.9", "causal-L6-k16": "resid_post.6",
                     "causal-L6-k32": "resid_post.6", "causal-L6-k64": "resid_post.6",
                     "causal-mlp_in6-k32": "mlp_in.6", "causal-mlp_out6-k32": "mlp_out.6"}
    with pytest.raises(SystemExit):  # the check can fail: a flag the command does not have
        _fastsae_parse(["connect", "--sae-in", "a", "--sae-out", "b", "--store", "s", "--no-such-flag"])
    with pytest.raises(SystemExit):
        _bench_parse("bench.interventions", ["--sae", "a", "--no-such-flag"], monkeypatch)


def test_stage_causal_only_runs_that_job_with_its_module(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(seeds.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    seeds.main(["--stage", "causal", "--only", "causal-circuit", "--work", str(tmp_path)])
    assert len(calls) == 1 and calls[0][:3] == [sys.executable, "-m", "bench.interventions"]
    assert "--concept" in calls[0] and (tmp_path / "done" / "causal-circuit.json").exists()
    assert seeds.STAGES.index("compare") < seeds.STAGES.index("causal") < seeds.STAGES.index("report")


def test_list_shows_the_causal_jobs(tmp_path, capsys):
    seeds.main(["--list", "--work", str(tmp_path)])
    out = capsys.readouterr().out
    assert "causal    causal-ioi" in out and "causal-autointerp" in out and "causal-L6-k64" in out


def _write(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def _curve(fractions, ms=(1, 4, 16, 64)):
    """A curve with patching_curve's keys."""
    return {"select": "attribution", "m": list(ms), "latents": list(range(len(ms))), "attribution": [0.0] * len(ms),
            "logit_diff": list(fractions), "fraction": list(fractions), "kl": [0.5 - 0.1 * i for i in range(len(ms))],
            "relative_edit": [0.1] * len(ms), "forwards": 5, "seconds": 1.0}


def _ceiling(fraction):
    return {"all_latents_fraction": fraction, "all_latents": 900, "all_latents_kl": 0.2, "error_only_fraction": 0.1,
            "error_only_kl": 1.0, "error_only_relative_edit": 0.3, "everything_fraction": 1.0, "everything_kl": 0.0,
            "fvu_names": 0.2, "fvu_patched": 0.1,
            "by_positions": {"names": {"all_latents_fraction": fraction / 2, "all_latents_kl": 0.3,
                                       "everything_fraction": 0.75, "everything_kl": 0.1, "positions": 100}}}


def _ioi(w, sae16):
    """patch.json as ioi_patching.compare/_report write it, checked by ioi_patching.summary (its reader)."""
    labels = ["causal-L6-k32", "causal-L6-k16", "causal-L6-k64"]
    curves = {"causal-L6-k32": _curve([0.1, 0.3, 0.5, 0.7]), "causal-L6-k16": _curve(sae16),
              "causal-L6-k64": _curve([0.1, 0.2, 0.3, 0.4]), "pca": _curve([0.05, 0.2, 0.4, 0.6]),
              "neurons": _curve([0.0, 0.1, 0.2, 0.3]), "pca_prompts": _curve([0.1, 0.2, 0.5, 0.9])}
    six = {"site": "resid_post.6", "prompts": 100, "forwards": 30, "clean_logit_diff": 3.0,
           "corrupted_logit_diff": -1.0, "saes": labels, "ceilings": {k: _ceiling(0.85) for k in labels},
           "baselines_fitted_on": "corpus (30000 activations)", **{k: _ceiling(0.85)[k] for k in (
               "all_latents_fraction", "all_latents", "error_only_fraction", "error_only_relative_edit")},
           "curves": curves, "seconds": 10.0}
    three = {**six, "site": "resid_post.3", "saes": ["sae"], "ceilings": {"sae": _ceiling(0.6)},
             "curves": {"sae": _curve([0.1] * 4), "pca": _curve([0.2] * 4), "neurons": _curve([0.1] * 4)}}
    results = {"resid_post.3": three, "resid_post.6": six}
    assert "causal-L6-k16" in ioi_patching.summary(results)
    _write(w / seeds_causal.IOI_OUT / "patch.json", {"meta": {}, "summary": "", "results": results})


def test_the_ioi_row_compares_each_sparsity_with_pca_and_neurons_and_reports_every_ceiling(tmp_path):
    _ioi(tmp_path, [0.1, 0.1, 0.1, 0.1])
    row = seeds_causal._ioi_row(tmp_path)
    assert row["verdict"] == "reproduced" and "causal-L6-k32" in row["reason"].split("neurons at every m")[1]
    assert "resid_post.3 sae 0.600 (FVU names 0.200" in row["ours"] and "0.850 ≥ 0.8" in row["reason"]
    assert "at names 0.300 of the whole activation's 0.750" in row["ours"]
    assert "causal-L6-k32 0.300/0.500/0.700" in row["ours"] and "not stated" in row["seed"]
    patch = json.loads((tmp_path / seeds_causal.IOI_OUT / "patch.json").read_text())
    patch["results"]["resid_post.6"]["curves"]["causal-L6-k32"] = _curve([0.1, 0.3, 0.5, 0.55])  # below PCA at 64
    _write(tmp_path / seeds_causal.IOI_OUT / "patch.json", patch)
    assert seeds_causal._ioi_row(tmp_path)["verdict"] == "not reproduced"
    assert "Diagnosis" not in seeds_causal._ioi_row(tmp_path)["reason"]  # every ceiling reached 0.8


def test_a_low_ioi_ceiling_is_diagnosed_from_the_best_ones_record(tmp_path):
    _ioi(tmp_path, [0.1, 0.1, 0.1, 0.1])
    patch = json.loads((tmp_path / seeds_causal.IOI_OUT / "patch.json").read_text())
    for result in patch["results"].values():
        result["ceilings"] = {label: _ceiling(0.2) for label in result["ceilings"]}
    patch["results"]["resid_post.3"]["ceilings"]["sae"] = _ceiling(0.3)
    _write(tmp_path / seeds_causal.IOI_OUT / "patch.json", patch)
    reason = seeds_causal._ioi_row(tmp_path)["reason"]
    assert "0.300 < 0.8" in reason and "Diagnosis (resid_post.3 sae)" in reason
    assert "name column alone restores 0.750" in reason and "every latent restores 0.150" in reason
    assert "pending (causal-ioi-names)" in reason
    group = {"all_latents_fraction": 0.5, "fvu_names": 0.18}
    _write(tmp_path / seeds_causal.NAMES_IOI_OUT / "ioi-names.json", {
        "store_tokens": 5_200_039, "group": 12, "count_median": 3, "never_seen": 12, "saes": {
            "w/train/causal-L6-k32/sae": {"frequent": group, "rare": {"all_latents_fraction": 0.15, "fvu_names": 0.45},
                                          "error_vs_log_count_r": -0.82}}})
    reason = seeds_causal._ioi_row(tmp_path)["reason"]
    assert "median 3 times in the 5,200,039 training tokens, 12 never" in reason
    assert "causal-L6-k32 0.500 (FVU names 0.180) against 0.150 (FVU names 0.450)" in reason and "r -0.82" in reason


def _balanced_result(control: float, balanced: float) -> dict:
    """ioi-balanced.json as bench.ioi_balanced.measure writes it (the keys the row reads)."""
    def sae(fraction, fvu):
        return {"all": {"all_latents_fraction": fraction, "fvu_names": fvu},
                "frequent": {"all_latents_fraction": 0.79}, "rare": {"all_latents_fraction": 0.1}, "heldout_fvu": fvu}
    return {"labels": {"control": "w/c/sae", "balanced": "w/b/sae"},
            "saes": {"w/c/sae": sae(control, 0.3), "w/b/sae": sae(balanced, 0.05)},
            "counts": {f"n{i}": i for i in range(100)}, "balanced_counts": {f"n{i}": 280 + i for i in range(100)}}


def test_the_ioi_row_takes_the_name_balanced_ceiling_and_says_which_data_gave_it(tmp_path):
    _ioi(tmp_path, [0.1, 0.1, 0.1, 0.1])
    patch = json.loads((tmp_path / seeds_causal.IOI_OUT / "patch.json").read_text())
    for result in patch["results"].values():
        result["ceilings"] = {label: _ceiling(0.2) for label in result["ceilings"]}
    _write(tmp_path / seeds_causal.IOI_OUT / "patch.json", patch)
    reason = seeds_causal._ioi_row(tmp_path)["reason"]
    assert "0.200 < 0.8" in reason and "name-balanced training data: pending (causal-ioi-balanced)" in reason
    _write(tmp_path / seeds_causal.BALANCED_OUT / "ioi-balanced.json", _balanced_result(0.3, 0.86))
    reason = seeds_causal._ioi_row(tmp_path)["reason"]
    assert "best ceiling 0.860 ≥ 0.8" in reason and "Diagnosis" not in reason
    assert "each name 280–379 times in its store against a median 50 in the control's" in reason
    assert "control 0.300 (FVU names 0.300" in reason and "balanced 0.860 (FVU names 0.050" in reason
    _write(tmp_path / seeds_causal.BALANCED_OUT / "ioi-balanced.json", _balanced_result(0.3, 0.5))
    assert "best ceiling 0.500 < 0.8" in seeds_causal._ioi_row(tmp_path)["reason"]


def test_the_ioi_row_takes_the_ceiling_at_the_larger_budget_too(tmp_path):
    _ioi(tmp_path, [0.1, 0.1, 0.1, 0.1])
    _write(tmp_path / seeds_causal.BALANCED_OUT / "ioi-balanced.json", _balanced_result(0.3, 0.6))
    assert "at 2.5x the budget: pending (causal-ioi-balanced-large)" in seeds_causal._ioi_row(tmp_path)["reason"]
    names = {"saes": {f"w/train/causal-L3-balanced-large{s}/sae": _balanced_result(0, fraction)["saes"]["w/b/sae"]
                      for s, fraction in (("", 0.84), ("-k64", 0.9))}}
    _write(tmp_path / seeds_causal.LARGE_OUT / "ioi-names.json", names)
    reason = seeds_causal._ioi_row(tmp_path)["reason"]
    assert "best ceiling 0.900 ≥ 0.8" in reason and "on 4,915,200 tokens of name-balanced data: " in reason
    assert "causal-L3-balanced-large 0.840 (FVU names 0.050; frequent/rare names 0.790/0.100; held-out FVU 0.050)" \
        in reason


def test_the_ioi_row_judges_the_name_balanced_curves_beside_resid_post_6(tmp_path):
    _ioi(tmp_path, [0.1, 0.1, 0.1, 0.1])
    patch = json.loads((tmp_path / seeds_causal.IOI_OUT / "patch.json").read_text())
    patch["results"]["resid_post.6"]["curves"]["causal-L6-k32"] = _curve([0.0] * 4)  # no SAE beats PCA at .6
    _write(tmp_path / seeds_causal.IOI_OUT / "patch.json", patch)
    assert seeds_causal._ioi_row(tmp_path)["verdict"] == "not reproduced"
    labels = ["causal-L3-balanced", "causal-L3-balanced-k16", "causal-L3-balanced-k64"]
    three = {**patch["results"]["resid_post.3"], "saes": labels, "curves": {
        "causal-L3-balanced": _curve([0.2, 0.5, 0.7, 0.8]), "causal-L3-balanced-k16": _curve([0.1] * 4),
        "causal-L3-balanced-k64": _curve([0.1] * 4), "pca": _curve([0.1, 0.3, 0.5, 0.6]),
        "neurons": _curve([0.0, 0.1, 0.2, 0.3])}}
    _write(tmp_path / seeds_causal.BALANCED_CURVES_OUT / "patch.json", {"results": {"resid_post.3": three}})
    row = seeds_causal._ioi_row(tmp_path)
    assert row["verdict"] == "reproduced"
    assert "every m = 4/16/64: causal-L3-balanced (resid_post.3 (name-balanced))" in row["reason"]
    assert "at resid_post.3 (name-balanced): causal-L3-balanced 0.500/0.700/0.800" in row["ours"]
    large = {**three, "saes": ["causal-L3-balanced-large"], "curves": {
        "causal-L3-balanced-large": _curve([0.3, 0.6, 0.8, 0.9]), "pca": three["curves"]["pca"],
        "neurons": three["curves"]["neurons"]}}
    _write(tmp_path / seeds_causal.LARGE_CURVES_OUT / "patch.json", {"results": {"resid_post.3": large}})
    row = seeds_causal._ioi_row(tmp_path)
    assert ("causal-L3-balanced (resid_post.3 (name-balanced)), causal-L3-balanced-large (resid_post.3 "
            "(name-balanced, 4,915,200 tokens))") in row["reason"]
    assert ("at resid_post.3 (name-balanced, 4,915,200 tokens): causal-L3-balanced-large 0.600/0.800/0.900"
            in row["ours"])


def _erasure_result(sae_target, sae_other, pca_sel=(0.2, 0.1)):
    """erasure.json as erasure.erasure writes it (rows with erasure._row's keys), checked by bench's reader."""
    def row(method, n, dt, do):
        return {"method": method, "n": n, "directions": n, "latents": list(range(n)), "association": None,
                "loss_target": 3.0 + dt, "loss_other": 3.0 + do, "delta_target": dt, "delta_other": do,
                "selectivity": erasure.selectivity(dt, do)}
    rows = [row("sae", n, sae_target * n / 64, sae_other * n / 64) for n in (1, 4, 16, 64)]
    rows += [row("pca", n, pca_sel[0] * n / 64, pca_sel[1] * n / 64) for n in (1, 4, 16, 64)]
    rows.append(row("leace", 1, 0.05, 0.01))
    return {"site": "resid_post.6", "fit_windows": 48, "eval_windows": 48, "target_positions": 150,
            "other_positions": 3000, "clean_loss_target": 3.47, "clean_loss_other": 3.1, "rows": rows,
            "seconds": 5.0, "concept": {"name": "gendered_pronouns", "words": [], "token_ids": [], "env": {}}}


def test_the_erasure_row_ranks_sae_against_pca_and_leace(tmp_path):
    from bench.interventions import erasure_section

    result = _erasure_result(0.3, 0.0)  # other positions' loss not raised: the best case, not a missing ratio
    assert "leace" in "\n".join(erasure_section(result))
    _write(tmp_path / seeds_causal.IOI_OUT / "erasure.json", result)
    row = seeds_causal._erasure_row(tmp_path)
    assert row["verdict"] == "reproduced" and "names: pending (causal-erasure-names)" in row["ours"]
    assert "sae 64 dir. Δ +0.300/+0.0000 (sel. other not raised)" in row["ours"] and "leace 1 dir." in row["ours"]
    _write(tmp_path / seeds_causal.NAMES_OUT / "erasure.json", _erasure_result(0.01, 0.01))
    assert "; names: clean 3.47" in seeds_causal._erasure_row(tmp_path)["ours"]
    _write(tmp_path / seeds_causal.IOI_OUT / "erasure.json", _erasure_result(0.05, 0.0))  # selective but too weak
    assert seeds_causal._erasure_row(tmp_path)["verdict"] == "not reproduced"


def _node(site, latent, tokens):
    return {"id": circuit_ablation.node_id(site, latent, 0), "site": site, "latent": latent, "activation": 1.0,
            "top_tokens": tokens}


def test_the_circuit_row_measures_depth_sites_and_attribution_against_ablation(tmp_path):
    nodes = [_node("resid_post.9", 1, [" Mary"]), _node("resid_post.6", 2, [" said"]),
             _node("resid_post.6", 3, [" to"]),
             _node("resid_post.3", 4, [" said", " told"])]
    edges = [{"source": "6_2", "target": "9_1", "effect": 0.4, "effect_abs": 4.0, "attribution": 0.38},
             {"source": "6_3", "target": "9_1", "effect": 0.2, "effect_abs": 2.0, "attribution": 0.22},
             {"source": "3_4", "target": "6_2", "effect": 0.3, "effect_abs": 3.0, "attribution": 0.29}]
    graph = {"root": "9_1", "sites": ["resid_post.3", "resid_post.6", "resid_post.9"], "depth": 2, "keep": 3,
             "candidates": 16, "contexts": 16, "nodes": nodes, "edges": edges, "forwards": 40, "concept": "names"}
    assert "3_4" in circuit_ablation.describe(graph)
    _write(tmp_path / seeds_causal.IOI_OUT / "circuit.json", graph)
    row = seeds_causal._circuit_row(tmp_path)
    assert row["verdict"] == "reproduced" and "depth 2 across 3 sites" in row["ours"]
    assert "1 of them token identity" in row["ours"] and "largest gap 0.020" in row["ours"]
    graph["edges"] = edges[:2]  # one level deep
    _write(tmp_path / seeds_causal.IOI_OUT / "circuit.json", graph)
    assert "depth 1" in seeds_causal._circuit_row(tmp_path)["ours"]
    assert seeds_causal._circuit_row(tmp_path)["verdict"] == "not reproduced"


def _connect_report(w, mse_mlp, hidden_l0=22.0):
    """connect.json with its linearity part from connect_run._linearity itself, checked by summary_text."""
    n = 5
    lin = SimpleNamespace(firings=torch.full((n,), 50), energy=torch.ones(n), mse=torch.full((n,), 0.0100))
    mlp = SimpleNamespace(mse=torch.tensor(mse_mlp))
    data = SimpleNamespace(out_features=torch.arange(n))
    fit = {"stopped": "converged: no relative improvement", "steps": 900, "skip_start": True}
    sweep = [{"hidden_l1": 1e-3, "hidden_l0": 300.0, "heldout_fvu": 0.3, "fit": fit},
             {"hidden_l1": 3e-3, "hidden_l0": hidden_l0, "heldout_fvu": 0.4, "fit": fit}]
    report = {"site_in": "mlp_in.6", "site_out": "mlp_out.6", "tokens": {"train": 4_700_000, "heldout": 520_000},
              "features": {"in": 8192, "out": n},
              "connectors": {"linear": {"heldout_fvu": 0.2, "hidden_l0": None, "fit": {"stopped": "least squares"}},
                             "mlp": {"heldout_fvu": 0.15, "hidden_l0": 300.0, "fit": fit}},
              **connect_run._linearity(data, {"linear": lin, "mlp": mlp}, 0.001),
              "l1_sweep": {"points": [{"l1_coefficient": 0.1, "heldout_fvu": 0.3, "l1_norm_per_output": 1.0,
                                       "terms_per_output": 5.0}], "elbow": 0},
              "sae_on_sae": {"hidden": 1024, "weight_l1": 0.01, "target_hidden_l0": 30, "reached": hidden_l0 <= 30,
                             "hidden_l1": 3e-3, "hidden_l0": hidden_l0, "heldout_fvu": 0.4, "sweep": sweep,
                             "dense_mlp_hidden_l0": 300.0}, "showcase": []}
    assert "SAE on SAE: hidden L0" in connect_report.summary_text(report)
    _write(w / seeds_causal.CONNECT_OUT / "connect.json", report)


def test_the_linear_and_sae_on_sae_rows_read_connect_json(tmp_path):
    _connect_report(tmp_path, [0.0100, 0.0095, 0.0099, 0.0050, 0.0100])  # 4 of 5 within 0.001 of linear
    row = seeds_causal._linear_row(tmp_path)
    assert row["verdict"] == "reproduced" and row["ours"].startswith("80.0% linear at 0.001 (4 of 5 judged, 0 neg")
    assert "not stated" in row["seed"] and "converged" in row["ours"]
    sos = seeds_causal._sae_on_sae_row(tmp_path)
    assert sos["verdict"] == "reproduced" and "hidden L0 22.0 of 1024 at hidden L1 0.003, held-out FVU 0.400" in \
        sos["ours"] and "25" in sos["seed"]
    _connect_report(tmp_path, [0.0100, 0.0120, 0.0130, 0.0050, 0.0100], hidden_l0=522.0)  # 2 of 5 negative
    assert seeds_causal._linear_row(tmp_path)["verdict"] == "not comparable"
    assert seeds_causal._sae_on_sae_row(tmp_path)["verdict"] == "not reproduced"


def _autointerp(w, sae_scores, note=True):
    """report.json with its summary from autointerp_report.summarize_kinds itself."""
    results = {}
    for kind, scores in {"sae": sae_scores, "pca": [0.1, 0.12, 0.08], "random": [0.0, 0.01, -0.01]}.items():
        for i, s in enumerate(scores):
            results[f"{kind}/{i}"] = {"explanation": "x", "simulation": {"score": s / 2, "method": "m",
                                                                          "top_and_random": {"score": s}}}
    meta = {"model": "gemma-3-270m", "features": len(results), **({"explainer_note": "a floor"} if note else {})}
    _write(w / seeds_causal.AUTOINTERP_OUT / "report" / "report.json",
           {"format_version": 1, "meta": meta, "summary": summarize_kinds(results), "features": results})


def test_the_autointerp_row_scores_top_and_random_against_the_random_directions(tmp_path):
    _autointerp(tmp_path, [0.5, 0.52, 0.48])
    row = seeds_causal._autointerp_row(tmp_path)
    assert row["verdict"] == "reproduced" and "sae 0.500 ± 0.012" in row["ours"] and "beaten: pca, random" in \
        row["reason"]
    _autointerp(tmp_path, [0.11, 0.1, 0.09])  # within noise of PCA, with the weak explainer
    row = seeds_causal._autointerp_row(tmp_path)
    assert row["verdict"] == "not comparable" and "a floor" in row["reason"]
    _autointerp(tmp_path, [0.11, 0.1, 0.09], note=False)
    assert seeds_causal._autointerp_row(tmp_path)["verdict"] == "not reproduced"


def test_missing_outputs_give_pending_rows_naming_their_jobs(tmp_path):
    rows = {r["finding"]: r for r in seeds.report_rows(tmp_path)}
    for finding, job in {"ioi": "causal-ioi", "erasure": "causal-erasure", "circuit": "causal-circuit",
                         "linear": "causal-connect", "sae_on_sae": "causal-connect",
                         "autointerp": "causal-autointerp"}.items():
        assert rows[finding]["verdict"] == "pending" and job in rows[finding]["reason"], finding


def test_interventions_groups_the_site_saes_into_one_curve_each(tmp_path, monkeypatch):
    """bench.interventions --site-saes: the SAEs of other sparsities at --site join --sae's as {label: sae}, the
    mapping ioi_patching draws one curve and one ceiling per entry from; an SAE at another site is refused."""
    from bench import interventions

    def sae(path, site):
        return SimpleNamespace(path=tmp_path / path, site=site)

    on_disk = {"train/causal-L6-k16/sae": sae("train/causal-L6-k16/sae", "resid_post.6"),
               "train/causal-L9-k32/sae": sae("train/causal-L9-k32/sae", "resid_post.9")}
    monkeypatch.setattr(interventions, "load_saes", lambda paths: {on_disk[paths[0]].site: on_disk[paths[0]]})
    seen = {}

    def write_report(model, tokenizer, saes, out, **kwargs):
        seen.update(saes)
        result = {"baselines_fitted_on": "prompts", "clean_logit_diff": 1.0, "corrupted_logit_diff": 0.0,
                  "all_latents": 3, "all_latents_fraction": 0.9, "error_only_fraction": 0.1, "curves": {}}
        return {"results": {"resid_post.6": result}, "summary": ""}

    monkeypatch.setattr(interventions.ioi_patching, "write_report", write_report)
    saes = {"resid_post.3": sae("train/causal-L3-k32/sae", "resid_post.3"),
            "resid_post.6": sae("train/causal-L6-k32/sae", "resid_post.6")}
    args = argparse.Namespace(patch_corpus="prompts", site="resid_post.6", site_saes=["train/causal-L6-k16/sae"],
                              prompts=4, max_m=4, fit_tokens=64, model="m")
    interventions.patch_section(None, None, saes, tmp_path, args)
    assert list(seen["resid_post.6"]) == ["causal-L6-k32", "causal-L6-k16"] and seen["resid_post.3"] is \
        saes["resid_post.3"]
    args.site_saes = ["train/causal-L9-k32/sae"]
    with pytest.raises(SystemExit, match="every SAE must be at --site"):
        interventions.patch_section(None, None, saes, tmp_path, args)


def test_the_report_copies_the_causal_figures(tmp_path):
    w, out = tmp_path / "work", tmp_path / "out"
    for folder, name in ((seeds_causal.IOI_OUT, "patch.png"), (seeds_causal.FIGURES_OUT, "element-7-2026.png")):
        (w / folder).mkdir(parents=True)
        (w / folder / name).write_bytes(b"\x89PNG " + name.encode())
    (w / seeds_causal.IOI_OUT / "patch.json").write_text("{}")
    assert seeds.copy_figures(w, out) == ["interventions-patch.png", "figures-element-7-2026.png"]
    assert (out / "figures" / "interventions-patch.png").read_bytes() == b"\x89PNG patch.png"
