"""ops/workspace.py: the torch backend's pre-activations in memory a trainer keeps from step to step."""

import contextlib
import copy
import threading

import torch

from fastsae import use_backend
from fastsae.ops.workspace import Workspace, scratch
from fastsae.train import TrainConfig, Trainer

from conftest import make_sae


def test_take_reuses_and_grows():
    ws = Workspace()
    a = ws.take((3, 5), torch.float32, torch.device("cpu"))
    b = ws.take((2, 7), torch.float32, "cpu")  # smaller: the same memory
    assert b.data_ptr() == a.data_ptr() and b.shape == (2, 7)
    c = ws.take((4, 5), torch.float32, "cpu")  # larger: a new buffer, the old one let go
    assert c.shape == (4, 5) and ws.nbytes == 4 * 5 * 4
    d = ws.take((2, 2), torch.float64, "cpu")  # another dtype: a buffer of its own
    assert d.dtype == torch.float64 and ws.nbytes == 4 * 5 * 4 + 2 * 2 * 8


def test_scratch_comes_from_the_active_workspace_only():
    ws = Workspace()
    outside = scratch((4, 4), torch.float32, torch.device("cpu"))
    with ws.active():
        first = scratch((4, 4), torch.float32, torch.device("cpu"))
        again = scratch((4, 4), torch.float32, torch.device("cpu"))
        seen = []
        thread = threading.Thread(target=lambda: seen.append(scratch((4, 4), torch.float32, torch.device("cpu"))))
        thread.start()
        thread.join()
    after = scratch((4, 4), torch.float32, torch.device("cpu"))
    assert first.data_ptr() == again.data_ptr() == ws.take((4, 4), torch.float32, "cpu").data_ptr()
    assert outside.data_ptr() != first.data_ptr() and after.data_ptr() != first.data_ptr()
    assert seen[0].data_ptr() != first.data_ptr()  # another thread does not see this one's workspace


def test_trainer_keeps_the_pre_activations_and_trains_the_same_weights():
    """The trainer's steps, AuxK's encode included, go through its workspace and give the weights of steps that
    allocate afresh, bit for bit."""
    sae = make_sae(12, 64, "topk", 3)
    other = copy.deepcopy(sae)
    cfg = TrainConfig.flat(lr=1e-2, progress=False, auxk_coefficient=1 / 32, dead_window_tokens=20)
    with use_backend("torch"):
        trainer, fresh = Trainer(sae, cfg), Trainer(other, cfg)
        fresh.workspace.active = contextlib.nullcontext  # allocate on every call
        gen = torch.Generator().manual_seed(0)
        for _ in range(6):
            x = torch.randn(10, 12, generator=gen)
            trainer.step(x)
            fresh.step(x)
    assert trainer.workspace.nbytes == 10 * 64 * 4  # one (N, d_sae) fp32 buffer, AuxK's (N, dead) reusing it
    assert fresh.workspace.nbytes == 0
    for (name, a), b in zip(sae.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b), name
