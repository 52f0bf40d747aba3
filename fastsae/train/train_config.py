"""Training settings, one small flat dataclass per concern, each checked when it is made.

    TrainConfig
      optimizer     OptimizerConfig    lr, betas, which Adam, its state dtype, mixed precision
      schedule      ScheduleConfig     total steps, LR warm-up/decay, L1 warm-up
      dead_latents  DeadLatentConfig   the dead window, resampling, AuxK
      logging       LoggingConfig      metric cadence and sinks, the progress bar
      checkpoints   CheckpointConfig   how often, how many kept
      kl_coefficient, b_dec_init, seed

`TrainConfig.flat(lr=..., total_steps=..., ...)` builds one from the flat names the
earlier single TrainConfig used (each routed to its concern), and `TrainConfig.from_dict`
reads both a saved nested config and the flat one older runs wrote (format version 1).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

FORMAT_VERSION = 2  # 1: one flat dict of 23 fields (before the split by concern)


def _check(cls: str, name: str, ok: bool, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"{cls}.{name} must be {expected}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_or_none(cls: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(cls, name, value is None or (_is_int(value) and value >= 1), "an int >= 1 or None", value)


def _positive(cls: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(cls, name, _is_int(value) and value >= 1, "an int >= 1", value)


def _non_negative(cls: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        ok = _is_number(value) and 0.0 <= value < math.inf
        _check(cls, name, ok, "a finite number >= 0", value)


@dataclass
class OptimizerConfig:
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.999)
    # "fused": SAEAdam (Adam + decoder constraint in one pass, dispatched by fastsae.ops: a Triton kernel
    # on CUDA); "torch": torch.optim.Adam with the constraint as separate steps (on CPU torch's fused
    # single-pass Adam, `fused=True`, ~10x its default loop; faster there than SAEAdam's PyTorch ops);
    # "auto": fused on CUDA, torch elsewhere.
    kind: str = "auto"
    # Adam moments in bfloat16 halve the optimizer's memory (fused optimizer only).
    state_dtype: str = "float32"
    # "bfloat16": bf16 activations and GEMMs, fp32 master weights, gradients and accumulation.
    mixed_precision: str | None = None

    def __post_init__(self):
        c = "OptimizerConfig"
        _check(c, "lr", _is_number(self.lr) and 0 < self.lr < math.inf, "a finite number > 0", self.lr)
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else self.betas
        _check(c, "betas", isinstance(betas, tuple) and len(betas) == 2 and all(
            _is_number(b) and 0 <= b < 1 for b in betas), "two numbers in [0, 1)", self.betas)
        self.betas = betas
        _check(c, "kind", self.kind in ("auto", "fused", "torch"), "'auto', 'fused' or 'torch'", self.kind)
        _check(c, "state_dtype", self.state_dtype in ("float32", "bfloat16"), "'float32' or 'bfloat16'",
               self.state_dtype)
        if self.state_dtype != "float32" and self.kind == "torch":
            raise ValueError("OptimizerConfig.state_dtype='bfloat16' needs the fused optimizer (kind='fused' or "
                             "'auto'), not kind='torch'")
        _check(c, "mixed_precision", self.mixed_precision in (None, "bfloat16"), "None or 'bfloat16'",
               self.mixed_precision)


@dataclass
class ScheduleConfig:
    # The run's length; None takes len(batches) when the batches have one.
    total_steps: int | None = None
    # Fractions of the total steps: LR warm-up from 0, LR decay to 0 at the end (Anthropic, April 2024:
    # 5% L1 warm-up, the last 20% decayed), L1 coefficient warm-up.
    lr_warmup_fraction: float = 0.01
    lr_decay_fraction: float = 0.2
    l1_warmup_fraction: float = 0.05

    def __post_init__(self):
        c = "ScheduleConfig"
        _positive_or_none(c, self, "total_steps")
        for name in ("lr_warmup_fraction", "lr_decay_fraction", "l1_warmup_fraction"):
            value = getattr(self, name)
            _check(c, name, _is_number(value) and 0.0 <= value <= 1.0, "a number in [0, 1]", value)
        if self.lr_warmup_fraction + self.lr_decay_fraction > 1.0:
            raise ValueError(f"ScheduleConfig.lr_warmup_fraction + lr_decay_fraction must be <= 1, got "
                             f"{self.lr_warmup_fraction} + {self.lr_decay_fraction}")


# Towards Monosemanticity (Bricken et al. 2023), "Neuron Resampling": resample at 25k, 50k, 75k and 100k steps;
# a neuron is dead when it has not fired in the previous 12.5k steps. The paper names these points, not the length
# of the run they sit in (its A/1 dictionary saw 8B activations, far more steps). We take the schedule as a run of
# 125k steps: after the last resample, as long a stretch without one as between two resamples. Scaled to a run of
# N steps: resamples at 20/40/60/80 % of N, a dead window of 10 % of N, none in the last 20 % (where the trainer
# decays the LR, ScheduleConfig.lr_decay_fraction). DeadLatentConfig.preset(paper_steps=...) takes another length.
ANTHROPIC_RESAMPLE_STEPS = (25_000, 50_000, 75_000, 100_000)
ANTHROPIC_DEAD_STEPS = 12_500
ANTHROPIC_PAPER_STEPS = 125_000


def _scaled(paper_step: int, steps: int, paper_steps: int) -> int:
    """paper_step of a paper_steps-long run, at the same fraction of a steps-long one, rounded down (so no
    resample falls later in the run than the paper's did)."""
    return paper_step * steps // paper_steps


@dataclass
class DeadLatentConfig:
    # A latent is dead when it has not fired on any of the last window_tokens rows.
    window_tokens: int = 1_000_000
    # Resampling: every resample_every steps, dead latents are re-initialised from a pool of the last
    # resample_pool rows (Anthropic resampled 4 times, every 25k steps).
    resample_every: int | None = None
    resample_pool: int = 16_384
    # Or resample after exactly these steps (1-based step counts, ascending), as preset("anthropic", ...) sets.
    resample_at: tuple[int, ...] | None = None
    # AuxK (Gao et al. 2024; TopK/BatchTopK only): loss += auxk_coefficient · AuxK over the top auxk_k
    # dead latents. Gao et al. use 1/32 and k_aux = 512; None picks d_in // 2.
    auxk_coefficient: float = 0.0
    auxk_k: int | None = None

    def __post_init__(self):
        c = "DeadLatentConfig"
        _positive(c, self, "window_tokens", "resample_pool")
        _positive_or_none(c, self, "resample_every", "auxk_k")
        _non_negative(c, self, "auxk_coefficient")
        if self.resample_at is not None:
            at = tuple(self.resample_at) if isinstance(self.resample_at, (list, tuple)) else self.resample_at
            _check(c, "resample_at", isinstance(at, tuple) and len(at) > 0 and all(_is_int(s) and s >= 1 for s in at)
                   and list(at) == sorted(set(at)), "None or ascending distinct ints >= 1", self.resample_at)
            self.resample_at = at
            if self.resample_every is not None:
                raise ValueError("DeadLatentConfig: give resample_every or resample_at, not both")

    @property
    def resampling(self) -> bool:
        return bool(self.resample_every) or self.resample_at is not None

    def resamples_at(self, step: int) -> bool:
        """Whether dead latents are resampled once step steps (1-based) have been taken."""
        if self.resample_at is not None:
            return step in self.resample_at
        return bool(self.resample_every) and step % self.resample_every == 0

    @classmethod
    def preset(cls, name: str, *, steps: int, batch_size: int, paper_steps: int = ANTHROPIC_PAPER_STEPS,
               **settings) -> DeadLatentConfig:
        """name "anthropic": Towards Monosemanticity's schedule scaled from paper_steps to a run of steps steps
        of batch_size rows (see ANTHROPIC_PAPER_STEPS): resample_at the four scaled points, window_tokens the
        scaled 12.5k steps times batch_size. settings: the other fields (resample_pool, auxk_...)."""
        if name != "anthropic":
            raise ValueError(f"DeadLatentConfig.preset: name must be 'anthropic', got {name!r}")
        for arg, value in (("steps", steps), ("batch_size", batch_size), ("paper_steps", paper_steps)):
            _check("DeadLatentConfig.preset", arg, _is_int(value) and value >= 1, "an int >= 1", value)
        at = tuple(_scaled(s, steps, paper_steps) for s in ANTHROPIC_RESAMPLE_STEPS)
        if at[0] < 1 or len(set(at)) < len(at) or at[-1] >= steps:
            raise ValueError(f"DeadLatentConfig.preset('anthropic'): steps={steps} is too short to place "
                             f"{len(at)} distinct resamples before its end (scaled: {list(at)})")
        window = max(1, _scaled(ANTHROPIC_DEAD_STEPS, steps, paper_steps))
        return cls(window_tokens=window * batch_size, resample_at=at, **settings)


@dataclass
class LoggingConfig:
    log_every: int = 50  # steps between logged metrics (each a host sync on a GPU)
    tensorboard: bool = False  # also log to run_dir/tensorboard (needs tensorboard)
    wandb_project: str | None = None  # also log to wandb (needs wandb)
    progress: bool = True  # a tqdm bar

    def __post_init__(self):
        _positive("LoggingConfig", self, "log_every")


@dataclass
class CheckpointConfig:
    every: int | None = None  # steps; needs a run directory
    keep: int = 2  # the newest complete checkpoints kept

    def __post_init__(self):
        _positive_or_none("CheckpointConfig", self, "every")
        _positive("CheckpointConfig", self, "keep")


_PARTS = {"optimizer": OptimizerConfig, "schedule": ScheduleConfig, "dead_latents": DeadLatentConfig,
          "logging": LoggingConfig, "checkpoints": CheckpointConfig}

# The flat names of format version 1 (and of TrainConfig.flat) -> (part or None for TrainConfig's own, field)
FLAT_NAMES: dict[str, tuple[str | None, str]] = {
    "lr": ("optimizer", "lr"), "adam_betas": ("optimizer", "betas"), "optimizer": ("optimizer", "kind"),
    "optimizer_state_dtype": ("optimizer", "state_dtype"), "mixed_precision": ("optimizer", "mixed_precision"),
    "total_steps": ("schedule", "total_steps"), "lr_warmup_fraction": ("schedule", "lr_warmup_fraction"),
    "lr_decay_fraction": ("schedule", "lr_decay_fraction"), "l1_warmup_fraction": ("schedule", "l1_warmup_fraction"),
    "dead_window_tokens": ("dead_latents", "window_tokens"), "resample_every": ("dead_latents", "resample_every"),
    "resample_pool": ("dead_latents", "resample_pool"),
    "resample_at": ("dead_latents", "resample_at"), "auxk_coefficient": ("dead_latents", "auxk_coefficient"),
    "auxk_k": ("dead_latents", "auxk_k"), "log_every": ("logging", "log_every"),
    "tensorboard": ("logging", "tensorboard"), "wandb_project": ("logging", "wandb_project"),
    "progress": ("logging", "progress"), "checkpoint_every": ("checkpoints", "every"),
    "keep_checkpoints": ("checkpoints", "keep"), "kl_coefficient": (None, "kl_coefficient"),
    "b_dec_init": (None, "b_dec_init"), "seed": (None, "seed"),
}


@dataclass
class TrainConfig:
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    dead_latents: DeadLatentConfig = field(default_factory=DeadLatentConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    # KL + reconstruction: loss += kl_coefficient · KL(clean || spliced) (needs Trainer(kl=SpliceKL(...))
    # and batches of token ids).
    kl_coefficient: float = 0.0
    # "mean": before the first step, b_dec = the first batch's mean (activations with a large common
    # offset, like a residual stream, otherwise spend the early steps learning it). "none": no decoder bias,
    # b_dec stays 0 and is not trained (Cunningham et al. 2023's tied SAE, with SAEConfig tied=True and
    # apply_b_dec_to_input=False).
    b_dec_init: str = "zeros"
    seed: int = 0  # the trainer's own generator (resampling draws)

    def __post_init__(self):
        for name, cls in _PARTS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"TrainConfig.{name} must be a {cls.__name__}, "
                                f"got {type(getattr(self, name)).__name__}")
        _non_negative("TrainConfig", self, "kl_coefficient")
        _check("TrainConfig", "b_dec_init", self.b_dec_init in ("zeros", "mean", "none"),
               "'zeros', 'mean' or 'none'", self.b_dec_init)
        _check("TrainConfig", "seed", _is_int(self.seed), "an int", self.seed)

    @classmethod
    def flat(cls, **settings) -> TrainConfig:
        """A TrainConfig from flat names (lr=, total_steps=, resample_every=, ...; see FLAT_NAMES)."""
        unknown = sorted(set(settings) - set(FLAT_NAMES))
        if unknown:
            raise ValueError(f"TrainConfig.flat got unknown settings {unknown}; expected some of {sorted(FLAT_NAMES)}")
        parts: dict[str, dict] = {name: {} for name in _PARTS}
        own = {}
        for key, value in settings.items():
            part, name = FLAT_NAMES[key]
            (own if part is None else parts[part])[name] = value
        return cls(**{name: _PARTS[name](**values) for name, values in parts.items()}, **own)

    def replace(self, **settings) -> TrainConfig:
        """A copy with some flat settings changed (the names of TrainConfig.flat)."""
        return TrainConfig.flat(**{**self.to_flat(), **settings})

    def to_flat(self) -> dict:
        out = {}
        for key, (part, name) in FLAT_NAMES.items():
            out[key] = getattr(self if part is None else getattr(self, part), name)
        return out

    def to_dict(self) -> dict:
        """Nested, JSON-able; the progress bar is a property of this process, not of the run, and is left out."""
        d = dataclasses.asdict(self)
        d["optimizer"]["betas"] = list(d["optimizer"]["betas"])
        d["logging"].pop("progress")
        return d

    @classmethod
    def from_dict(cls, d: dict, version: int = FORMAT_VERSION) -> TrainConfig:
        """A saved config: nested (format version 2) or the flat dict of version 1; unknown names raise."""
        if version == 1:
            return cls.flat(**d)
        if version != FORMAT_VERSION:
            raise ValueError(f"train config: format version must be 1 or {FORMAT_VERSION}, got {version!r}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"TrainConfig got unknown fields {unknown}")
        kwargs = dict(d)
        for name, part in _PARTS.items():
            if name in kwargs:
                values = kwargs[name]
                known = {f.name for f in dataclasses.fields(part)}
                if not isinstance(values, dict) or set(values) - known:
                    raise ValueError(f"TrainConfig.{name}: expected a dict with some of {sorted(known)}, "
                                     f"got {values!r}")
                kwargs[name] = part(**values)
        return cls(**kwargs)
