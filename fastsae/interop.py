"""Export to and import from other SAE libraries' on-disk formats.

SAELens (v6, `SAE.load_from_disk`): a directory with
    cfg.json                  {"architecture": "standard" | "topk" | "jumprelu", "d_in", "d_sae", "dtype",
                               "device", "apply_b_dec_to_input", "normalize_activations", "k" (topk), ...}
    sae_weights.safetensors   W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc (d_sae,), b_dec (d_in,),
                              threshold (d_sae,) for jumprelu
A BatchTopK SAE is exported as SAELens does it for inference: a JumpReLU with
its learnt threshold on every latent. What SAELens's own training runner writes
imports exactly:
- TopK with `rescale_acts_by_decoder_norm=True` (the default of its TopK training
  config) selects on pre·‖W_dec[i]‖ and decodes with W_dec[i]/‖W_dec[i]‖; folding
  the norms (W_enc rows and b_enc times ‖W_dec[i]‖, W_dec rows divided by it) gives
  the same latents and reconstruction. (`save_inference_model` folds them already
  and still writes the flag; its training checkpoints do not.)
- `normalize_activations="expected_average_only_in"`: SAELens applies no input
  scaling at inference for it (its trainer folds the factor into the weights at
  the end of training), so it is accepted and changes nothing.
- JumpReLU is relu(pre)·1[pre > θ] there: a threshold θ < 0 acts as 0, and is
  imported as 0 (fastsae computes pre·1[pre > θ]).

EleutherAI sparsify (`SparseCoder.load_from_disk`): a directory with
    cfg.json          {"activation": "topk", "k", "num_latents", "expansion_factor", "normalize_decoder",
                       "multi_topk", "skip_connection", "transcode", "d_in"}
    sae.safetensors   encoder.weight (num_latents, d_in), encoder.bias (num_latents,),
                      W_dec (num_latents, d_in), b_dec (d_in,)
sparsify SAEs are TopK SAEs that always subtract b_dec from the input. Its transcoders (`transcode=True`:
encode the module's input, predict its output) do not subtract it, and with `skip_connection=True` add
x @ W_skip.T, W_skip (d_in, d_in) in sae.safetensors: they import as SAEConfig kind "transcoder" /
"skip_transcoder", whose forward(x, target=y) is theirs, W_skip in the same orientation (fastsae/transcoder.py).
sparsify keeps no decoder norm for transcoders (its trainer skips the renormalisation), so they import with
normalize_decoder=False. Its hookpoint is the directory's name (relative to the model's base_model): one ending in
`<L>.mlp` gives the metadata's site/out_site mlp_in.L / mlp_out.L, others are recorded as "hookpoint" only.
(mlp_out.L is the MLP module's output in GPT-NeoX, GPT-2 and Llama; Gemma 3's is after its post-feedforward norm,
so a Gemma 3 transcoder of sparsify needs its out-site given, e.g. evaluate's out_sites=.)
An SAE with skip_connection but no transcode has no fastsae kind and is refused. `multi_topk`
trains the SAE to reconstruct with k and with 4k latents (Gao et al. 2024); sparsify's
`encode` keeps k, but its `forward().sae_out` then decodes 4k. The import keeps k (with a
warning saying so), or the k you pass (`SAE.from_tensors(*read_sparsify(path, k=4 * k))` matches that
forward). `d_in` (missing from older files) is taken from the weights. (EleutherAI's
library is `eai-sparsify` on PyPI; `sparsify` there is an unrelated, end-of-life package.)

`read_saelens` and `read_sparsify` return plain data, an `ImportedSAE` (config, tensors in fastsae's
layout, metadata, source file); `SAE.load` recognises both libraries' directories and builds the SAE from
it, as `SAE.from_tensors(*read_sparsify(path, k=...))` does for a k of your choice. This module does not
import `fastsae.sae`: the exports read an SAE's attributes only.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import io
from .config import DTYPES, SAEConfig

SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ImportedSAE(NamedTuple):
    """Another library's SAE in fastsae's terms: `SAE.from_tensors(*imported)` builds it."""
    cfg: SAEConfig
    tensors: dict[str, Tensor]  # the SAE's state_dict: W_enc, W_dec (d_sae, d_in), b_enc, b_dec, threshold
    metadata: dict  # {"imported_from": {"library", "path", ...}}
    source: Path  # the weights file, named in errors


def _fields(kind: str, meta: dict, path: Path, **kinds) -> None:
    for key, types in kinds.items():
        value = meta.get(key)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise io.CorruptFileError(path / "cfg.json", f"{kind} field {key!r} must be "
                                                         f"{' or '.join(t.__name__ for t in types)}, got {value!r}")


def _check_format(kind: str, cfg: dict, key: str, allowed: tuple, path: Path) -> None:
    if cfg.get(key) not in allowed:
        raise ValueError(f"{path}: {kind} {key!r} must be one of {allowed} to import, got {cfg.get(key)!r}")


def _sae_dtype(dtype: str, path: Path) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"{path}: dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return name


# ---- SAELens -------------------------------------------------------------------------------------


def export_saelens(sae: nn.Module, path: str | Path) -> Path:
    """Write sae (a fastsae SAE) as a SAELens directory at path."""
    cfg = sae.cfg
    path = Path(path)
    if cfg.kind != "sae":  # W_skip and the output site would be lost: SAELens loads its transcoders otherwise
        raise ValueError(f"export_saelens: exports SAEs (SAEConfig.kind='sae'), not a {cfg.kind} (not supported yet)")
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


def read_saelens(path: str | Path, device: str = "cpu") -> ImportedSAE:
    """A SAELens directory's SAE, converted (see the module docstring)."""
    path = Path(path)
    meta = io.read_json(path / "cfg.json")
    _check_format("SAELens", meta, "architecture", ("standard", "topk", "jumprelu"), path)
    # expected_average_only_in: a no-op at SAELens's inference (see the module docstring)
    _check_format("SAELens", meta, "normalize_activations", ("none", None, "expected_average_only_in"), path)
    activation = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[meta["architecture"]]
    _fields("SAELens", meta, path, d_in=(int,), d_sae=(int,), **({"k": (int,)} if activation == "topk" else {}))
    tensors = io.read_tensors(path / SAELENS_WEIGHTS_FILE, device=device)
    cfg = SAEConfig(d_in=meta["d_in"], d_sae=meta["d_sae"], activation=activation,
                    k=meta["k"] if activation == "topk" else None,
                    apply_b_dec_to_input=bool(meta.get("apply_b_dec_to_input", True)),
                    normalize_decoder=False, dtype=_sae_dtype(meta.get("dtype", "float32"), path))
    ours = {"W_dec": tensors.pop("W_dec", None), "b_enc": tensors.pop("b_enc", None),
            "b_dec": tensors.pop("b_dec", None)}
    W_enc = tensors.pop("W_enc", None)
    ours["W_enc"] = W_enc.T.contiguous() if W_enc is not None else None
    provenance = {"library": "sae_lens", "path": str(path), "architecture": meta["architecture"]}
    if activation == "jumprelu":
        threshold = tensors.pop("threshold", None)
        if threshold is not None:
            if not bool(torch.isfinite(threshold).all()):
                raise io.CorruptFileError(path / SAELENS_WEIGHTS_FILE, "threshold holds NaN or Inf values")
            # SAELens: relu(pre)·1[pre > θ] = pre·1[pre > max(θ, 0)]
            provenance["negative_thresholds_set_to_0"] = int((threshold < 0).sum())
            threshold = threshold.float().clamp_min(0)
        ours["threshold"] = threshold
    if activation == "topk" and meta.get("rescale_acts_by_decoder_norm") and None not in ours.values():
        ours = _fold_decoder_norms(ours)
        provenance["decoder_norms_folded"] = True
    return _imported(cfg, ours, tensors, {"imported_from": provenance}, path / SAELENS_WEIGHTS_FILE)


@torch.no_grad()
def _fold_decoder_norms(t: dict) -> dict:
    """SAELens's rescale_acts_by_decoder_norm, folded exactly: selection on pre·n_i and decoding with
    W_dec[i]/n_i equal encoding with (n_i·W_enc[i], n_i·b_enc[i]) and decoding with W_dec[i]/n_i."""
    dtype = t["W_dec"].dtype
    norms = t["W_dec"].double().norm(dim=1).clamp_min(1e-8)  # (d_sae,), SAELens's clamp
    return {**t, "W_enc": (t["W_enc"].double() * norms[:, None]).to(dtype),
            "b_enc": (t["b_enc"].double() * norms).to(dtype),
            "W_dec": (t["W_dec"].double() / norms[:, None]).to(dtype)}


# ---- EleutherAI sparsify -------------------------------------------------------------------------


def export_sparsify(sae: nn.Module, path: str | Path) -> Path:
    """Write sae (a fastsae TopK SAE, transcoder or skip transcoder) as a sparsify directory at path."""
    cfg = sae.cfg
    path = Path(path)
    transcode = cfg.kind in ("transcoder", "skip_transcoder")  # a transcoder never subtracts b_dec (SAEConfig)
    if cfg.activation != "topk" or not (transcode or cfg.apply_b_dec_to_input) or cfg.matryoshka_widths:
        raise ValueError("export_sparsify: sparsify loads TopK SAEs that subtract b_dec from the input, and TopK "
                         f"transcoders; this {cfg.kind} has activation={cfg.activation!r}, apply_b_dec_to_input="
                         f"{cfg.apply_b_dec_to_input}, matryoshka_widths={cfg.matryoshka_widths}")
    tensors = {"encoder.weight": sae.W_enc.detach(), "encoder.bias": sae.b_enc.detach(),
               "W_dec": sae.W_dec.detach(), "b_dec": sae.b_dec.detach()}
    if cfg.kind == "skip_transcoder":
        tensors["W_skip"] = sae.W_skip.detach()  # (d_out, d_in): sparsify adds x @ W_skip.mT, as fastsae does
    meta = {"activation": "topk", "expansion_factor": max(1, cfg.d_sae // cfg.d_in),
            "normalize_decoder": cfg.normalize_decoder, "num_latents": cfg.d_sae, "k": cfg.k,
            "multi_topk": False, "skip_connection": cfg.kind == "skip_transcoder", "transcode": transcode,
            "d_in": cfg.d_in}
    io.write_tensors(path / SPARSIFY_WEIGHTS_FILE, tensors)
    io.write_json(path / "cfg.json", meta)
    return path


def read_sparsify(path: str | Path, device: str = "cpu", k: int | None = None) -> ImportedSAE:
    """A sparsify directory's SAE, converted. k: the latents per row (default: the k it was trained with;
    see multi_topk above)."""
    path = Path(path)
    meta = io.read_json(path / "cfg.json")
    _check_format("sparsify", meta, "activation", ("topk", None), path)
    transcode, skip = bool(meta.get("transcode", False)), bool(meta.get("skip_connection", False))
    if skip and not transcode:
        raise ValueError(f"{path}: sparsify skip_connection=True without transcode=True (an SAE with a skip term) "
                         "has no fastsae equivalent; its skip transcoders (both True) import")
    _fields("sparsify", meta, path, k=(int,))
    tensors = io.read_tensors(path / SPARSIFY_WEIGHTS_FILE, device=device)
    weight = tensors.get("encoder.weight")
    if weight is None or weight.dim() != 2:
        raise io.CorruptFileError(path / SPARSIFY_WEIGHTS_FILE, "no 2-D tensor 'encoder.weight' (num_latents, d_in)")
    d_sae, d_in = weight.shape
    for key, value in (("d_in", d_in), ("num_latents", d_sae)):
        if meta.get(key) not in (None, 0, value):  # num_latents 0 means "d_in · expansion_factor"
            raise io.CorruptFileError(path / "cfg.json", f"sparsify {key}={meta[key]!r}, but encoder.weight in "
                                                         f"{SPARSIFY_WEIGHTS_FILE} is ({d_sae}, {d_in})")
    dtype = tensors["W_dec"].dtype if "W_dec" in tensors else torch.float32
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"{path}: W_dec dtype must be one of {tuple(DTYPES)}, got {dtype}")
    multi_topk = bool(meta.get("multi_topk", False))
    if multi_topk and k is None:
        warnings.warn(f"{path}: a sparsify multi_topk SAE, imported as TopK with its k={meta['k']} "
                      f"(sparsify's encode); its forward() decodes {4 * meta['k']} latents: "
                      f"pass k={4 * meta['k']} for that", stacklevel=2)
    kind = ("skip_transcoder" if skip else "transcoder") if transcode else "sae"
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, activation="topk", k=meta["k"] if k is None else k,
                    normalize_decoder=bool(meta.get("normalize_decoder", True)) and not transcode,
                    dtype=_DTYPE_NAMES[dtype], kind=kind, apply_b_dec_to_input=not transcode)
    ours = {"W_enc": tensors.pop("encoder.weight", None), "b_enc": tensors.pop("encoder.bias", None),
            "W_dec": tensors.pop("W_dec", None), "b_dec": tensors.pop("b_dec", None)}
    if skip:
        ours["W_skip"] = tensors.pop("W_skip", None)
    provenance = {"library": "sparsify", "path": str(path), "multi_topk": multi_topk, "trained_k": meta["k"]}
    return _imported(cfg, ours, tensors, {"imported_from": provenance, **_sparsify_sites(path, transcode)},
                     path / SPARSIFY_WEIGHTS_FILE)


def _sparsify_sites(path: Path, transcode: bool) -> dict:
    """A sparsify transcoder's sites, from its directory's name (the hookpoint, e.g. layers.6.mlp: it reads the
    module's input and writes its output). {} for an SAE (its site is the run's business, as before)."""
    if not transcode:
        return {}
    match = re.search(r"(?:^|\.)(\d+)\.mlp$", path.name)
    if match is None:
        return {"hookpoint": path.name}
    layer = int(match.group(1))
    return {"hookpoint": path.name, "site": f"mlp_in.{layer}", "out_site": f"mlp_out.{layer}"}


def read_other_library(path: Path, meta: dict, device: str = "cpu") -> ImportedSAE:
    """The SAE in directory path whose cfg.json (meta) has no fastsae format_version: SAELens's or sparsify's,
    told apart by their files and fields."""
    if "architecture" in meta or (path / SAELENS_WEIGHTS_FILE).is_file():
        return read_saelens(path, device=device)
    if "num_latents" in meta or "expansion_factor" in meta:
        return read_sparsify(path, device=device)
    raise io.CorruptFileError(path / "cfg.json", "no format_version: not an SAE saved by fastsae, and not a "
                                                 "SAELens or sparsify one either")


def _imported(cfg: SAEConfig, ours: dict, leftover: dict, metadata: dict, source: Path) -> ImportedSAE:
    """ours (fastsae's tensor names) as an ImportedSAE; any tensor missing, or left over from the file, refused.
    Shapes and dtypes are checked against cfg when the SAE is built (SAE.from_tensors)."""
    missing = sorted(k for k, v in ours.items() if v is None)
    if missing or leftover:
        raise ValueError(f"{source}: missing tensors for {missing}, unexpected tensors {sorted(leftover)}")
    return ImportedSAE(cfg, ours, metadata, source)
