"""Bad arguments are refused by name, and a refused call leaves the caller's objects as they were."""

import threading

import numpy as np
import pytest
import torch

from fastsae import SAE, SAEConfig, SparseLatents, ops, use_backend
from fastsae.harvest import ActivationStore, ShuffledLoader, StoreWriter
from fastsae.train import TrainConfig, Trainer, train

from conftest import make_sae

BACKENDS = ["reference", "torch", "triton"]


# ---- decode ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [37, 40, -1])
def test_decode_refuses_an_index_outside_d_sae_on_every_backend(backend, bad):
    sae = make_sae(13, 37, "topk", k=3)
    latents = sae.encode(torch.randn(5, 13))
    latents.indices[2, 1] = bad
    with use_backend(backend), pytest.raises(ValueError, match=rf"indices must be in \[0, d_sae=37\).*{bad}"):
        sae.decode(latents)
    with use_backend(backend), pytest.raises(ValueError, match=r"indices must be in \[0, d_sae=37\)"):
        ops.decode(latents.values, latents.indices, sae.W_dec, sae.b_dec)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_of_dense_latents_with_negative_entries_is_exact(backend):
    sae = make_sae(13, 37)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(6, 37, generator=gen) * (torch.rand(6, 37, generator=gen) < 0.3)  # signed, sparse
    z[4] = 0  # a row with nothing active decodes to b_dec
    expected = z.double() @ sae.W_dec.double() + sae.b_dec.double()
    with use_backend(backend):
        got = sae.decode(z)
        torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=2e-5)
        z2 = z.clone().requires_grad_(True)  # and differentiable in z: the gradient is g @ W_decᵀ
        sae.decode(z2).sum().backward()
    torch.testing.assert_close(z2.grad, sae.W_dec.detach().sum(1).expand(6, 37), atol=2e-5, rtol=2e-5)


def test_fire_counts_refuses_an_index_outside_d_sae():
    values = torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"fire_counts: latent indices must be in \[0, d_sae=5\), got one of 5"):
        SparseLatents(values, torch.tensor([[0, 5], [1, 2]]), 5).fire_counts()
    with pytest.raises(ValueError, match=r"fire_counts: latent indices must be in \[0, d_sae=5\)"):
        SparseLatents(values, torch.tensor([[0, -1], [1, 2]]), 5).fire_counts()
    assert SparseLatents(values, torch.tensor([[0, 4], [1, 4]]), 5).fire_counts().tolist() == [1, 1, 0, 0, 2]


@pytest.mark.parametrize("k_aux", [0, -1, 38, True, 2.0])
def test_k_aux_out_of_range_is_named(k_aux):
    sae = make_sae(13, 37, "topk", k=3)
    dead = torch.ones(37, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"k_aux must be None or an int in \[1, d_sae=37\]"):
        sae(torch.randn(4, 13), dead_mask=dead, k_aux=k_aux)
    assert sae(torch.randn(4, 13), dead_mask=dead, k_aux=37).auxk is not None
    with pytest.raises(ValueError, match=r"DeadLatentConfig.auxk_k must be <= d_sae=37, got 38"):
        Trainer(sae, TrainConfig.flat(auxk_coefficient=0.1, auxk_k=38))


# ---- what train() takes ---------------------------------------------------------------------------------


def test_numpy_batches_are_refused_by_name():
    sae = SAE(SAEConfig(8, 16, activation="topk", k=2), seed=0)
    with pytest.raises(TypeError, match=r"batches must yield torch.Tensor .* got numpy.ndarray at step 0 "
                                        r"\(wrap numpy arrays with torch.from_numpy\)"):
        train(sae, [np.zeros((4, 8), dtype=np.float32)], TrainConfig.flat(progress=False))


def test_b_dec_mean_init_with_a_bad_first_batch_leaves_the_sae_as_it_was():
    sae = SAE(SAEConfig(8, 16, activation="topk", k=2), seed=0)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    nan_batch = torch.randn(16, 8)
    nan_batch[3, 2] = float("nan")
    cfg = TrainConfig.flat(b_dec_init="mean", progress=False)
    with pytest.raises(ValueError, match="b_dec_init='mean': the first batch contains NaN or Inf"):
        train(sae, [nan_batch], cfg)
    with pytest.raises(ValueError, match=r"b_dec_init='mean': the first batch must have shape \(..., d_in=8\), "
                                         r"got \(16, 7\)"):
        train(sae, [torch.randn(16, 7)], cfg)
    for name, value in sae.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed"


def test_mixed_precision_training_leaves_the_callers_sae_taking_fp32():
    sae = SAE(SAEConfig(8, 16, activation="topk", k=2), seed=0)
    batches = [torch.randn(32, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    result = train(sae, batches, TrainConfig.flat(mixed_precision="bfloat16", progress=False))
    assert result.sae is sae and sae.dtype == torch.float32 and sae.compute_dtype is None
    assert sae(torch.randn(3, 8)).x_hat.dtype == torch.float32


def test_resuming_into_a_run_of_another_optimizer_is_named(tmp_path):
    """(see also tests/train/test_checkpoint.py) the fused SAEAdam's state and torch's Adam's are not
    interchangeable."""
    sae = SAE(SAEConfig(8, 16, activation="topk", k=2), seed=0)
    batches = [torch.randn(32, 8) for _ in range(2)]
    train(sae, batches, TrainConfig.flat(optimizer="fused", checkpoint_every=1, progress=False), run_dir=tmp_path)
    other = SAE(SAEConfig(8, 16, activation="topk", k=2), seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"optimizer is 'fused'.*gives 'torch'.*OptimizerConfig\(kind='fused'\)"):
        train(other, batches, TrainConfig.flat(optimizer="torch", checkpoint_every=1, progress=False),
              run_dir=tmp_path, resume=True)
    for name, value in other.state_dict().items():  # refused before the checkpoint's weights were copied in
        assert torch.equal(value, before[name]), f"{name} changed"


# ---- the loader -----------------------------------------------------------------------------------------


def _within(seconds, fn):
    """fn() run with a deadline: a hang fails the test instead of blocking the suite."""
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (a hang)"
    if "error" in result:
        raise result["error"]
    return result["value"]


def _store(path, rows):
    with StoreWriter(path, model="m", sites={"s": 4}, dtype=torch.float32, context_size=rows or 1,
                     excluded_token_ids=[]) as writer:
        if rows:
            writer.add({"s": torch.randn(1, rows, 4)}, torch.ones(1, rows, dtype=torch.int64),
                       torch.ones(1, rows, dtype=torch.bool), 0)
            writer.flush()
    return ActivationStore(path)


@pytest.mark.parametrize("rows,batch_size,drop_last", [(10, 16, True), (0, 4, False)])
def test_loader_batches_refuse_an_epoch_without_a_batch(tmp_path, rows, batch_size, drop_last):
    loader = ShuffledLoader(_store(tmp_path, rows), "s", batch_size, drop_last=drop_last)
    with pytest.raises(ValueError, match=rf"an epoch of .* yields no batch: the store has {rows} rows, "
                                         rf"batch_size is {batch_size}"):
        _within(30, lambda: next(iter(loader.batches(3))))


# ---- evaluation -----------------------------------------------------------------------------------------


def test_evaluate_on_windows_where_every_token_is_excluded_is_named():
    from fastsae.evaluation import evaluate
    from fastsae.model import random_causal_lm

    model, _ = random_causal_lm()
    windows = torch.full((2, 6), 5, dtype=torch.int64)
    windows[:, -1] = 6  # the last position predicts nothing: still nothing to score
    with pytest.raises(ValueError, match=r"evaluate: every token of windows \(2, 6\) is excluded "
                                         r"\(exclude_token_ids=\[5\]\)"):
        evaluate(model, "resid_post.0", windows, {"sae": make_sae(32, 64)}, exclude_token_ids=[5], progress=False)


# ---- the trainer: hyper-parameters, divergence, runs that end early, resumes that extend ----------------


@pytest.mark.parametrize(("name", "value", "field"), [
    ("lr", -1.0, "OptimizerConfig.lr"), ("lr", 0.0, "OptimizerConfig.lr"), ("lr", float("inf"), "OptimizerConfig.lr"),
    ("lr", float("nan"), "OptimizerConfig.lr"), ("lr", True, "OptimizerConfig.lr"),
    ("lr", "1e-3", "OptimizerConfig.lr"),
    ("adam_betas", (0.9, 1.0), "OptimizerConfig.betas"), ("adam_betas", (-0.1, 0.9), "OptimizerConfig.betas"),
    ("adam_betas", (float("nan"), 0.9), "OptimizerConfig.betas"), ("adam_betas", (0.9,), "OptimizerConfig.betas"),
    ("total_steps", 0, "ScheduleConfig.total_steps"), ("total_steps", -1, "ScheduleConfig.total_steps"),
    ("total_steps", 2.5, "ScheduleConfig.total_steps"), ("total_steps", True, "ScheduleConfig.total_steps"),
    ("checkpoint_every", 0, "CheckpointConfig.every"), ("keep_checkpoints", 0, "CheckpointConfig.keep"),
    ("lr_warmup_fraction", -0.1, "ScheduleConfig.lr_warmup_fraction"),
    ("lr_decay_fraction", 1.5, "ScheduleConfig.lr_decay_fraction"),
    ("l1_warmup_fraction", float("nan"), "ScheduleConfig.l1_warmup_fraction"),
    ("l1_warmup_fraction", True, "ScheduleConfig.l1_warmup_fraction"),
    ("auxk_coefficient", -1.0, "DeadLatentConfig.auxk_coefficient"),
    ("auxk_coefficient", float("inf"), "DeadLatentConfig.auxk_coefficient"),
    ("kl_coefficient", float("nan"), "TrainConfig.kl_coefficient"),
    ("resample_every", 0, "DeadLatentConfig.resample_every"),
    ("dead_window_tokens", 0, "DeadLatentConfig.window_tokens"), ("log_every", 0, "LoggingConfig.log_every"),
])
def test_training_hyper_parameters_are_refused_naming_field_and_value(name, value, field):
    with pytest.raises(ValueError, match=rf"{field} must be .*got {__import__('re').escape(repr(value))}"):
        TrainConfig.flat(**{name: value})


def _run_cfg(**settings):
    return TrainConfig.flat(**{"progress": False, "log_every": 1, **settings})


@pytest.mark.parametrize("b_dec_init", ["zeros", "mean"])
def test_a_non_finite_loss_at_the_first_step_leaves_the_sae_as_it_was(tmp_path, b_dec_init):
    """Finite activations at |x| ≈ 3e19 square to more than float32 holds (3.4e38): the first loss is inf.
    With b_dec_init='mean' the b_dec set from the first batch is given back too."""
    from fastsae.train import TrainingDivergedError

    sae = make_sae(8, 16, "topk", k=2)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    batches = [3e19 * torch.randn(32, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    assert all(torch.isfinite(b).all() for b in batches)
    with pytest.raises(TrainingDivergedError, match=r"loss at step 1 is (inf|nan).*no checkpoint was written") as err:
        train(sae, batches, _run_cfg(checkpoint_every=1, b_dec_init=b_dec_init), run_dir=tmp_path)
    assert err.value.step == 1 and err.value.checkpoint is None
    assert not (tmp_path / "checkpoints").exists()
    for name, value in sae.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed"


def test_a_huge_lr_stops_at_the_step_that_diverges_naming_the_newest_checkpoint_left_intact(tmp_path):
    from fastsae.train import TrainingDivergedError
    from fastsae.train.checkpoint import latest_checkpoint, verify_checkpoint

    sae = make_sae(8, 16, "topk", k=2)
    batches = [torch.randn(32, 8, generator=torch.Generator().manual_seed(i)) for i in range(10)]
    with pytest.raises(TrainingDivergedError, match=r"loss at step (\d+) is .*not finite.*newest checkpoint is .*"
                                                    r"step-\d+ \(left as it was\).*OptimizerConfig.lr \(now 1e\+30\)") \
            as err:
        train(sae, batches, _run_cfg(lr=1e30, checkpoint_every=1), run_dir=tmp_path)
    step = err.value.step
    assert 1 < step < 10 and err.value.checkpoint == latest_checkpoint(tmp_path)
    assert err.value.checkpoint.name == f"step-{step - 1:08d}"  # nothing of the diverged step was written
    verify_checkpoint(err.value.checkpoint)
    saved = SAE.load(err.value.checkpoint / "sae")
    for name, value in sae.state_dict().items():  # the caller's SAE: the weights after the last finite step
        assert torch.equal(value, saved.state_dict()[name]), name


def test_batches_that_yield_nothing_are_an_error_and_batches_that_run_out_warn(tmp_path):
    """train(sae, []) used to return after 0 steps, and total_steps=10 with 3 batches to stop after 3,
    both without a word."""
    sae = make_sae(8, 16, "topk", k=2)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    with pytest.raises(ValueError, match=r"batches yielded no batch: no training step was taken"):
        train(sae, [], _run_cfg())
    assert all(torch.equal(v, before[k]) for k, v in sae.state_dict().items())
    batches = [torch.randn(32, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with pytest.warns(RuntimeWarning, match=r"batches ran out after step 3 of total_steps=10"):
        result = train(sae, batches, _run_cfg(total_steps=10))
    assert [m["step"] for m in result.history] == [1, 2, 3]
    train(make_sae(8, 16, "topk", k=2), iter(batches), _run_cfg())  # no total, no length: the batches are the run
    # a resumed run whose batches end before its checkpoint: nothing to train on
    train(make_sae(8, 16, "topk", k=2), batches, _run_cfg(total_steps=3, checkpoint_every=3), run_dir=tmp_path)
    with pytest.raises(ValueError, match=r"no batch after skipping the 3 a resumed run had consumed"):
        train(make_sae(8, 16, "topk", k=2), batches, _run_cfg(total_steps=6, checkpoint_every=3), run_dir=tmp_path,
              resume=True)


def test_resuming_with_a_larger_total_steps_extends_the_run_and_a_smaller_one_is_refused(tmp_path):
    batches = [torch.randn(32, 8, generator=torch.Generator().manual_seed(i)) for i in range(20)]
    first = train(make_sae(8, 16, "topk", k=2), batches[:10], _run_cfg(total_steps=10, checkpoint_every=5),
                  run_dir=tmp_path)
    assert first.history[-1]["step"] == 10
    sae = make_sae(8, 16, "topk", k=2, seed=1)
    with pytest.raises(ValueError, match=r"step-00000010: ScheduleConfig.total_steps=7 is less than the "
                                         r"checkpoint's step 10"):
        train(sae, batches, _run_cfg(total_steps=7, checkpoint_every=5), run_dir=tmp_path, resume=True)
    cfg = _run_cfg(total_steps=20, checkpoint_every=5)
    result = train(sae, batches, cfg, run_dir=tmp_path, resume=True)
    assert [m["step"] for m in result.history] == list(range(11, 21))  # 10 more steps
    # the LR schedule is that of a 20-step run: full LR after the resume, decayed over the last 20% (4 steps)
    from fastsae.train.trainer import lr_scale

    assert [m["lr"] for m in result.history] == pytest.approx([4e-4 * lr_scale(s - 1, 20, cfg.schedule)
                                                               for s in range(11, 21)])
    assert result.history[0]["lr"] == pytest.approx(4e-4) and result.history[-1]["lr"] < 4e-4
    import json

    assert json.loads((tmp_path / "checkpoints" / "step-00000020" / "trainer.json").read_text())["total_steps"] == 20
