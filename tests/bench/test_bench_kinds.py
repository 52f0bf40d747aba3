"""bench.kinds at tiny shapes: every kind's step timed against the naive version and the floor, the naive and
fastsae losses equal on the same weights, and the report written."""

import json

import pytest

from bench import kinds
from bench.kinds_naive import naive_loss
from fastsae import SAEConfig


def test_the_report_has_every_kind_with_positive_ratios_and_equal_losses(tmp_path):
    kinds.main(["--quick", "--repeats", "2", "--warmup", "0", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("kinds-cpu-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {r["kind"] for r in rows} == set(kinds.kinds(256, 8))
    for name in kinds.kinds(256, 8):
        impls = {r["impl"]: r for r in rows if r["kind"] == name}
        assert set(impls) == {"floor", "naive", "fastsae torch"}, name
        for row in (impls["naive"], impls["fastsae torch"]):
            assert row["x_floor"] > 0 and row["x_naive"] > 0 and row["ms"] > 0
            assert row["loss_naive"] == pytest.approx(row["loss_fastsae"], rel=1e-4)
    assert path.with_suffix(".md").read_text().count("| fastsae torch |") == len(kinds.kinds(256, 8))


def test_a_naive_loss_that_differs_is_refused(monkeypatch):
    """The loss check can fail: a naive Matryoshka loss 1% off fastsae's is refused."""
    import torch

    cfg = SAEConfig(24, 64, **kinds.kinds(64, 4)["matryoshka batchtopk"])
    x, y = torch.randn(16, 24), torch.randn(16, 24)
    kinds.check_losses(cfg, x, y)
    monkeypatch.setattr(kinds, "naive_loss", lambda sae, x, y: naive_loss(sae, x, y) * 1.01)
    with pytest.raises(ValueError, match="different things"):
        kinds.check_losses(cfg, x, y)
