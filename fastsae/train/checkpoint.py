"""Checkpoints a run can resume from, written so that a kill at any moment never corrupts one.

Layout of run_dir/checkpoints/:
    step-00000120/      sae/ (cfg.json + sae.safetensors), optimizer.safetensors, trainer.safetensors, trainer.json
    latest              the name of the newest complete checkpoint

A checkpoint is written into a temporary directory, every file fsynced, then
renamed into place in one step; `latest` is replaced atomically afterwards.
An interrupted write leaves only a `.tmp-*` directory, which is ignored and
cleaned up; the previous checkpoint stays intact.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from .. import io

LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as (tensors, JSON-able rest); no pickles."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def write_checkpoint(run_dir: Path, step: int, write_files, keep: int = 2) -> Path:
    """write_files(tmp_dir) writes the checkpoint's files; returns the final directory."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_files(tmp)
    for path in tmp.rglob("*"):  # io's writers fsync files; make the directories durable too
        if path.is_dir():
            _fsync_dir(path)
    _fsync_dir(tmp)
    if final.exists():  # re-writing a step (after a resume): replace the old copy
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    io.atomic_write(root / LATEST, lambda p: Path(p).write_text(final.name + "\n"))
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; stale temporaries from a killed write are removed."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    for tmp in root.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if _STEP_DIR.match(named.name) and named.is_dir():
            return named
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None
