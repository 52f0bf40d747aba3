"""Run a model from a site upward: the blocks below a site run once, and every variant of the site's
activation (clean, an SAE's x̂, ablations, baselines) reuses them.

    lower = run_to_site(model, "resid_post.6", input_ids=ids)      # blocks 0..6 once; lower.activation (B, T, d)
    h = run_from_site(model, lower, [None, zero, sae_fn], input_ids=ids)  # (3, B, T, d) final hidden states
    logits = lm_head_logits(model, h[1])                           # what model(ids).logits holds for variant 1

How. The upper run calls the model's own forward again, so its attention masks (Gemma 3's sliding
windows included), position ids, position embeddings and rotary tables are built by transformers
itself for whatever version is installed; only the blocks below the site are swapped, for the run,
for a stub that returns the block output the lower run recorded. A site inside a block reruns that
block's part below the site (at most one block). The alternative, calling the upper blocks
ourselves, must rebuild each family's masks and rotary plumbing, whose signatures change between
transformers releases (Gemma 3 alone keeps two rotary tables and two mask kinds). What the stubbed
rerun costs beyond the upper blocks is the embedding lookup and the mask construction.

Several variants run as one batch of len(fns) · B sequences: the inputs and the recorded lower output
are repeated along the batch, and fns[i] replaces the site's activation of the i-th copy: larger GEMMs
(Gemma 3's 640 × 2,048 MLP projection runs at 79 GFLOP/s on 4,608 rows, 56 on 512, 2 CPU cores).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .hooks import _Stop, hook_site
from .sites import ARCHITECTURES, Site, _layers_path, resolve

SiteFn = Callable[[Tensor], Tensor | None]


@dataclass
class Lower:
    """What the lower run leaves for the upper runs."""

    site: Site
    split: int  # blocks [0, split) are stubbed in upper runs
    activation: Tensor  # (B, T, d) the site's clean activation
    output: object  # what block split - 1 returned (tensor or tuple); None when split == 0


def supports_site_runs(model: nn.Module) -> bool:
    """True for the families whose blocks and head this module knows (those of fastsae.model.sites)."""
    return getattr(getattr(model, "config", None), "model_type", None) in ARCHITECTURES


def _split(model: nn.Module, site: Site) -> tuple[nn.ModuleList | None, int]:
    """The block list and the number of blocks below the site whose output is the same for every variant."""
    path, _ = _layers_path(model)
    blocks = model.get_submodule(path)
    for i in range(len(blocks)):
        block = f"{path}.{i}"
        if site.module == block:  # resid_pre.i (input): blocks < i; resid_post.i (output): blocks <= i
            return blocks, i + (site.capture == "output")
        if site.module.startswith(block + "."):
            return blocks, i
    return blocks, 0  # a module outside the blocks (embeddings, final norm): nothing to reuse


def _inputs(model: nn.Module, inputs: dict) -> dict:
    """No key/value cache: the upper runs skip the lower blocks, which would leave holes in it."""
    base = model.base_model
    if "use_cache" in inspect.signature(base.forward).parameters:
        inputs = {**inputs, "use_cache": False}
    return inputs


@torch.no_grad()
def run_to_site(model: nn.Module, site: str | Site, **inputs) -> Lower:
    """Run model.base_model(**inputs) up to site (stopping there) and keep what the upper runs need."""
    if not supports_site_runs(model):
        raise ValueError(f"run_to_site: model_type {getattr(model.config, 'model_type', None)!r} is not one of "
                         f"{sorted(ARCHITECTURES)}; run the whole model instead")
    where = site if isinstance(site, Site) else resolve(model, site)
    blocks, split = _split(model, where)
    seen: dict[str, object] = {}

    def record(_module, _args, output):
        seen["output"] = output

    def grab(x: Tensor) -> None:
        seen["activation"] = x.detach()
        raise _Stop

    handle = blocks[split - 1].register_forward_hook(record) if split > 0 else None
    try:
        with hook_site(model, where, grab):  # registered after record: on one module, record runs first
            try:
                model.base_model(**_inputs(model, inputs))
            except _Stop:
                pass
    finally:
        if handle is not None:
            handle.remove()
    if "activation" not in seen:
        raise RuntimeError(f"site {where.name!r} was not reached by the forward")
    return Lower(where, split, seen["activation"], seen.get("output"))


def _repeat(obj, n: int):
    """A block's output with its batch repeated n times (tensors; tuples element-wise)."""
    if isinstance(obj, Tensor):
        return obj.repeat(n, *([1] * (obj.dim() - 1)))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_repeat(o, n) for o in obj)
    return obj


@contextmanager
def _stubbed(blocks: Sequence[nn.Module], output) -> Iterator[None]:
    """Within the block, each of blocks returns output without computing (their hooks still run)."""
    saved = [b.__dict__.get("forward") for b in blocks]

    def stub(*_args, **_kwargs):
        return output

    for b in blocks:
        b.forward = stub
    try:
        yield
    finally:
        for b, old in zip(blocks, saved, strict=True):
            if old is None:
                del b.forward
            else:
                b.forward = old


@torch.no_grad()
def run_from_site(model: nn.Module, lower: Lower, fns: Sequence[SiteFn | None], **inputs) -> Tensor:
    """Final hidden states (len(fns), B, T, d) of model.base_model on inputs (those of run_to_site), one per
    fn: fn(x (B, T, d)) -> the site's replacement (None: keep x), for every variant in one batched run."""
    n = len(fns)
    if n == 0:
        raise ValueError("run_from_site needs at least one fn (None for the clean model)")
    blocks, _ = _split(model, lower.site)
    batch = lower.activation.shape[0]
    repeated = {k: _repeat(v, n) for k, v in inputs.items()}

    def apply(x: Tensor) -> Tensor:  # x (n·B, T, d)
        parts = x.split(batch)
        if len(parts) != n:
            raise ValueError(f"run_from_site: the site's activation has batch {x.shape[0]}, expected {n} × {batch}")
        out = []
        for part, fn in zip(parts, fns, strict=True):
            new = None if fn is None else fn(part)
            out.append(part if new is None else new)
        return torch.cat(out)

    with _stubbed(blocks[:lower.split], _repeat(lower.output, n)), hook_site(model, lower.site, apply):
        out = model.base_model(**_inputs(model, repeated))
    hidden = out.last_hidden_state
    return hidden.reshape(n, batch, *hidden.shape[1:])


def lm_head_logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """model(...).logits from the final hidden states (…, d): the output embedding, then Gemma's final
    soft-capping where the config has one (the other supported families apply the head alone)."""
    if not supports_site_runs(model):
        raise ValueError(f"lm_head_logits: model_type {getattr(model.config, 'model_type', None)!r} is not one of "
                         f"{sorted(ARCHITECTURES)}")
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no LM head (an encoder): use its hidden states")
    logits = head(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits
