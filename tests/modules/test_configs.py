"""Training settings split by concern: small flat dataclasses, each checked on construction."""

import dataclasses

import pytest

from fastsae.train import (
    CheckpointConfig,
    DeadLatentConfig,
    LoggingConfig,
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
)

PARTS = (OptimizerConfig, ScheduleConfig, DeadLatentConfig, LoggingConfig, CheckpointConfig, TrainConfig)


@pytest.mark.parametrize("cls", PARTS, ids=lambda c: c.__name__)
def test_each_config_is_small(cls):
    assert len(dataclasses.fields(cls)) <= 15


@pytest.mark.parametrize("make,field", [
    (lambda: OptimizerConfig(lr=0), "OptimizerConfig.lr"),
    (lambda: OptimizerConfig(betas=(0.9,)), "OptimizerConfig.betas"),
    (lambda: OptimizerConfig(kind="sgd"), "OptimizerConfig.kind"),
    (lambda: OptimizerConfig(kind="torch", state_dtype="bfloat16"), "OptimizerConfig.state_dtype"),
    (lambda: OptimizerConfig(mixed_precision="float16"), "OptimizerConfig.mixed_precision"),
    (lambda: ScheduleConfig(total_steps=0), "ScheduleConfig.total_steps"),
    (lambda: ScheduleConfig(lr_warmup_fraction=0.9, lr_decay_fraction=0.2), "ScheduleConfig.lr_warmup_fraction"),
    (lambda: ScheduleConfig(l1_warmup_fraction=-0.1), "ScheduleConfig.l1_warmup_fraction"),
    (lambda: DeadLatentConfig(window_tokens=0), "DeadLatentConfig.window_tokens"),
    (lambda: DeadLatentConfig(resample_every=2.5), "DeadLatentConfig.resample_every"),
    (lambda: DeadLatentConfig(auxk_coefficient=-1), "DeadLatentConfig.auxk_coefficient"),
    (lambda: LoggingConfig(log_every=0), "LoggingConfig.log_every"),
    (lambda: CheckpointConfig(keep=0), "CheckpointConfig.keep"),
    (lambda: TrainConfig(b_dec_init="median"), "TrainConfig.b_dec_init"),
    (lambda: TrainConfig(kl_coefficient=float("nan")), "TrainConfig.kl_coefficient"),
    (lambda: TrainConfig(optimizer={"lr": 1e-3}), "TrainConfig.optimizer"),
    (lambda: TrainConfig.flat(learning_rate=1e-3), "learning_rate"),
])
def test_bad_settings_name_their_field(make, field):
    with pytest.raises((ValueError, TypeError), match=field.replace(".", r"\.")):
        make()


def test_flat_names_go_to_their_concern_and_round_trip():
    cfg = TrainConfig.flat(lr=1e-3, adam_betas=[0.8, 0.9], total_steps=10, resample_every=5, checkpoint_every=2,
                           log_every=3, progress=False, seed=4, b_dec_init="mean")
    assert cfg.optimizer == OptimizerConfig(lr=1e-3, betas=(0.8, 0.9))
    assert cfg.schedule.total_steps == 10 and cfg.dead_latents.resample_every == 5
    assert cfg.checkpoints.every == 2 and cfg.logging.log_every == 3 and cfg.seed == 4
    saved = cfg.to_dict()
    assert "progress" not in saved["logging"]  # a property of the process, not of the run
    back = TrainConfig.from_dict(saved)
    assert back == cfg.replace(progress=True)
    assert cfg.replace(lr=2e-3).optimizer.lr == 2e-3 and cfg.replace(lr=2e-3).seed == 4


def test_from_dict_refuses_unknown_fields_and_versions():
    with pytest.raises(ValueError, match="unknown fields"):
        TrainConfig.from_dict({"optimiser": {}})
    with pytest.raises(ValueError, match=r"TrainConfig\.schedule"):
        TrainConfig.from_dict({"schedule": {"steps": 3}})
    with pytest.raises(ValueError, match="format version"):
        TrainConfig.from_dict({}, version=7)
