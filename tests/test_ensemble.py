"""Ensembles: one set of kernels per step for E members; each member equals its solo run bit for bit (CPU)."""

import pytest
import torch

from fastsae import SAE, SAEConfig
from fastsae.toy import ToyDictionary
from fastsae.train import TrainConfig, train
from fastsae.train.ensemble import train_ensemble

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
