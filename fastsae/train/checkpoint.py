"""Checkpoints a run can resume from, written so that a kill at any moment never corrupts one.

Layout of run_dir/checkpoints/:
    step-00000120/      sae/ (cfg.json + sae.safetensors), optimizer.safetensors, optimizer.json,
                        trainer.safetensors, trainer.json,
                        checkpoint.json: {"format_version", "step", "files": {relative path: SHA-256}}
    latest              the name of the newest complete checkpoint

A checkpoint is built in a temporary directory, every file fsynced and listed with its SHA-256 in
checkpoint.json, then swapped into place in one step (`io.replace_directory`); `latest` is replaced
atomically afterwards. Readers never delete anything: the temporaries of a killed writer are removed
by the next writer of the run directory, under its lock (`remove_stale_temporaries`). A resume checks
the newest checkpoint against its checksums and falls back to the newest intact one, with a warning.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import torch

from .. import io

LATEST = "latest"
MANIFEST = "checkpoint.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


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


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict, source: Path | str = "optimizer") -> dict:
    io.check_fields(meta, source, {"param_groups": list, "scalars": dict})
    state: dict[int, dict] = {}
    try:
        for key, value in tensors.items():
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
        for key, value in meta["scalars"].items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    except ValueError:
        raise io.CorruptFileError(source, f"optimizer state key {key!r} is not '<param index>.<name>'") from None
    return {"state": state, "param_groups": meta["param_groups"]}


def optimizer_kind(meta: dict) -> str:
    """'fused' (SAEAdam: its param groups carry unit_rows) or 'torch' (torch.optim.Adam), from optimizer.json."""
    return "fused" if any(isinstance(g, dict) and "unit_rows" in g for g in meta.get("param_groups", [])) else "torch"


def read_optimizer(path: Path, device: torch.device | str) -> tuple[dict, str]:
    """(state_dict, kind) of checkpoint path's optimizer."""
    meta = io.read_json(path / "optimizer.json")
    tensors = io.read_tensors(path / "optimizer.safetensors", device=str(device))
    return optimizer_from_files(tensors, meta, path / "optimizer.json"), optimizer_kind(meta)


def read_trainer_state(path: Path) -> dict[str, torch.Tensor]:
    """trainer.safetensors of checkpoint path: dead-latent counters, resampling pool, RNG states."""
    state = io.read_tensors(path / "trainer.safetensors")
    missing = sorted({"tokens_since_fired", "pool", "generator", "torch_rng"} - set(state))
    if missing:
        raise io.CorruptFileError(path / "trainer.safetensors", f"tensors {missing} are missing")
    return state


def read_trainer_meta(path: Path) -> dict:
    """trainer.json of checkpoint path, with its fields checked."""
    return io.check_fields(io.read_json(path / "trainer.json"), path / "trainer.json",
                           {"step": int, "tokens": int, "total_steps": (int, type(None)), "config": dict})


def write_checkpoint(run_dir: Path, step: int, write_files, keep: int = 2) -> Path:
    """write_files(tmp_dir) writes the checkpoint's files; returns the final directory."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"

    def write(tmp: Path) -> None:
        write_files(tmp)
        files = {p.relative_to(tmp).as_posix(): io.sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        io.write_json(tmp / MANIFEST, {"format_version": FORMAT_VERSION, "step": step, "files": files})

    io.replace_directory(final, write)  # re-writing a step (after falling back on resume) replaces it whole
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
    """The newest complete checkpoint (not verified; see resume_checkpoint). Reads only: safe to call
    while a writer is at work."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text(errors="replace").strip()
        if _STEP_DIR.match(named.name) and named.is_dir():
            return named
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def verify_checkpoint(path: Path) -> None:
    """CorruptFileError (or FileNotFoundError) unless every file listed in checkpoint.json is there with its
    SHA-256. Checkpoints written before checksums (no checkpoint.json) pass if their SAE is there."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        if not (path / "sae" / "cfg.json").is_file():
            raise FileNotFoundError(f"{path}: no {MANIFEST} and no sae/cfg.json: an incomplete checkpoint")
        return
    meta = io.check_fields(io.read_json(manifest), manifest, {"format_version": int, "step": int, "files": dict})
    for name, digest in meta["files"].items():
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"{file}: listed in {manifest} but missing")
        io.verify_sha256(file, digest, manifest)


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that passes verify_checkpoint, newest first from `latest`; each damaged one
    skipped with a warning naming it and what was wrong. None when the run has no checkpoint; an error
    when it has some but none is intact (starting over silently would lose the run)."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    candidates = [latest] + [p for p in reversed(complete_checkpoints(run_dir)) if p.name < latest.name]
    problems = []
    for path in candidates:
        try:
            verify_checkpoint(path)
        except (io.CorruptFileError, FileNotFoundError) as err:
            problems.append(f"{path.name}: {err}")
            continue
        if problems:
            warnings.warn(f"resuming {run_dir} from {path.name}, the newest intact checkpoint; skipped damaged "
                          f"{'; '.join(problems)}", stacklevel=2)
        return path
    raise io.CorruptFileError(Path(run_dir) / "checkpoints",
                              f"no intact checkpoint to resume from: {'; '.join(problems)}")


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete what killed writers left in run_dir and its checkpoints/ (half-built checkpoints, the
    temporaries of `latest`, metrics and the saved SAE). Only under the run directory's lock."""
    run_dir = Path(run_dir)
    return io.remove_stale_temporaries(run_dir) + io.remove_stale_temporaries(run_dir / "checkpoints")


def truncate_metrics(log: Path, step: int) -> None:
    """Keep metrics.jsonl's lines up to step (a resumed run logs the rest again). A half-written last line
    (a kill mid-write) is dropped; any other bad line raises CorruptFileError naming it."""
    if not log.exists():
        return
    kept = []
    for number, record in io.read_jsonl(log, tolerate_partial_last_line=True):
        logged = record.get("step")
        if isinstance(logged, bool) or not isinstance(logged, int):
            raise io.CorruptFileError(log, f"field 'step' must be an integer, got {logged!r}", line=number)
        if logged <= step:
            kept.append(record)
    io.atomic_write(log, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in kept)))
