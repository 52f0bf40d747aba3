"""The trainer: Adam, LR warm-up and decay, L1 warm-up, the unit-norm decoder, dead latents, checkpoints.

Trains on any iterable of activation batches (tensors of shape (..., d_in)).
The recipe follows Anthropic's April 2024 update (Adam, β = (0.9, 0.999), L1
coefficient warmed up over the first 5% of steps, LR decayed linearly to zero
over the last 20%), with the decoder kept on the unit sphere as in Bricken et
al. 2023 when `normalize_decoder` is set. Dead latents are revived by
resampling (Bricken et al. 2023) and/or AuxK (Gao et al. 2024). The loss is
`fastsae.losses.loss_terms`, the same function `SAE.forward` reports.

With a run directory the trainer logs metrics as JSON lines
(`metrics.jsonl`), checkpoints every `checkpoints.every` steps, and
`resume=True` continues from the newest checkpoint so that the final weights
equal those of an uninterrupted run (bit-for-bit on CPU), provided the batches
are the same sequence (the trainer skips the ones already consumed).

Nothing ends silently. A non-finite loss stops the run with `TrainingDivergedError`
(before the step's update, so the SAE holds the weights of the last finite step and no
checkpoint is written over); batches that yield nothing raise `ValueError`; batches that
run out before `total_steps` warn (the LR decay planned for the end never ran). A
resumed run takes `ScheduleConfig.total_steps` when it is given, so a larger total
extends the run (see `Trainer.load_checkpoint`).
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import io
from ..losses import LossCoefficients, fvu
from ..sae import SAE, SAEOutput
from . import checkpoint as ckpt
from .checkpoint_loading import is_sharded_checkpoint, load_single_process_state, load_training_state
from .inputs import check_transcoder_training, freeze_b_dec, init_b_dec_mean_, split_batch
from .kl import SpliceKL
from .optim import SAEAdam, build_optimizer
from .resample import resample_dead_latents
from .schedules import l1_warmup, lr_scale, record_batch_threshold_, resumed_total_steps
from .sinks import MetricSinks
from .train_config import FORMAT_VERSION, TrainConfig

# The logged metrics, in this order.
_METRICS = ("step", "tokens", "loss", "mse", "l1", "auxk", "kl", "l1_coefficient", "l0", "fvu", "dead_fraction", "lr")


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or Inf (a learning rate too large, activations too large for the
    dtype): raised before that step's update, naming the step and the newest checkpoint. The message ends
    with what to try."""

    def __init__(self, what: str, step: int, checkpoint: Path | None, lr: float, members: list | None = None):
        super().__init__(f"training diverged: {what}. Lower OptimizerConfig.lr (now {lr:g}) or scale the "
                         f"activations (a store's normalize=True)")
        self.step = step  # the step whose loss was not finite (1-based, as logged)
        self.checkpoint = checkpoint  # the newest checkpoint of the run, None when there is none
        self.members = members  # train_ensemble: every member's SAE after the last finite step


@dataclass
class TrainResult:
    sae: SAE
    history: list[dict] = field(default_factory=list)
    run_dir: Path | None = None


class Trainer:
    """The loop's seams: the optimizer is built in `build_optimizer`, one step is `step(batch)`, batches come
    from any iterable, and the state a resume needs is in `save_checkpoint` / `load_checkpoint`."""

    def __init__(self, sae: SAE, cfg: TrainConfig | None = None, run_dir: str | Path | None = None,
                 kl: SpliceKL | None = None):
        self.sae = sae
        self.cfg = cfg or TrainConfig()
        if not isinstance(self.cfg, TrainConfig):
            raise TypeError(f"cfg must be a fastsae.train.TrainConfig, got {type(self.cfg).__name__}")
        self.kl = kl
        if (self.cfg.kl_coefficient > 0) != (kl is not None):
            raise ValueError("TrainConfig.kl_coefficient > 0 and Trainer(kl=SpliceKL(...)) go together")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        check_transcoder_training(sae, self.cfg.dead_latents.resampling, kl)
        freeze_b_dec(sae, self.cfg.b_dec_init)
        if self.cfg.checkpoints.every and self.run_dir is None:
            raise ValueError("CheckpointConfig.every needs a run_dir")
        if self.cfg.dead_latents.auxk_coefficient and sae.cfg.activation not in ("topk", "batchtopk"):
            raise ValueError(f"AuxK (DeadLatentConfig.auxk_coefficient) applies to topk/batchtopk SAEs, not "
                             f"activation={sae.cfg.activation!r}")
        if self.cfg.dead_latents.auxk_k is not None and self.cfg.dead_latents.auxk_k > sae.cfg.d_sae:
            raise ValueError(f"DeadLatentConfig.auxk_k must be <= d_sae={sae.cfg.d_sae}, got "
                             f"{self.cfg.dead_latents.auxk_k}")
        self._caller_compute_dtype = sae.compute_dtype  # fit() gives it back: the caller's SAE ends as it began
        if self.cfg.optimizer.mixed_precision:
            if sae.W_dec.dtype != torch.float32:
                raise ValueError(f"mixed precision keeps fp32 master weights; this SAE is {sae.W_dec.dtype}")
            sae.compute_dtype = getattr(torch, self.cfg.optimizer.mixed_precision)
        self._train_compute_dtype = sae.compute_dtype
        self.optimizer = build_optimizer(sae, self.cfg.optimizer)
        # SAEAdam keeps the decoder on the sphere inside its step; torch's Adam needs the two passes around it.
        self.fused = isinstance(self.optimizer, SAEAdam)
        self.generator = torch.Generator(device=sae.device).manual_seed(self.cfg.seed)
        # Rank 0 of a distributed run (train/distributed_training.py) writes metrics and shows progress.
        self.is_main = True
        self.step_count = 0
        self.total_steps: int | None = self.cfg.schedule.total_steps
        self.tokens_seen = 0
        # Rows since each latent last fired: a latent is dead past dead_latents.window_tokens.
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=sae.device)
        # The last resample_pool input rows, for resampling.
        self.pool = torch.zeros(0, sae.cfg.d_in, dtype=sae.W_dec.dtype, device=sae.device)

    # ---- schedules ---------------------------------------------------------------------------------

    def lr_scale(self, step: int) -> float:
        return lr_scale(step, self.total_steps, self.cfg.schedule)

    def l1_coefficient(self, step: int) -> float:
        return self.sae.cfg.l1_coefficient * l1_warmup(step, self.total_steps, self.cfg.schedule)

    def coefficients(self, step: int) -> LossCoefficients:
        """The loss's weights at step (the L1 coefficient warmed up)."""
        return LossCoefficients(l1=self.l1_coefficient(step), auxk=self.cfg.dead_latents.auxk_coefficient,
                                kl=self.cfg.kl_coefficient)

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.cfg.dead_latents.window_tokens

    def dead_fraction(self) -> float:
        """Fraction of latents that have not fired in the last window_tokens rows (0 until a window has passed)."""
        if self.tokens_seen < self.cfg.dead_latents.window_tokens:
            return 0.0
        return self.dead_mask().float().mean().item()

    # ---- one step ----------------------------------------------------------------------------------

    def step(self, batch: Tensor, metrics: bool = True) -> dict:
        """One optimizer step on a batch of activations (..., d_in), an (x, y) pair of them for a transcoder, or
        of token ids (B, T) with a SpliceKL.

        metrics=False skips the logged metrics, each a host sync on a GPU: fit asks for them only on
        the steps it logs. "step" (and "resampled", on a resampling step) are always returned."""
        sae, dead_cfg = self.sae, self.cfg.dead_latents
        sae.train()
        batch, target = split_batch(sae, batch, self.step_count)  # target: a transcoder's y (b_dec is its bias)
        b_dec_before = None  # given back if the first step diverges: the caller's SAE ends as it began
        if self.step_count == 0 and self.cfg.b_dec_init == "mean" and self.kl is None:
            b_dec_before = sae.b_dec.detach().clone()
            init_b_dec_mean_(sae, batch if target is None else target, self._rows_mean)
        x, kl = self._inputs(batch)
        y = {} if target is None else {"target": target.to(sae.dtype)}  # an SAE (kind "sae") takes no target
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.optimizer.lr * self.lr_scale(self.step_count)
        use_auxk = dead_cfg.auxk_coefficient > 0 and self.tokens_seen >= dead_cfg.window_tokens
        coefficients = self.coefficients(self.step_count)
        out = sae(x, **y, dead_mask=self.dead_mask() if use_auxk else None, k_aux=dead_cfg.auxk_k,
                  coefficients=coefficients, kl=kl)
        if sae.check_finite and not torch.isfinite(out.loss):  # one host sync, as the input check is
            if b_dec_before is not None:
                with torch.no_grad():
                    sae.b_dec.copy_(b_dec_before)
            self._diverged(out.loss.item())
        self._update(out)
        with torch.no_grad():
            rows = x.detach().reshape(-1, sae.cfg.d_in)
            self.tokens_since_fired += self._global_rows(rows.shape[0])
            self.tokens_since_fired[self._fired(out.latents)] = 0
            self.tokens_seen += self._global_rows(rows.shape[0])
            self.step_count += 1
            if dead_cfg.resampling:
                self.pool = torch.cat([self.pool, self._pool_rows(rows).to(self.pool.dtype)])[-dead_cfg.resample_pool:]
            logged = self._metrics(y.get("target", x), out, coefficients) if metrics else {"step": self.step_count}
            if dead_cfg.resamples_at(self.step_count):
                dead = self.dead_mask()
                logged["resampled"] = self._resample(dead)
                self.tokens_since_fired[dead] = 0  # a fresh window to prove themselves
            return logged

    def _inputs(self, batch: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor] | None]:
        """The SAE's input in its compute dtype, and the KL term as a function of x_hat (None without a
        SpliceKL, whose batch is token ids: its input is the clean model's activation at the site)."""
        if self.kl is None:
            return batch.to(self.sae.dtype), None
        x, kl = self.kl.inputs(batch)  # the rows of the kept (not BOS/pad) positions
        return x.to(self.sae.dtype), kl

    def _update(self, out: SAEOutput) -> None:
        """Backward and the optimizer's step (with the decoder constraint around it unless SAEAdam does it),
        and BatchTopK's batch threshold folded into its inference threshold."""
        sae = self.sae
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self._after_backward()
        constrain = sae.cfg.normalize_decoder and not self.fused  # SAEAdam does both inside its step
        if constrain:
            sae.remove_parallel_decoder_grad_()
        self.optimizer.step()
        if constrain:
            sae.normalize_decoder_()
        if sae.cfg.activation == "jumprelu" and sae.threshold.requires_grad:
            # θ trained directly, kept >= 0 by projection (SAELens's choice: a log-threshold moves multiplicatively,
            # so Adam's ~lr steps barely shift a small θ, SAELens issue #494); θ 0 is a ReLU, θ < 0 would pass
            # negative pre-activations
            sae.threshold.data.clamp_(min=0.0)
        if out.threshold is not None:
            record_batch_threshold_(sae.threshold, out.threshold)

    def _metrics(self, x: Tensor, out: SAEOutput, coefficients: LossCoefficients) -> dict:
        """The logged metrics of the step just taken (_METRICS, in that order)."""
        means = self._batch_means({"loss": out.loss, "mse": out.mse, "l1": out.l1, "auxk": out.auxk,
                                   "kl": out.kl, "l0": out.latents.l0.float().mean()})
        logged = {
            "step": self.step_count,
            "tokens": self.tokens_seen,
            **{name: None if t is None else t.item() for name, t in means.items()},
            "l1_coefficient": coefficients.l1,
            "fvu": self._fvu(x, out.x_hat),
            "dead_fraction": self.dead_fraction(),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        return {key: logged[key] for key in _METRICS}

    def _diverged(self, loss: float, what: str | None = None) -> None:
        """Stop: the loss of the coming step is not finite (nothing of that step has been applied), or what
        else says so."""
        step = self.step_count + 1 if what is None else self.step_count
        what = what or f"the loss at step {step} is {loss} (not finite); the SAE holds the weights after step " \
                        f"{self.step_count}"
        newest = ckpt.latest_checkpoint(self.run_dir) if self.run_dir is not None else None
        where = f"the newest checkpoint is {newest} (left as it was)" if newest else "no checkpoint was written"
        raise TrainingDivergedError(f"{what}; {where}", step, newest, self.cfg.optimizer.lr)

    # ---- seams: train/distributed_training.py's DistributedTrainer overrides these for several ranks -

    def _after_backward(self) -> None:
        """Gradients are complete (data parallel: averaged over the ranks)."""

    def _global_rows(self, rows: int) -> int:
        """Rows of the step over every rank, from this rank's."""
        return rows

    def _fired(self, latents) -> Tensor:
        """(latents this trainer counts,) bool: which fired on the step's batch (on any rank)."""
        return latents.fire_counts() > 0

    def _rows_mean(self, rows: Tensor) -> Tensor:
        """(d_in,) float64 mean of the step's rows (on every rank)."""
        return rows.double().mean(0)

    def _pool_rows(self, rows: Tensor) -> Tensor:
        """The step's rows as the resampling pool keeps them (every rank's, in batch order)."""
        return rows

    def _batch_means(self, values: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        """Per-row means of this rank's batch → over the whole batch."""
        return values

    def _fvu(self, x: Tensor, x_hat: Tensor) -> float:
        return fvu(x, x_hat)

    def _resample(self, dead: Tensor) -> int:
        return resample_dead_latents(self.sae, dead, self.pool, self.optimizer, self.generator)

    def _checkpoint_sae(self) -> SAE:
        """The SAE a checkpoint holds."""
        return self.sae

    # ---- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write the trainer's state as the checkpoint of this step; weights that are no longer finite (a
        finite loss, then an update too large for the dtype) raise TrainingDivergedError instead, so the
        newest checkpoint stays the last one worth resuming from."""
        if not all(bool(torch.isfinite(p).all()) for p in self.sae.parameters()):
            self._diverged(math.nan, f"the SAE's weights after step {self.step_count} are not finite")

        def write(tmp: Path) -> None:
            self._checkpoint_sae().save(tmp / "sae")
            tensors, meta = ckpt.optimizer_to_files(self.optimizer)
            io.write_tensors(tmp / "optimizer.safetensors", tensors)
            io.write_json(tmp / "optimizer.json", meta)
            state = {"tokens_since_fired": self.tokens_since_fired, "pool": self.pool,
                     "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state()}
            if torch.cuda.is_available():
                state["cuda_rng"] = torch.cuda.get_rng_state()
            io.write_tensors(tmp / "trainer.safetensors", state)
            io.write_json(tmp / "trainer.json", {"format_version": FORMAT_VERSION, "step": self.step_count,
                                                 "tokens": self.tokens_seen, "total_steps": self.total_steps,
                                                 "config": self.cfg.to_dict()})

        return ckpt.write_checkpoint(self.run_dir, self.step_count, write, keep=self.cfg.checkpoints.keep)

    def load_checkpoint(self, path: Path) -> None:
        """Every file is read and checked before anything of this trainer or its SAE changes."""
        if is_sharded_checkpoint(path):  # latents split over ranks (train/distributed_training.py): read whole
            return load_training_state(self, path)
        load_single_process_state(self, path)

    def resumed_total_steps(self, step: int, saved_total: int | None, path: Path) -> int | None:
        return resumed_total_steps(self.cfg.schedule.total_steps, step, saved_total, path)

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
            if self.run_dir is None or not self.is_main:  # only the writing rank holds the run's lock
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
        log, every = self.cfg.logging, self.cfg.checkpoints.every
        sinks = MetricSinks(self.run_dir, log.tensorboard, log.wandb_project, self.cfg.to_dict()) if self.is_main \
            else MetricSinks(None)
        start, start_step, start_tokens = time.perf_counter(), self.step_count, self.tokens_seen
        bar = tqdm(total=self.total_steps, initial=self.step_count, disable=not log.progress or not self.is_main,
                   desc="train", unit="step")
        try:
            for x in itertools.islice(batches, self.step_count, None):  # skip what a resumed run consumed
                if self.total_steps is not None and self.step_count >= self.total_steps:
                    break
                upcoming = self.step_count + 1
                last = self.total_steps is not None and upcoming == self.total_steps
                resampling = self.cfg.dead_latents.resamples_at(upcoming)
                log_now = upcoming % log.log_every == 0 or last or resampling
                metrics = self.step(x, metrics=log_now)
                bar.update(1)
                if log_now:
                    metrics["tokens_per_s"] = (self.tokens_seen - start_tokens) / (time.perf_counter() - start)
                    history.append(metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4g}", l0=f"{metrics['l0']:.1f}",
                                    fvu=f"{metrics['fvu']:.3f}", dead=f"{metrics['dead_fraction']:.2f}")
                    sinks.write(metrics)
                if every and (self.step_count % every == 0 or last):
                    self.save_checkpoint()
        finally:
            bar.close()
            sinks.close()
        self._say_how_it_ended(start_step)
        return TrainResult(self.sae, history, self.run_dir)

    def _say_how_it_ended(self, start_step: int) -> None:
        """A run that took no step at all is an error (nothing was trained: the batches were empty, or a
        resumed run's batches ended before its checkpoint); one whose batches ran out before total_steps
        warns, since its trained SAE is usable but the LR decay planned for the end never ran."""
        total, taken = self.total_steps, self.step_count - start_step
        if total is not None and self.step_count >= total and self.step_count > 0:
            return  # complete (a finished run resumed takes no step, rightly)
        if taken == 0:
            skipped = f" after skipping the {start_step} a resumed run had consumed" if start_step else ""
            raise ValueError(f"batches yielded no batch{skipped}: no training step was taken (expected "
                             f"{f'{total} batches' if total else 'at least one batch'})")
        if total is not None:
            warnings.warn(f"batches ran out after step {self.step_count} of total_steps={total}: the run stopped "
                          f"early, and the LR schedule planned for {total} steps never reached its decay",
                          RuntimeWarning, stacklevel=3)


def train(sae: SAE, batches: Iterable[Tensor], cfg: TrainConfig | None = None,
          run_dir: str | Path | None = None, resume: bool = False) -> TrainResult:
    """Train sae on batches; returns the trained SAE and its metrics history."""
    return Trainer(sae, cfg, run_dir).fit(batches, resume=resume)
