"""bench.dictionaries: one training job per kind on the layers harvest's first shards, and a report whose rows
come from each kind's evaluation (pending until it has run)."""

import json

from bench import dictionaries


def test_every_kind_trains_one_epoch_of_the_first_shards(tmp_path):
    for job in dictionaries.JOBS:
        argv = job.argv(tmp_path)
        if job.stage == "train":
            assert argv[argv.index("--tokens") + 1] == str(dictionaries.TOKENS) >= "1000000"
            assert int(argv[argv.index("--steps") + 1]) * dictionaries.BATCH == dictionaries.TOKENS
    kinds = {dictionaries._kind(j) for j in dictionaries.JOBS}
    assert kinds == set(dictionaries.KINDS)


def test_the_report_reads_each_kinds_evaluation(tmp_path):
    path = tmp_path / "dictionaries" / "crosscoder-eval" / "metrics.json"
    path.parent.mkdir(parents=True)
    per_site = {"resid_post.3": {"fvu": 0.1}, "resid_post.9": {"fvu": 0.3}}
    path.write_text(json.dumps({"results": {"model": {}, "cc": {"fvu": 0.2, "l0": 32.0, "dead_fraction": 0.25,
                                                                "ce_loss_recovered": 0.9, "per_site": per_site}}}))
    report = dictionaries.write_report(tmp_path, tmp_path / "out")
    rows = {r["kind"]: r for r in json.loads(report.with_suffix(".json").read_text())["rows"]}
    assert rows["crosscoder"]["fvu_per_site"] == {"resid_post.3": 0.1, "resid_post.9": 0.3}
    assert rows["topk"]["status"] == "pending: dict-eval-topk"
    assert "| crosscoder | acausal crosscoder" in report.with_suffix(".md").read_text()


def test_theta_moved_measures_each_latents_change_from_the_configured_start(tmp_path):
    import torch

    from fastsae import SAE, SAEConfig

    sae = SAE(SAEConfig(8, 4, activation="jumprelu", jumprelu_threshold=0.5, jumprelu_sparsity="step"), seed=0)
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([0.5, 0.7, 0.2, 0.5]))
    sae.save(tmp_path / "run" / "sae")
    moved = dictionaries.theta_moved(tmp_path / "run")
    assert moved["start"] == 0.5
    assert abs(moved["mean_abs_change"] - 0.125) < 1e-6 and abs(moved["max_abs_change"] - 0.3) < 1e-6
    assert abs(moved["mean"] - 0.475) < 1e-6
