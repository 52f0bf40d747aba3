"""Named hook sites in Hugging Face `transformers` models, and a forward that captures them.

Sites, per layer L (the residual stream convention of the interpretability literature):
    resid_pre.L    input of block L                    resid_post.L   output of block L
    attn_out.L     what attention adds to the stream   mlp_out.L      what the MLP adds to the stream
    mlp_hidden.L   MLP neurons after the nonlinearity (the seed paper's MLP dictionaries)
A raw module path (e.g. "gpt_neox.layers.3.mlp") also works: its output is captured.

For pre-norm decoders resid_post.L = resid_pre.L + attn_out.L + mlp_out.L (Gemma 3 normalises
each branch before adding it, so its attn_out/mlp_out are the post-norms' outputs). BERT is
post-norm: its attn_out/mlp_out are the dense projections before the residual add and LayerNorm.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_hidden")

# model_type -> (candidate paths of the block list, {kind: (path inside a block, "output" | "input")})
ARCHITECTURES: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, str]]]] = {
    "gpt_neox": (("gpt_neox.layers", "layers"),
                 {"attn_out": ("attention", "output"), "mlp_out": ("mlp", "output"),
                  "mlp_hidden": ("mlp.act", "output")}),
    "gpt2": (("transformer.h", "h"),
             {"attn_out": ("attn", "output"), "mlp_out": ("mlp", "output"), "mlp_hidden": ("mlp.act", "output")}),
    "llama": (("model.layers", "layers"),
              {"attn_out": ("self_attn", "output"), "mlp_out": ("mlp", "output"),
               "mlp_hidden": ("mlp.down_proj", "input")}),
    "gemma3_text": (("model.layers", "layers"),
                    {"attn_out": ("post_attention_layernorm", "output"),
                     "mlp_out": ("post_feedforward_layernorm", "output"), "mlp_hidden": ("mlp.down_proj", "input")}),
    "bert": (("bert.encoder.layer", "encoder.layer"),
             {"attn_out": ("attention.output.dense", "output"), "mlp_out": ("output.dense", "output"),
              "mlp_hidden": ("intermediate", "output")}),
}
ARCHITECTURES["gemma3"] = ARCHITECTURES["gemma3_text"]


@dataclass(frozen=True)
class Site:
    name: str  # as asked: "resid_post.3" or a module path
    module: str  # path of the hooked module
    capture: str  # "output": the module's output (first element of a tuple); "input": its first input
    layer: int | None  # the block it belongs to, for early stopping


def _layers_path(model: nn.Module) -> tuple[str, dict[str, tuple[str, str]]]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"named sites are not defined for model_type={model_type!r} "
                         f"(known: {sorted(ARCHITECTURES)}); pass a module path instead")
    candidates, inner = ARCHITECTURES[model_type]
    for path in candidates:
        try:
            model.get_submodule(path)
        except AttributeError:
            continue
        return path, inner
    raise ValueError(f"{type(model).__name__}: none of {candidates} is a module of this model")


def available_sites(model: nn.Module) -> list[str]:
    path, _ = _layers_path(model)
    n_layers = len(model.get_submodule(path))
    return [f"{kind}.{layer}" for layer in range(n_layers) for kind in KINDS]


def resolve(model: nn.Module, site: str) -> Site:
    """A site name or module path -> where to hook. Unknown names list the sites that exist."""
    kind, _, index = site.rpartition(".")
    if kind in KINDS:
        path, inner = _layers_path(model)
        n_layers = len(model.get_submodule(path))
        if not index.isdigit() or int(index) >= n_layers:
            raise ValueError(f"site {site!r}: layer must be in [0, {n_layers}); sites: {available_sites(model)}")
        block = f"{path}.{index}"
        if kind == "resid_pre":
            return Site(site, block, "input", int(index))
        if kind == "resid_post":
            return Site(site, block, "output", int(index))
        sub, capture = inner[kind]
        return Site(site, f"{block}.{sub}", capture, int(index))
    try:
        model.get_submodule(site)
    except AttributeError:
        try:
            known = available_sites(model)
        except ValueError:
            known = []
        raise ValueError(f"unknown site {site!r}: expected one of {known} or a module path of "
                         f"{type(model).__name__}") from None
    return Site(site, site, "output", None)


class _Stop(Exception):
    """Raised by a hook once every site is captured: the rest of the forward is not needed."""


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


@torch.no_grad()
def capture(model: nn.Module, sites: Iterable[str], stop_early: bool = True, **inputs) -> dict[str, Tensor]:
    """Run model(**inputs) and return the activations at sites, each (batch, seq, d).

    stop_early: the forward stops as soon as every site is captured, so later
    layers and the LM head never run."""
    resolved = [resolve(model, s) for s in dict.fromkeys(sites)]
    if not resolved:
        raise ValueError("capture needs at least one site")
    out: dict[str, Tensor] = {}
    handles = []

    def hook_for(site: Site):
        def grab(value):
            out[site.name] = _first(value).detach()
            if stop_early and len(out) == len(resolved):
                raise _Stop

        if site.capture == "input":
            def pre(_module, args, kwargs):
                grab(args if args else next(iter(kwargs.values())))
            return pre
        return lambda _module, _args, output: grab(output)

    try:
        for site in resolved:
            module = model.get_submodule(site.module)
            if site.capture == "input":
                handles.append(module.register_forward_pre_hook(hook_for(site), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(hook_for(site)))
        try:
            model(**inputs)
        except _Stop:
            pass
    finally:
        for h in handles:
            h.remove()
    missing = [s.name for s in resolved if s.name not in out]
    if missing:
        raise RuntimeError(f"sites {missing} were not reached by the forward")
    return out
