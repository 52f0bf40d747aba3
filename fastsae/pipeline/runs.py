"""The researcher's runs as functions: harvest, train, evaluate, and the main job that chains them.

`fastsae harvest|train|eval|run` and the examples call these; each resumes where an interrupted run
stopped. A training run directory holds

    run.json        format_version 2: {"sae": SAEConfig, "train": TrainConfig (nested by concern),
                    "data": DataConfig, "windows": the corpus windows it trained on (when it knows them)}
    metrics.jsonl, checkpoints/, sae/   (the trainer's; sae/ takes raw activations, its metadata the provenance)

run.json of format 1 (no format_version; "train" one flat dict, as fastsae wrote it before the configs
were split by concern) is read and migrated by `read_run`.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import io
from ..config import DTYPES, SAEConfig
from ..sae import SAE
from ..train.train_config import FORMAT_VERSION, TrainConfig
from .data_sources import DataConfig, finish_sae, open_data

RUN_FILE = "run.json"
# What `fastsae train` assumes where neither --config nor a flag says otherwise.
DEFAULT_STEPS = 2000
D_SAE_PER_D_IN = 8


@dataclass
class RunSettings:
    sae: dict  # SAEConfig fields; d_in (and the default d_sae = 8·d_in) come from the data when absent
    train: TrainConfig
    data: DataConfig
    windows: dict | None = None  # what the run consumed (a harvest.corpus window record), once known

    def to_dict(self) -> dict:
        d = {"format_version": FORMAT_VERSION, "sae": self.sae, "train": self.train.to_dict(),
             "data": self.data.to_dict()}
        if self.windows is not None:
            d["windows"] = self.windows
        return d

    @classmethod
    def from_dict(cls, d: dict, source: object = "run settings") -> RunSettings:
        """Format 2, or format 1 (no format_version, "train" flat), migrated."""
        version = d.get("format_version", 1)
        unknown = sorted(set(d) - {"format_version", "sae", "train", "data", "windows"})
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; expected sae, train, data")
        try:
            train = TrainConfig.from_dict(d.get("train", {}), version=version)
            data = DataConfig.from_dict(d.get("data", {}))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err
        return cls(dict(d.get("sae", {})), train, data, d.get("windows"))


def read_run(path: str | Path) -> RunSettings:
    """A run.json (or a --config file of the same shape), of either format."""
    return RunSettings.from_dict(io.read_json(path), source=path)


def settings_from(config: str | Path | None = None, *, sae: dict | None = None, train: dict | None = None,
                  data: dict | None = None) -> RunSettings:
    """A config file's settings (or none) with overrides on top: sae and data by field, train by the flat
    names of TrainConfig.flat. The run length defaults to DEFAULT_STEPS."""
    base = read_run(config) if config else RunSettings({}, TrainConfig.flat(total_steps=DEFAULT_STEPS), DataConfig())
    if config and base.train.schedule.total_steps is None:
        base.train = base.train.replace(total_steps=DEFAULT_STEPS)
    return RunSettings({**base.sae, **(sae or {})}, base.train.replace(**(train or {})),
                       DataConfig.from_dict({**base.data.to_dict(), **(data or {})}))


def train_run(out: str | Path, settings: RunSettings | None = None, *, resume: bool = False,
              progress: bool = True, shard_latents: int | None = None, total_steps: int | None = None) -> SAE:
    """Train an SAE into the run directory out and return it, saved in out/sae taking raw activations.
    resume=True continues from out's newest checkpoint with out's own run.json (settings are then unused),
    but for total_steps: given, it replaces the run's length (larger extends a run; see
    Trainer.resumed_total_steps for the schedule). The checkpoint may be of any grid: one written by
    one process or sharded over several ranks resumes in one process or under torchrun, on any grid
    (train/distributed.py reshards it).
    Under torchrun every rank calls it: data parallel, or with shard_latents (0: every rank; N: N shards
    × world/N replicas) the latents split (train/distributed.py); it then returns this rank's ShardedSAE,
    and leaves the process group once every rank is done."""
    from ..ops.distributed import ProcessGrid, launched_by_torchrun, leave

    grid, device = ProcessGrid(), None
    if launched_by_torchrun():
        from ..train.distributed_training import setup

        grid, device = setup(shard_latents)
    elif shard_latents is not None:
        raise ValueError("shard_latents needs several processes: launch with torchrun --nproc-per-node N")
    out = Path(out)
    # the run directory's writer lock before run.json is touched: a second writer into it is refused, naming
    # this one, and cannot replace this run's configuration (the lock is re-entrant: the trainer takes it too)
    with io.DirectoryLock(out, "fastsae train") if grid.is_main else contextlib.nullcontext():
        sae = _train_locked(out, settings, resume, progress, grid, device, total_steps)
    if launched_by_torchrun():
        leave()  # every rank done: the process group goes
    return sae


def _train_locked(out: Path, settings: RunSettings | None, resume: bool, progress: bool, grid, device,
                  total_steps: int | None = None) -> SAE:
    from ..train import Trainer

    if resume and (out / RUN_FILE).is_file():
        settings = read_run(out / RUN_FILE)  # a resumed run keeps its own configuration, but for its length
        if total_steps is not None:  # checked against the newest checkpoint before run.json is rewritten
            from ..train import checkpoint as ckpt
            from ..train.checkpoint_loading import read_checkpoint_meta
            from ..train.schedules import resumed_total_steps

            newest = ckpt.latest_checkpoint(out)
            if newest is not None:  # written by one process or sharded over several: either format
                meta = read_checkpoint_meta(newest)
                resumed_total_steps(total_steps, meta["step"], meta["total_steps"], newest)
            settings.train = settings.train.replace(total_steps=total_steps)
    settings = settings or settings_from()
    dtype = DTYPES.get(settings.sae.get("dtype", "float32"))
    if dtype is None:
        raise ValueError(f"SAEConfig.dtype must be one of {tuple(DTYPES)}, got {settings.sae['dtype']!r}")
    # the site is resolved (and checked) before anything is built; a store serves each data rank its part
    data = open_data(settings.data, dtype, rank=grid.data_rank, world_size=grid.data_size, device=device)
    sites = {"n_sites": len(data.cfg.sites), "kind": "crosscoder"} if data.cfg.sites else {}  # a crosscoder's sites
    sae_cfg = SAEConfig.from_dict({"d_in": data.d_in, "d_sae": D_SAE_PER_D_IN * data.d_in, **sites, **settings.sae})
    if sae_cfg.d_in != data.d_in:
        raise ValueError(f"SAEConfig.d_in={sae_cfg.d_in} but the data {settings.data.source!r} has d_in={data.d_in}")
    train_cfg = settings.train.replace(progress=progress)
    settings = RunSettings(sae_cfg.to_dict(), settings.train, data.cfg, data.provenance.get("windows"))
    if grid.is_main:
        io.write_json(out / RUN_FILE, settings.to_dict())
    torch.manual_seed(train_cfg.seed)
    batches, kl = data.batches(train_cfg.schedule.total_steps), None
    if train_cfg.kl_coefficient > 0:  # KL + reconstruction: token windows and the model to splice into
        from .kl_data import kl_training, window_batches

        if grid.world_size > 1:
            raise ValueError("TrainConfig.kl_coefficient > 0 (--kl) trains in one process, not under torchrun")
        kl, windows = kl_training(data)
        batches = window_batches(windows, data.cfg.batch_size, train_cfg.schedule.total_steps, data.cfg.seed,
                                 next(kl.model.parameters()).device)
    if grid.world_size > 1:
        from ..train.distributed_training import DistributedTrainer, ShardedSAE, check_batch, save_final, slice_batches

        check_batch(settings.data.batch_size, grid)
        if data.cfg.kind != "store":  # every rank builds the global batch and keeps its part
            batches = slice_batches(batches, grid, device)
        model = ShardedSAE(sae_cfg, grid, device=device, seed=train_cfg.seed)
        result = DistributedTrainer(model, train_cfg, run_dir=out).fit(batches, resume=resume)
        sae = finish_sae(result.sae, data)
        save_final(sae, out / "sae")
    else:
        result = Trainer(SAE(sae_cfg, seed=train_cfg.seed), train_cfg, run_dir=out, kl=kl).fit(batches, resume=resume)
        sae = finish_sae(result.sae, data)
        sae.save(out / "sae")
    if grid.is_main:
        if result.history:
            print(json.dumps({k: v for k, v in result.history[-1].items() if v is not None}))
        print(f"run directory: {out.resolve()} (sae/, metrics.jsonl, checkpoints/)")
    return sae


def harvest_run(model: str, sites: list[str], out: str | Path, *, corpus: str = "english-classics",
                tokens: int = 262_144, context_size: int = 128, text_field: str = "text", seed: int = 0,
                batch_size: int = 8, dtype: str = "bfloat16", model_dtype: str = "float32", device: str | None = None,
                resume: bool = False, progress: bool = True):
    """Harvest tokens of corpus at sites of model into the store out (resume=True continues it); returns
    the ActivationStore. Under torchrun each rank harvests its range of the windows (harvest/parallel.py)."""
    from ..harvest import ActivationStore, check_harvest, harvest_corpus, is_store
    from ..model import load, resolve
    from ..ops.distributed import init_from_env, launched_by_torchrun, leave

    rank, world = 0, 1
    if launched_by_torchrun():
        import torch.distributed as dist

        rank_device = str(init_from_env())
        rank, world, device = dist.get_rank(), dist.get_world_size(), device or rank_device
    check_harvest(out, tokens, context_size, resume or rank != 0)  # before the model is loaded
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm, tokenizer = load(model, dtype=getattr(torch, model_dtype), device=device)
    for site in sites:
        resolve(lm, site)  # an unknown site raises before any corpus is read
    before = ActivationStore(out).tokens if resume and is_store(out) else 0
    start = time.perf_counter()
    store = harvest_corpus(lm, tokenizer, sites, corpus, out, tokens=tokens, context_size=context_size,
                           text_field=text_field, seed=seed, batch_size=batch_size, dtype=getattr(torch, dtype),
                           resume=resume, model_name=model, progress=progress and rank == 0, rank=rank,
                           world_size=world)
    seconds = time.perf_counter() - start
    if launched_by_torchrun():
        leave()  # every rank done: the process group goes
    if rank != 0:
        return store
    described = ", ".join(f"{s}: d={d}" for s, d in store.sites.items())
    if store.tokens == before:
        print(f"the store was already complete: {store.tokens:,} vectors per site ({described})")
    else:
        print(f"harvested {store.tokens - before:,} vectors per site ({described}) in {seconds:.1f} s: "
              f"{(store.tokens - before) / seconds:,.0f} tokens/s on {device} (BOS/EOS/pad positions not stored)")
    print(f"activation store: {store.path.resolve()}")
    return store


def main_job(out: str | Path = "runs/gemma", *, model: str = "gemma-3-270m", site: str = "resid_post.6",
             corpus: str = "english:train", tokens: int = 262_144, d_sae: int = 4096, k: int = 32,
             steps: int = 1000, batch_size: int = 1024, lr: float = 1e-3, eval_tokens: int = 4096,
             baselines: tuple[str, ...] = ("pca", "ica", "neurons", "random"), fit_tokens: int = 32_768,
             device: str | None = None, effects: int = 16, progress: bool = True) -> dict:
    """Harvest, train a TopK SAE, evaluate it against baselines, build the feature cache and browser; each
    step resumes where an interrupted run stopped. Returns the evaluation's results."""
    from ..analysis.features.features_run import build_and_browse
    from ..evaluation.eval_run import run_eval
    from ..harvest import is_store

    out = Path(out)
    start = time.perf_counter()
    print(f"[1/4] harvest {tokens:,} tokens of {corpus} from {model} at {site}")
    harvest_run(model, [site], out / "store", corpus=corpus, tokens=tokens, device=device,
                resume=is_store(out / "store"), progress=progress)
    print(f"[2/4] train a TopK SAE (d_sae {d_sae}, k {k}) for {steps} steps")
    settings = settings_from(
        sae={"activation": "topk", "k": k, "d_sae": d_sae},
        # AuxK revives latents dead for a quarter of the run: the default window (1M tokens) is the whole of a
        # 1,000-step run of 1,024, so its AuxK never started and 11% of the latents ended dead
        train={"total_steps": steps, "lr": lr, "auxk_coefficient": 1 / 32, "b_dec_init": "mean",
               "dead_window_tokens": max(batch_size, steps * batch_size // 4), "checkpoint_every": max(1, steps // 4)},
        data={"source": str(out / "store"), "batch_size": batch_size})
    train_run(out / "train", settings, resume=True, progress=progress)
    print(f"[3/4] evaluate on {eval_tokens:,} held-out tokens against the baselines: {', '.join(baselines) or 'none'}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = run_eval([out / "train" / "sae"], out / "eval", tokens=eval_tokens, baselines=tuple(baselines),
                       fit_tokens=fit_tokens, device=device, progress=progress)
    print(f"[4/4] feature cache (top contexts, histograms, logit effects; ablation and attribution for "
          f"{effects} features) and the feature browser")
    index, table = build_and_browse(out / "train" / "sae", out / "features", effects=effects, device=device,
                                    progress=progress)
    print("the five most interpretable-looking features (one-token score: the share of the top contexts' "
          "activation on one token):")
    print(table)
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min; outputs in {out.resolve()}/: store/ (activations),"
          f" train/sae/ (the SAE), train/metrics.jsonl, eval/metrics.json, eval/pareto.png, eval/density.png,"
          f" features/ (the feature cache)")
    print(f"feature browser: {index.resolve()}")
    return results
