"""Export to and import from other SAE libraries' on-disk formats.

SAELens (v6, `SAE.load_from_disk`): a directory with
    cfg.json                  {"architecture": "standard" | "topk" | "jumprelu", "d_in", "d_sae", "dtype",
                               "device", "apply_b_dec_to_input", "normalize_activations", "k" (topk), ...}
    sae_weights.safetensors   W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc (d_sae,), b_dec (d_in,),
                              threshold (d_sae,) for jumprelu
A BatchTopK SAE is exported as SAELens does it for inference: a JumpReLU with
its learnt threshold on every latent.

EleutherAI sparsify (`SparseCoder.load_from_disk`): a directory with
    cfg.json          {"activation": "topk", "k", "num_latents", "expansion_factor", "normalize_decoder",
                       "multi_topk", "skip_connection", "transcode", "d_in"}
    sae.safetensors   encoder.weight (num_latents, d_in), encoder.bias (num_latents,),
                      W_dec (num_latents, d_in), b_dec (d_in,)
sparsify SAEs are TopK SAEs that always subtract b_dec from the input.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import io
from .config import DTYPES, SAEConfig
from .sae import SAE

SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _check_format(kind: str, cfg: dict, key: str, allowed: tuple, path: Path) -> None:
    if cfg.get(key) not in allowed:
        raise ValueError(f"{path}: {kind} {key!r} must be one of {allowed} to import, got {cfg.get(key)!r}")


def _sae_dtype(dtype: str, path: Path) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"{path}: dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return name


# ---- SAELens -------------------------------------------------------------------------------------


def export_saelens(sae: SAE, path: str | Path) -> Path:
    cfg = sae.cfg
    path = Path(path)
    arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}[cfg.activation]
    tensors = {"W_enc": sae.W_enc.detach().T, "W_dec": sae.W_dec.detach(),
               "b_enc": sae.b_enc.detach(), "b_dec": sae.b_dec.detach()}
    if arch == "jumprelu":
        tensors["threshold"] = sae.threshold.detach().expand(cfg.d_sae).to(sae.W_dec.dtype)
    meta = {"architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
            "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": "none",
            "reshape_activations": "none", "metadata": {"exported_by": "fastsae"}}
    if arch == "topk":
        meta["k"] = cfg.k
        meta["rescale_acts_by_decoder_norm"] = False
    io.write_tensors(path / SAELENS_WEIGHTS_FILE, tensors)
    io.write_json(path / "cfg.json", meta)
    return path


def import_saelens(path: str | Path, device: str = "cpu") -> SAE:
    path = Path(path)
    meta = io.read_json(path / "cfg.json")
    _check_format("SAELens", meta, "architecture", ("standard", "topk", "jumprelu"), path)
    _check_format("SAELens", meta, "normalize_activations", ("none", None), path)
    if meta.get("rescale_acts_by_decoder_norm"):
        raise ValueError(f"{path}: SAELens rescale_acts_by_decoder_norm=True is not supported")
    tensors = io.read_tensors(path / SAELENS_WEIGHTS_FILE, device=device)
    activation = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[meta["architecture"]]
    cfg = SAEConfig(d_in=int(meta["d_in"]), d_sae=int(meta["d_sae"]), activation=activation,
                    k=int(meta["k"]) if activation == "topk" else None,
                    apply_b_dec_to_input=bool(meta.get("apply_b_dec_to_input", True)),
                    normalize_decoder=False, dtype=_sae_dtype(meta.get("dtype", "float32"), path))
    ours = {"W_dec": tensors.pop("W_dec", None), "b_enc": tensors.pop("b_enc", None),
            "b_dec": tensors.pop("b_dec", None)}
    W_enc = tensors.pop("W_enc", None)
    ours["W_enc"] = W_enc.T.contiguous() if W_enc is not None else None
    if activation == "jumprelu":
        threshold = tensors.pop("threshold", None)
        ours["threshold"] = threshold.float() if threshold is not None else None
    return _build(cfg, ours, tensors, path / SAELENS_WEIGHTS_FILE)


# ---- EleutherAI sparsify -------------------------------------------------------------------------


def export_sparsify(sae: SAE, path: str | Path) -> Path:
    cfg = sae.cfg
    path = Path(path)
    if cfg.activation != "topk" or not cfg.apply_b_dec_to_input:
        raise ValueError("export_sparsify: sparsify loads TopK SAEs that subtract b_dec from the input; "
                         f"this SAE has activation={cfg.activation!r}, apply_b_dec_to_input={cfg.apply_b_dec_to_input}")
    tensors = {"encoder.weight": sae.W_enc.detach(), "encoder.bias": sae.b_enc.detach(),
               "W_dec": sae.W_dec.detach(), "b_dec": sae.b_dec.detach()}
    meta = {"activation": "topk", "expansion_factor": max(1, cfg.d_sae // cfg.d_in),
            "normalize_decoder": cfg.normalize_decoder, "num_latents": cfg.d_sae, "k": cfg.k,
            "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": cfg.d_in}
    io.write_tensors(path / SPARSIFY_WEIGHTS_FILE, tensors)
    io.write_json(path / "cfg.json", meta)
    return path


def import_sparsify(path: str | Path, device: str = "cpu") -> SAE:
    path = Path(path)
    meta = io.read_json(path / "cfg.json")
    _check_format("sparsify", meta, "activation", ("topk", None), path)
    for flag in ("skip_connection", "transcode"):
        if meta.get(flag):
            raise ValueError(f"{path}: sparsify {flag}=True has no fastsae equivalent")
    tensors = io.read_tensors(path / SPARSIFY_WEIGHTS_FILE, device=device)
    d_in = int(meta["d_in"])
    d_sae = int(meta.get("num_latents") or d_in * int(meta["expansion_factor"]))
    dtype = tensors["W_dec"].dtype if "W_dec" in tensors else torch.float32
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"{path}: W_dec dtype must be one of {tuple(DTYPES)}, got {dtype}")
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, activation="topk", k=int(meta["k"]),
                    normalize_decoder=bool(meta.get("normalize_decoder", True)), dtype=_DTYPE_NAMES[dtype])
    ours = {"W_enc": tensors.pop("encoder.weight", None), "b_enc": tensors.pop("encoder.bias", None),
            "W_dec": tensors.pop("W_dec", None), "b_dec": tensors.pop("b_dec", None)}
    return _build(cfg, ours, tensors, path / SPARSIFY_WEIGHTS_FILE)


def _build(cfg: SAEConfig, ours: dict, leftover: dict, source: Path) -> SAE:
    missing = sorted(k for k, v in ours.items() if v is None)
    if missing or leftover:
        raise ValueError(f"{source}: missing tensors for {missing}, unexpected tensors {sorted(leftover)}")
    sae = SAE(cfg, device="meta")
    sae.load_tensors(ours, source=source)
    return sae
