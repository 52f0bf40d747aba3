"""The trainer: Adam, LR warm-up and decay, L1 warm-up, the unit-norm decoder, dead latents, checkpoints.

Trains on any iterable of activation batches (tensors of shape (..., d_in)).
The recipe follows Anthropic's April 2024 update (Adam, β = (0.9, 0.999), L1
coefficient warmed up over the first 5% of steps, LR decayed linearly to zero
over the last 20%), with the decoder kept on the unit sphere as in Bricken et
al. 2023 when `normalize_decoder` is set. Dead latents are revived by
resampling (Bricken et al. 2023) and/or AuxK (Gao et al. 2024).

With a run directory the trainer logs metrics as JSON lines
(`metrics.jsonl`), checkpoints every `checkpoint_every` steps, and
`resume=True` continues from the newest checkpoint so that the final weights
equal those of an uninterrupted run (bit-for-bit on CPU), provided the batches
are the same sequence (the trainer skips the ones already consumed).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import io
from ..sae import SAE
from . import checkpoint as ckpt
from .inputs import check_batch, init_b_dec_mean_
from .kl import SpliceKL
from .optim import SAEAdam
from .resample import resample_dead_latents
from .sinks import MetricSinks


@dataclass
class TrainConfig:
    lr: float = 4e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    # "fused": SAEAdam (Adam + decoder constraint in one pass; a Triton kernel on CUDA);
    # "torch": torch.optim.Adam with the constraint as separate steps (faster on CPU, where
    # fusing saves no memory traffic and torch's Adam is better tuned); "auto": fused on CUDA.
    optimizer: str = "auto"
    # Adam moments in bfloat16 halve the optimizer's memory (fused optimizer only).
    optimizer_state_dtype: str = "float32"
    # "bfloat16": bf16 activations and GEMMs, fp32 master weights, gradients and accumulation.
    mixed_precision: str | None = None
    # Fractions of the total steps (total_steps, or len(batches) when it has one).
    lr_warmup_fraction: float = 0.01
    lr_decay_fraction: float = 0.2
    l1_warmup_fraction: float = 0.05
    total_steps: int | None = None
    # A latent is dead when it has not fired on any of the last dead_window_tokens rows.
    dead_window_tokens: int = 1_000_000
    # Resampling: every resample_every steps, dead latents are re-initialised from a
    # pool of the last resample_pool rows (Anthropic resampled 4 times, every 25k steps).
    resample_every: int | None = None
    resample_pool: int = 16_384
    # AuxK (Gao et al. 2024; TopK/BatchTopK only): loss += auxk_coefficient · AuxK over the
    # top auxk_k dead latents. Gao et al. use 1/32 and k_aux = 512; None picks d_in // 2.
    auxk_coefficient: float = 0.0
    auxk_k: int | None = None
    # KL + reconstruction: loss += kl_coefficient · KL(clean || spliced) (needs Trainer(kl=SpliceKL(...))
    # and batches of token ids).
    kl_coefficient: float = 0.0
    # "mean": before the first step, b_dec = the first batch's mean (activations with a large
    # common offset, like a residual stream, otherwise spend the early steps learning it).
    b_dec_init: str = "zeros"
    log_every: int = 50
    tensorboard: bool = False  # also log to run_dir/tensorboard (needs tensorboard)
    wandb_project: str | None = None  # also log to wandb (needs wandb)
    checkpoint_every: int | None = None  # steps; needs a run directory
    keep_checkpoints: int = 2
    seed: int = 0  # the trainer's own generator (resampling draws)
    progress: bool = True

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        for name in ("lr_warmup_fraction", "lr_decay_fraction", "l1_warmup_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lr_warmup_fraction + self.lr_decay_fraction > 1.0:
            raise ValueError("TrainConfig.lr_warmup_fraction + lr_decay_fraction must be <= 1")
        for name in ("total_steps", "resample_every", "checkpoint_every", "auxk_k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1 or None, got {value}")
        for name in ("dead_window_tokens", "log_every", "resample_pool", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.optimizer not in ("auto", "fused", "torch"):
            raise ValueError(f"TrainConfig.optimizer must be 'auto', 'fused' or 'torch', got {self.optimizer!r}")
        if self.optimizer_state_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"TrainConfig.optimizer_state_dtype must be float32 or bfloat16, "
                             f"got {self.optimizer_state_dtype!r}")
        if self.optimizer_state_dtype != "float32" and self.optimizer == "torch":
            raise ValueError("TrainConfig.optimizer_state_dtype='bfloat16' needs the fused optimizer")
        if self.b_dec_init not in ("zeros", "mean"):
            raise ValueError(f"TrainConfig.b_dec_init must be 'zeros' or 'mean', got {self.b_dec_init!r}")
        if self.mixed_precision not in (None, "bfloat16"):
            raise ValueError(f"TrainConfig.mixed_precision must be None or 'bfloat16', got {self.mixed_precision!r}")
        for name in ("auxk_coefficient", "kl_coefficient"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        self.adam_betas = tuple(self.adam_betas)


@dataclass
class TrainResult:
    sae: SAE
    history: list[dict] = field(default_factory=list)
    run_dir: Path | None = None


def lr_scale(step: int, total_steps: int | None, cfg: TrainConfig) -> float:
    """Linear warm-up over the first lr_warmup_fraction, linear decay to 0 over the last lr_decay_fraction."""
    if total_steps is None:
        return 1.0
    warmup = math.ceil(cfg.lr_warmup_fraction * total_steps)
    decay = math.floor(cfg.lr_decay_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if decay and step >= total_steps - decay:
        return max(0.0, (total_steps - step) / decay)
    return 1.0


def l1_warmup(step: int, total_steps: int | None, cfg: TrainConfig) -> float:
    """The fraction of the full L1 coefficient in force at step (linear over l1_warmup_fraction)."""
    warmup = math.ceil(cfg.l1_warmup_fraction * total_steps) if total_steps else 0
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: Σ||x - x_hat||² / Σ||x - mean(x)||² over the rows of the batch."""
    x, x_hat = x.reshape(-1, x.shape[-1]).float(), x_hat.reshape(-1, x.shape[-1]).float()
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)


class Trainer:
    def __init__(self, sae: SAE, cfg: TrainConfig | None = None, run_dir: str | Path | None = None,
                 kl: SpliceKL | None = None):
        self.sae = sae
        self.cfg = cfg or TrainConfig()
        self.kl = kl
        if (self.cfg.kl_coefficient > 0) != (kl is not None):
            raise ValueError("TrainConfig.kl_coefficient > 0 and Trainer(kl=SpliceKL(...)) go together")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.cfg.checkpoint_every and self.run_dir is None:
            raise ValueError("TrainConfig.checkpoint_every needs a run_dir")
        if self.cfg.auxk_coefficient and sae.cfg.activation not in ("topk", "batchtopk"):
            raise ValueError(f"AuxK applies to topk/batchtopk SAEs, not activation={sae.cfg.activation!r}")
        if self.cfg.auxk_k is not None and self.cfg.auxk_k > sae.cfg.d_sae:
            raise ValueError(f"TrainConfig.auxk_k must be <= d_sae={sae.cfg.d_sae}, got {self.cfg.auxk_k}")
        self._caller_compute_dtype = sae.compute_dtype  # fit() gives it back: the caller's SAE ends as it began
        if self.cfg.mixed_precision:
            if sae.W_dec.dtype != torch.float32:
                raise ValueError(f"mixed precision keeps fp32 master weights; this SAE is {sae.W_dec.dtype}")
            sae.compute_dtype = getattr(torch, self.cfg.mixed_precision)
        self._train_compute_dtype = sae.compute_dtype
        fused = self.cfg.optimizer == "fused" or (self.cfg.optimizer == "auto" and sae.device.type == "cuda")
        self.fused = fused or self.cfg.optimizer_state_dtype != "float32"
        if self.fused:
            self.optimizer = SAEAdam(sae, lr=self.cfg.lr, betas=self.cfg.adam_betas,
                                     state_dtype=getattr(torch, self.cfg.optimizer_state_dtype))
        else:
            params = [p for p in sae.parameters() if p.requires_grad]
            self.optimizer = torch.optim.Adam(params, lr=self.cfg.lr, betas=self.cfg.adam_betas)
        self.generator = torch.Generator(device=sae.device).manual_seed(self.cfg.seed)
        self.step_count = 0
        self.total_steps: int | None = self.cfg.total_steps
        self.tokens_seen = 0
        # Rows since each latent last fired: a latent is dead past dead_window_tokens.
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=sae.device)
        # The last resample_pool input rows, for resampling.
        self.pool = torch.zeros(0, sae.cfg.d_in, dtype=sae.W_dec.dtype, device=sae.device)

    # ---- schedules ---------------------------------------------------------------------------------

    def lr_scale(self, step: int) -> float:
        return lr_scale(step, self.total_steps, self.cfg)

    def l1_coefficient(self, step: int) -> float:
        return self.sae.cfg.l1_coefficient * l1_warmup(step, self.total_steps, self.cfg)

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.cfg.dead_window_tokens

    def dead_fraction(self) -> float:
        """Fraction of latents that have not fired in the last dead_window_tokens rows (0 until a window has passed)."""
        if self.tokens_seen < self.cfg.dead_window_tokens:
            return 0.0
        return self.dead_mask().float().mean().item()

    # ---- one step ----------------------------------------------------------------------------------

    def step(self, batch: Tensor, metrics: bool = True) -> dict:
        """One optimizer step on a batch of activations (..., d_in), or of token ids (B, T) with a SpliceKL.

        metrics=False skips the logged metrics, each a host sync on a GPU: fit asks for them only on
        the steps it logs. "step" (and "resampled", on a resampling step) are always returned."""
        sae, cfg = self.sae, self.cfg
        sae.train()
        check_batch(batch, self.step_count)
        if self.step_count == 0 and cfg.b_dec_init == "mean" and self.kl is None:
            init_b_dec_mean_(sae, batch)
        if self.kl is not None:
            x, clean_logprobs = self.kl.clean(batch)
        else:
            x = batch
        x = x.to(sae.dtype)  # the compute dtype under mixed precision
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * self.lr_scale(self.step_count)
        use_auxk = cfg.auxk_coefficient > 0 and self.tokens_seen >= cfg.dead_window_tokens
        out = sae(x, dead_mask=self.dead_mask() if use_auxk else None, k_aux=cfg.auxk_k)
        l1_coef = self.l1_coefficient(self.step_count)
        loss = out.mse
        if out.l1 is not None:
            loss = loss + l1_coef * out.l1
        if out.auxk is not None:
            loss = loss + cfg.auxk_coefficient * out.auxk
        kl = None
        if self.kl is not None:
            kl = self.kl.kl(batch, out.x_hat, clean_logprobs)
            loss = loss + cfg.kl_coefficient * kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        constrain = sae.cfg.normalize_decoder and not self.fused  # SAEAdam does both inside its step
        if constrain:
            sae.remove_parallel_decoder_grad_()
        self.optimizer.step()
        if constrain:
            sae.normalize_decoder_()

        with torch.no_grad():
            rows = x.detach().reshape(-1, sae.cfg.d_in)
            self.tokens_since_fired += rows.shape[0]
            self.tokens_since_fired[out.latents.fire_counts() > 0] = 0
            self.tokens_seen += rows.shape[0]
            self.step_count += 1
            if cfg.resample_every:
                self.pool = torch.cat([self.pool, rows.to(self.pool.dtype)])[-cfg.resample_pool:]
            logged = {"step": self.step_count}
            if metrics:
                logged.update({
                    "tokens": self.tokens_seen,
                    "loss": loss.item(),
                    "mse": out.mse.item(),
                    "l1": None if out.l1 is None else out.l1.item(),
                    "auxk": None if out.auxk is None else out.auxk.item(),
                    "kl": None if kl is None else kl.item(),
                    "l1_coefficient": l1_coef,
                    "l0": out.latents.l0.float().mean().item(),
                    "fvu": fvu(x, out.x_hat).item(),
                    "dead_fraction": self.dead_fraction(),
                    "lr": self.optimizer.param_groups[0]["lr"],
                })
            if cfg.resample_every and self.step_count % cfg.resample_every == 0:
                dead = self.dead_mask()
                logged["resampled"] = resample_dead_latents(sae, dead, self.pool, self.optimizer, self.generator)
                self.tokens_since_fired[dead] = 0  # a fresh window to prove themselves
            return logged

    # ---- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        def write(tmp: Path) -> None:
            self.sae.save(tmp / "sae")
            tensors, meta = ckpt.optimizer_to_files(self.optimizer)
            io.write_tensors(tmp / "optimizer.safetensors", tensors)
            io.write_json(tmp / "optimizer.json", meta)
            state = {"tokens_since_fired": self.tokens_since_fired, "pool": self.pool,
                     "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state()}
            if torch.cuda.is_available():
                state["cuda_rng"] = torch.cuda.get_rng_state()
            io.write_tensors(tmp / "trainer.safetensors", state)
            io.write_json(tmp / "trainer.json", {"step": self.step_count, "tokens": self.tokens_seen,
                                                 "total_steps": self.total_steps, "config": asdict(self.cfg)})

        return ckpt.write_checkpoint(self.run_dir, self.step_count, write, keep=self.cfg.keep_checkpoints)

    def load_checkpoint(self, path: Path) -> None:
        """Every file is read and checked before anything of this trainer or its SAE changes."""
        sae = SAE.load(path / "sae", device=self.sae.device)
        if sae.cfg != self.sae.cfg:
            raise ValueError(f"{path}: checkpoint SAE config {sae.cfg} differs from this run's {self.sae.cfg}")
        optimizer_state, kind = ckpt.read_optimizer(path, self.sae.device)
        if kind != ("fused" if self.fused else "torch"):
            raise ValueError(f"{path}: the checkpoint's optimizer is {kind!r}, this run's TrainConfig.optimizer "
                             f"gives {'fused' if self.fused else 'torch'!r}: resume with optimizer={kind!r}")
        state = ckpt.read_trainer_state(path)
        meta = ckpt.read_trainer_meta(path)
        with torch.no_grad():
            mine = self.sae.state_dict()
            for name, t in sae.state_dict().items():
                mine[name].copy_(t)
        self.optimizer.load_state_dict(optimizer_state)
        self.step_count, self.tokens_seen, self.total_steps = meta["step"], meta["tokens"], meta["total_steps"]
        self.tokens_since_fired = state["tokens_since_fired"].to(self.sae.device)
        self.pool = state["pool"].to(self.sae.device)
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])

    def resume(self) -> bool:
        """Load the newest intact checkpoint of run_dir, if any (a damaged newer one is skipped with a
        warning); drop metrics logged after it."""
        path = ckpt.resume_checkpoint(self.run_dir) if self.run_dir else None
        if path is None:
            return False
        self.load_checkpoint(path)
        ckpt.truncate_metrics(self.run_dir / "metrics.jsonl", self.step_count)
        return True

    # ---- the loop ----------------------------------------------------------------------------------

    def fit(self, batches: Iterable[Tensor], resume: bool = False) -> TrainResult:
        """Train on batches. With a run directory, fit holds its writer lock (a second writer gets an error
        naming this one) and first removes what killed writers left half-written there."""
        self.sae.compute_dtype = self._train_compute_dtype
        try:
            if self.run_dir is None:
                return self._fit(batches, resume)
            with io.DirectoryLock(self.run_dir, "training"):
                ckpt.remove_stale_temporaries(self.run_dir)
                return self._fit(batches, resume)
        finally:
            self.sae.compute_dtype = self._caller_compute_dtype

    def _fit(self, batches: Iterable[Tensor], resume: bool) -> TrainResult:
        if resume and not self.resume():
            print(f"no checkpoint in {self.run_dir}: starting from step 0")
        if self.total_steps is None and hasattr(batches, "__len__"):
            self.total_steps = len(batches)
        history: list[dict] = []
        if self.run_dir:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        sinks = MetricSinks(self.run_dir, self.cfg.tensorboard, self.cfg.wandb_project, asdict(self.cfg))
        start, start_tokens = time.perf_counter(), self.tokens_seen
        bar = tqdm(total=self.total_steps, initial=self.step_count, disable=not self.cfg.progress,
                   desc="train", unit="step")
        try:
            for x in itertools.islice(batches, self.step_count, None):  # skip what a resumed run consumed
                if self.total_steps is not None and self.step_count >= self.total_steps:
                    break
                upcoming = self.step_count + 1
                last = self.total_steps is not None and upcoming == self.total_steps
                resampling = bool(self.cfg.resample_every) and upcoming % self.cfg.resample_every == 0
                log_now = upcoming % self.cfg.log_every == 0 or last or resampling
                metrics = self.step(x, metrics=log_now)
                bar.update(1)
                if log_now:
                    metrics["tokens_per_s"] = (self.tokens_seen - start_tokens) / (time.perf_counter() - start)
                    history.append(metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4g}", l0=f"{metrics['l0']:.1f}",
                                    fvu=f"{metrics['fvu']:.3f}", dead=f"{metrics['dead_fraction']:.2f}")
                    sinks.write(metrics)
                if self.cfg.checkpoint_every and (self.step_count % self.cfg.checkpoint_every == 0 or last):
                    self.save_checkpoint()
        finally:
            bar.close()
            sinks.close()
        return TrainResult(self.sae, history, self.run_dir)


def train(sae: SAE, batches: Iterable[Tensor], cfg: TrainConfig | None = None,
          run_dir: str | Path | None = None, resume: bool = False) -> TrainResult:
    """Train sae on batches; returns the trained SAE and its metrics history."""
    return Trainer(sae, cfg, run_dir).fit(batches, resume=resume)
