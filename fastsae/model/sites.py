"""Named sites in Hugging Face `transformers` models: which module, input or output, a name means.

Sites, per layer L (the residual-stream convention of the interpretability literature):
    resid_pre.L    input of block L                       resid_post.L   output of block L
    attn_out.L     what attention adds to the stream      mlp_out.L      what the MLP adds to the stream
    resid_mid.L    the stream between attention and MLP   mlp_in.L       the MLP's own input (after its norm)
    mlp_hidden.L   MLP neurons after the nonlinearity (the seed paper's MLP dictionaries)
A raw module path (e.g. "gpt_neox.layers.3.mlp") also names a site: its output.

For pre-norm decoders resid_mid.L = resid_pre.L + attn_out.L and resid_post.L = resid_mid.L + mlp_out.L
(Gemma 3 normalises each branch before adding it, so its attn_out/mlp_out are the post-norms' outputs).
GPT-NeoX with `use_parallel_residual` (Pythia's default) feeds the MLP from resid_pre, so there
resid_mid.L = resid_pre.L. BERT is post-norm: attn_out/mlp_out are the dense projections before the
residual add and LayerNorm, and resid_mid.L = mlp_in.L is the attention block's normalised output.
Feature connections across an MLP pair mlp_in.L (or resid_mid.L) with mlp_out.L.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_in", "mlp_out", "mlp_hidden")

# model_type -> (candidate paths of the block list, {kind: (path inside a block, "output" | "input")})
ARCHITECTURES: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, str]]]] = {
    "gpt_neox": (("gpt_neox.layers", "layers"),
                 {"attn_out": ("attention", "output"), "resid_mid": ("post_attention_layernorm", "input"),
                  "mlp_in": ("mlp", "input"), "mlp_out": ("mlp", "output"), "mlp_hidden": ("mlp.act", "output")}),
    "gpt2": (("transformer.h", "h"),
             {"attn_out": ("attn", "output"), "resid_mid": ("ln_2", "input"), "mlp_in": ("mlp", "input"),
              "mlp_out": ("mlp", "output"), "mlp_hidden": ("mlp.act", "output")}),
    "llama": (("model.layers", "layers"),
              {"attn_out": ("self_attn", "output"), "resid_mid": ("post_attention_layernorm", "input"),
               "mlp_in": ("mlp", "input"), "mlp_out": ("mlp", "output"), "mlp_hidden": ("mlp.down_proj", "input")}),
    "gemma3_text": (("model.layers", "layers"),
                    {"attn_out": ("post_attention_layernorm", "output"),
                     "resid_mid": ("pre_feedforward_layernorm", "input"), "mlp_in": ("mlp", "input"),
                     "mlp_out": ("post_feedforward_layernorm", "output"), "mlp_hidden": ("mlp.down_proj", "input")}),
    "bert": (("bert.encoder.layer", "encoder.layer"),
             {"attn_out": ("attention.output.dense", "output"), "resid_mid": ("intermediate", "input"),
              "mlp_in": ("intermediate", "input"), "mlp_out": ("output.dense", "output"),
              "mlp_hidden": ("intermediate", "output")}),
}
ARCHITECTURES["gemma3"] = ARCHITECTURES["gemma3_text"]


@dataclass(frozen=True)
class Site:
    name: str  # as asked: "resid_post.3" or a module path
    module: str  # path of the hooked module
    capture: str  # "output": the module's output (first element of a tuple); "input": its first input


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


def n_layers(model: nn.Module) -> int:
    path, _ = _layers_path(model)
    return len(model.get_submodule(path))


def available_sites(model: nn.Module) -> list[str]:
    return [f"{kind}.{layer}" for layer in range(n_layers(model)) for kind in KINDS]


def resolve(model: nn.Module, site: str) -> Site:
    """A site name or module path -> where to hook. An unknown name raises ValueError naming it and
    listing the sites that exist."""
    if not isinstance(site, str) or not site:
        raise ValueError(f"site must be a non-empty string (e.g. 'resid_post.3'), got {site!r}")
    kind, _, index = site.rpartition(".")
    if kind in KINDS:
        path, inner = _layers_path(model)
        layers = len(model.get_submodule(path))
        if not index.isdigit() or int(index) >= layers:
            raise ValueError(f"site {site!r}: layer must be in [0, {layers}); sites: {available_sites(model)}")
        block = f"{path}.{index}"
        if kind == "resid_pre":
            return Site(site, block, "input")
        if kind == "resid_post":
            return Site(site, block, "output")
        sub, capture = inner[kind]
        return Site(site, f"{block}.{sub}", capture)
    try:
        model.get_submodule(site)
    except AttributeError:
        try:
            known = available_sites(model)
        except ValueError:
            known = []
        raise ValueError(f"unknown site {site!r}: expected one of {known} or a module path of "
                         f"{type(model).__name__}") from None
    return Site(site, site, "output")
