"""Ensembles: one set of kernels per step for E members; each member equals its solo run bit for bit (CPU)."""

import pytest
import torch

from fastsae import SAE, SAEConfig
from fastsae.toy import ToyDictionary
from fastsae.train import TrainConfig, train
from fastsae.train.ensemble_training import train_ensemble

SWEEPS = [
    [dict(activation="relu", l1_coefficient=c) for c in (0.05, 0.2, 1.0)],
    [dict(activation="topk", k=k) for k in (2, 5, 8)],
    [dict(activation="batchtopk", k=k) for k in (3, 6)],
    [dict(activation="relu", l1_coefficient=c, tied=True) for c in (0.1, 0.4)],
]


@pytest.mark.parametrize("sweep", SWEEPS, ids=["l1", "topk", "batchtopk", "tied"])
def test_each_member_equals_its_solo_run(sweep):
    toy = ToyDictionary.random(d_in=12, n_features=40, active_per_sample=3.0, seed=0)
    cfg = TrainConfig.flat(lr=3e-3, total_steps=25, l1_warmup_fraction=0.2, progress=False, log_every=5,
                           optimizer="fused")
    members = [SAE(SAEConfig(12, 48, **kw), seed=i) for i, kw in enumerate(sweep)]
    result = train_ensemble(members, toy.batches(64, 25), cfg)
    for i, kw in enumerate(sweep):
        solo = SAE(SAEConfig(12, 48, **kw), seed=i)
        train(solo, toy.batches(64, 25), cfg)
        trained = result.members[i]
        assert trained.cfg == solo.cfg
        for (name, a), b in zip(solo.state_dict().items(), trained.state_dict().values(), strict=True):
            assert torch.equal(a, b), f"member {i} ({kw}): {name} differs from its solo run"
    assert len(result.history[-1]["mse"]) == len(sweep)


def test_members_must_share_a_shape():
    with pytest.raises(ValueError, match="d_sae"):
        train_ensemble([SAE(SAEConfig(8, 16)), SAE(SAEConfig(8, 32))], [])
    with pytest.raises(ValueError, match="resample_every"):
        train_ensemble([SAE(SAEConfig(8, 16))], [], TrainConfig.flat(resample_every=5))


def test_a_diverging_member_stops_the_ensemble_before_its_update():
    """A member whose loss goes non-finite stops the run before that step's update (as the single-SAE trainer
    does), naming the member and handing back every member's weights after the last finite step."""
    from fastsae.train import TrainingDivergedError

    members = [SAE(SAEConfig(6, 12, activation="topk", k=2), seed=i) for i in range(3)]
    with torch.no_grad():
        members[1].W_dec[0] = float("inf")  # member 1 reconstructs with an infinite row from step 1
    x = torch.randn(2, 8, 6)
    with pytest.raises(TrainingDivergedError, match=r"member 1 at step 1 is not finite") as caught:
        train_ensemble(members, x, TrainConfig.flat(lr=1e-2, progress=False))
    assert caught.value.step == 1 and caught.value.checkpoint is None
    for before, after in zip(members, caught.value.members, strict=True):  # no update was applied
        for (name, a), b in zip(before.state_dict().items(), after.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    with pytest.raises(TypeError, match="batches must yield torch.Tensor"):
        train_ensemble(members[:1], [[1.0] * 6], TrainConfig.flat(progress=False))
