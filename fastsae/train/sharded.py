"""`ShardedSAE`: an SAE whose d_sae latents are split over the ranks of a latent group; sharded files.

Each rank holds rows start:stop of W_enc, W_dec, b_enc (and a JumpReLU threshold θ) and the whole b_dec
(and a BatchTopK threshold, a skip transcoder's W_skip). The forward is the SAE's, with the ops of
`fastsae.ops.distributed` and `fastsae.ops.sharded_terms`: the same x_hat, loss terms and latents (TopK
indices identical to the unsharded SAE's) on every rank of a latent group. With a grid of one latent shard
it is an SAE (plain data parallel). Every kind and activation shards: a transcoder's encoder reads x and its
loss rebuilds target y; W_skip x is added once, after the decode's all-reduce, so W_skip's gradient is whole
on every rank (the data group averages it as any parameter's); θ trains per latent, its sparsity terms
summed over the group before any non-linear function of them; Matryoshka prefixes are over global indices. A
crosscoder is an SAE on its sites side by side: each latent's row holds all its per-site decoders, so the
sparsity weight Σ_l ||W_dec^l[i]|| (`losses.decoder_norms`) is computed from this rank's rows alone.

Row-wise work needs nothing new: the decoder-norm constraint, Adam (SAEAdam or torch's), folding an
input scale (or a crosscoder's per-site scales, `crosscoder.fold_site_scales_`) and the resampling rewrite
all act on whole latent rows, so they run on each rank's rows unchanged (`SAEWeights`, which this class
shares with SAE, holds them and the parameter setup).

Files: a sharded SAE is a directory

    manifest.json                       format_version, kind, the SAE config and metadata, the shards
                                        [{file, start, stop}], `extra` (JSON for whoever wrote it)
    shard-00000-of-00002.safetensors    rows start:stop of every per-latent tensor
    replicated.safetensors              b_dec and the other tensors every rank holds whole

written by the first rank of each latent shard (data rank 0) and rank 0, the manifest last (its
commit point). Reading takes any rows, so a directory written with L shards loads into any number of
shards (`load_sharded`) or into one single-process `SAE` (`consolidate`); `shard_sae` goes back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from .. import io, transcoder
from ..config import SAEConfig
from ..latents import SparseLatents
from ..losses import LossCoefficients, accumulation_dtype, loss_terms, mse
from ..losses import sparsity_terms as sparsity_terms_of
from ..ops import distributed as D
from ..ops import sharded_terms as T
from ..ops.distributed import LatentShard, ProcessGrid, sum_shards
from ..ops.jumprelu import StepL0
from ..sae import SAE, SAEOutput, SAEWeights

FORMAT_VERSION = 1
KIND = "fastsae-sharded"
MANIFEST = "manifest.json"
REPLICATED = "replicated.safetensors"
# Rows generated per call while initialising a slice: a multiple of 16, so that the pieces of torch's
# CPU normal sampler (blocks of 16 draws) join into exactly the stream of one SAE-sized randn call.
_INIT_ROWS = 16 * 4096


def row_tensor_names(cfg: SAEConfig) -> tuple[str, ...]:
    """Names of the state tensors with one row per latent (the rest are replicated), for an SAE of cfg as
    for a ShardedSAE: one process reads a sharded checkpoint by these names too."""
    names = ("W_dec",) + (() if cfg.tied else ("W_enc",)) + ("b_enc",)
    return names + (("threshold",) if cfg.activation == "jumprelu" else ())


def init_rows(cfg: SAEConfig, start: int, stop: int, seed: int) -> Tensor:
    """Rows start:stop of `SAE(cfg, seed=seed)`'s initial decoder on CPU (unit rows, fp32), without
    ever holding the other rows: the (d_sae, d_in) draw is made in pieces and the rest thrown away."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for lo in range(0, stop, _INIT_ROWS):
        hi = min(lo + _INIT_ROWS, cfg.d_sae)
        piece = torch.randn(hi - lo, cfg.d_in, generator=gen)
        if hi > start:
            rows.append(piece[max(start, lo) - lo:stop - lo])
    W = torch.cat(rows)
    return W / W.norm(dim=1, keepdim=True)


class ShardedSAE(SAEWeights):
    def __init__(self, cfg: SAEConfig, grid: ProcessGrid | None = None, *, device: torch.device | str | None = None,
                 seed: int = 0):
        """This rank's rows of `SAE(cfg, seed=seed)` (the same initial weights when built on CPU)."""
        super().__init__(cfg)
        self.grid = grid or ProcessGrid()
        self.shard = LatentShard.of(cfg.d_sae, self.grid)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "meta":
            W = torch.empty(self.shard.size, cfg.d_in, device=device)
        else:
            W = init_rows(cfg, self.shard.start, self.shard.stop, seed).to(device)
        self.init_parameters(W)  # (n, d_in) rows and the whole b_dec

    @property
    def row_tensors(self) -> tuple[str, ...]:
        """Names of the tensors sharded by latent (their first dimension is this rank's rows)."""
        return row_tensor_names(self.cfg)

    # ---- forward -----------------------------------------------------------------------------------

    def encode(self, x: Tensor) -> SparseLatents:
        """(*lead, d_in) → the SparseLatents of the unsharded SAE, (*lead, w), on every rank."""
        x2, lead = self.flatten_input(x)
        return self._encode_flat(self._centre(x2))[2].reshape(*lead)

    def decode(self, latents: SparseLatents | Tensor) -> Tensor:
        """SparseLatents (*lead, w) with global indices, or dense (*lead, d_sae) → x_hat (*lead, d_in)."""
        if isinstance(latents, Tensor):
            latents = SparseLatents.from_dense(latents)
        if latents.d_sae != self.cfg.d_sae:
            raise ValueError(f"decode: latents have d_sae={latents.d_sae}, this SAE has d_sae={self.cfg.d_sae}")
        lead, w = latents.values.shape[:-1], latents.width
        x_hat = D.decode(latents.values.reshape(-1, w).to(self.dtype), latents.indices.reshape(-1, w),
                         self.cast(self.W_dec), self.cast(self.b_dec), self.shard)
        return x_hat.reshape(*lead, self.cfg.d_in)

    def forward(self, x: Tensor, *, target: Tensor | None = None, dead_mask: Tensor | None = None,
                k_aux: int | None = None, coefficients: LossCoefficients | None = None, kl=None) -> SAEOutput:
        """`SAE.forward`, sharded: dead_mask (n,) is this rank's rows'; target a transcoder's y. Every output is
        the same on every rank of the latent group (latents detached for relu/jumprelu/batchtopk). kl is not
        supported."""
        if kl is not None:
            raise ValueError("ShardedSAE: training through a spliced model (kl) runs in one process only")
        cfg, shard = self.cfg, self.shard
        x2, y2, lead = transcoder.flatten_pair(self, x, target)  # y2 is x2 for an SAE
        x_c = self._centre(x2)
        values, indices, latents, extra = self._encode_flat(x_c)  # values/indices: at least this rank's entries
        # the dictionary's decode (all-reduced partial sums) plus, for a skip transcoder, W_skip x once: it is
        # replicated and added after the all-reduce, so every rank has its whole gradient (no collective)
        x_hat, prefix_mse = transcoder.decode_with_skip(self, values, indices, x2, y2)  # (N, d_in), (P,) | None
        window = extra if cfg.activation == "jumprelu" else None
        # relu/jumprelu values hold this rank's entries only (local indices); the others have no sparsity term
        l1, l0 = sparsity_terms(cfg, values, indices - shard.start, window, getattr(self, "threshold", None),
                                  self.W_dec, shard.group)
        auxk = (self._auxk(x_c, y2 - x_hat, dead_mask, k_aux)
                if dead_mask is not None and cfg.activation in ("topk", "batchtopk") else None)
        terms = loss_terms(y2, x_hat, coefficients or LossCoefficients(l1=cfg.l1_coefficient), l1=l1, auxk=auxk,
                           prefix_mse=prefix_mse, l0=l0)
        tau = extra if cfg.activation == "batchtopk" else None
        return SAEOutput(x_hat.reshape(*lead, cfg.d_in), latents.reshape(*lead), terms.mse, l1, auxk, terms.loss,
                         None, tau, prefix_mse, l0)

    def skip(self, x: Tensor) -> Tensor:
        """A skip transcoder's skip term W_skip x (W_skip is replicated): (*lead, d_in) -> (*lead, d_in)."""
        return transcoder.skip_term(self, x)

    def _decode_flat(self, values: Tensor, indices: Tensor, target: Tensor) -> tuple[Tensor, Tensor | None]:
        """x_hat (N, d_in) over the latent group, and with Matryoshka widths each prefix's mse of target (P,)."""
        W_dec, b_dec = self.cast(self.W_dec), self.cast(self.b_dec)
        if self.cfg.matryoshka_widths is None:
            return D.decode(values, indices, W_dec, b_dec, self.shard), None
        return T.decode_prefixes(values, indices, W_dec, b_dec, target, self.cfg.matryoshka_widths, self.shard)

    def _centre(self, x: Tensor) -> Tensor:
        """The encoder input, fed to every shard: its gradient (to b_dec, or x) sums over the latent group."""
        group = self.shard.group
        if self.cfg.apply_b_dec_to_input:
            return D.replicate(x, group) - D.replicate(self.cast(self.b_dec), group)
        return D.replicate(x, group)

    def _encode_flat(self, x_c: Tensor) -> tuple[Tensor, Tensor, SparseLatents, Tensor | None]:
        """values, indices (at least this rank's entries), the latents of every rank, and `encode_flat`'s extra:
        BatchTopK's batch threshold in training (the trainer records it, as for SAE), JumpReLU's window (this
        rank's slots) when θ is trained, else None."""
        cfg, shard = self.cfg, self.shard
        W_enc, b_enc = self.cast(self.W_enc), self.cast(self.b_enc)
        extra = None
        theta = getattr(self, "threshold", None)
        if cfg.activation == "topk":
            values, indices = D.encode_topk(x_c, W_enc, b_enc, cfg.k, shard)
            return values, indices, SparseLatents(values, indices, cfg.d_sae), None
        if cfg.activation == "batchtopk" and self.training:
            rows = x_c.shape[0] * self.grid.data_size  # every data rank holds as many rows
            values, indices, extra = D.encode_batchtopk(x_c, W_enc, b_enc, cfg.k, shard, self.grid.batch_group, rows)
        elif cfg.activation == "jumprelu" and theta.requires_grad and torch.is_grad_enabled():  # θ trained
            values, indices, extra = T.encode_jumprelu(x_c, W_enc, b_enc, theta, cfg.jumprelu_bandwidth, shard)
        else:
            theta = theta if cfg.activation == "jumprelu" else None
            if cfg.activation == "batchtopk":  # inference: the learnt threshold, row by row
                theta = self.threshold.expand(shard.size).contiguous()
            values, indices = D.encode_threshold(x_c, W_enc, b_enc, theta, shard)
        all_values, all_indices = D.gather_compact(values, indices, shard.group)
        return values, indices, SparseLatents(all_values, all_indices, cfg.d_sae), extra

    def _auxk(self, x_c: Tensor, residual: Tensor, dead_mask: Tensor, k_aux: int | None) -> Tensor:
        """SAE.forward's AuxK over the dead latents of every shard: the same sharded top-k and decode, rebuilding
        residual (N, d_in), the target minus x_hat (detached here)."""
        if dead_mask.shape != (self.shard.size,) or dead_mask.dtype != torch.bool:
            raise ValueError(f"dead_mask must be a bool tensor of this rank's ({self.shard.size},) latents, "
                             f"got {dead_mask.dtype} {tuple(dead_mask.shape)}")
        dead = dead_mask.nonzero().squeeze(1)  # (n_dead,) local rows
        total = int(D.all_reduce_(torch.tensor([dead.numel()], device=x_c.device), self.shard.group,
                                  name="dead_all_reduce"))
        if total == 0:
            return residual.new_zeros((), dtype=accumulation_dtype(residual.dtype))
        k_aux = min(k_aux or max(1, self.cfg.d_in // 2), total)
        values, indices = D.encode_topk(x_c, self.cast(self.W_enc[dead]), self.cast(self.b_enc[dead]), k_aux,
                                        self.shard, latent_ids=dead + self.shard.start)
        e_hat = D.decode(values, indices, self.cast(self.W_dec), None, self.shard)
        return mse(residual.detach(), e_hat)

    # ---- to and from one process -------------------------------------------------------------------

    def row_state(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.row_tensors}

    def replicated_state(self) -> dict[str, Tensor]:
        return {name: t for name, t in self.state_dict().items() if name not in self.row_tensors}

    @classmethod
    def from_sae(cls, sae: SAE, grid: ProcessGrid | None = None) -> ShardedSAE:
        """This rank's rows of a single-process SAE (a copy)."""
        model = cls(sae.cfg, grid, device="meta")
        s = model.shard
        tensors = {name: t.detach()[s.start:s.stop].clone() if name in model.row_tensors else t.detach().clone()
                   for name, t in sae.state_dict().items()}
        model.load_state_dict(tensors, assign=True)
        model.metadata, model.compute_dtype, model.check_finite = dict(sae.metadata), sae.compute_dtype, \
            sae.check_finite
        return model

    def to_sae(self) -> SAE:
        """The single-process SAE; needs a grid of one latent shard (use `gather_sae` or `consolidate`)."""
        if self.grid.latent_size != 1:
            raise ValueError(f"to_sae needs every latent on this rank; this one holds {self.shard.start}:"
                             f"{self.shard.stop} of {self.cfg.d_sae}: use gather_sae(model) or consolidate(path)")
        sae = SAE(self.cfg, device="meta")
        sae.load_tensors({n: t.detach().clone() for n, t in self.state_dict().items()})
        sae.metadata, sae.compute_dtype, sae.check_finite = dict(self.metadata), self.compute_dtype, \
            self.check_finite
        return sae


def gather_rows(t: Tensor, shard: LatentShard) -> Tensor:
    """(n, ...) rows of every rank of the latent group → (d_sae, ...) on every rank (uneven slices padded)."""
    if shard.group is None:
        return t
    bounds = D.latent_bounds(shard.d_sae, D.group_size(shard.group))
    most = max(stop - start for start, stop in bounds)
    padded = torch.cat([t, t.new_zeros(most - t.shape[0], *t.shape[1:])]) if t.shape[0] < most else t
    stacked = D.all_gather(padded, shard.group, name="gather_rows").view(len(bounds), most, *t.shape[1:])
    return torch.cat([stacked[r, :stop - start] for r, (start, stop) in enumerate(bounds)])


def gather_sae(model: ShardedSAE) -> SAE:
    """The whole SAE on every rank of the latent group (it must fit in one rank's memory)."""
    tensors = {n: gather_rows(t.detach(), model.shard) if n in model.row_tensors else t.detach().clone()
               for n, t in model.state_dict().items()}
    sae = SAE(model.cfg, device="meta")
    sae.load_tensors({n: t.clone() for n, t in tensors.items()})
    sae.metadata = dict(model.metadata)
    return sae


# ---- files ------------------------------------------------------------------------------------------


def shard_file(rank: int, shards: int) -> str:
    return f"shard-{rank:05d}-of-{shards:05d}.safetensors"


def write_manifest(path: Path, cfg: SAEConfig, metadata: dict, shards: int, extra: dict | None = None) -> None:
    bounds = D.latent_bounds(cfg.d_sae, shards)
    io.write_json(path / MANIFEST, {
        "format_version": FORMAT_VERSION, "kind": KIND, "library": "fastsae", "sae": cfg.to_dict(),
        "metadata": metadata, "shards": [{"file": shard_file(r, shards), "start": a, "stop": b}
                                         for r, (a, b) in enumerate(bounds)], "extra": extra or {}})


def write_sharded(path: str | Path, cfg: SAEConfig, grid: ProcessGrid, rows: dict[str, Tensor],
                  replicated: dict[str, Tensor], metadata: dict | None = None, extra: dict | None = None) -> Path:
    """Collective (every rank calls it): the first data rank of each latent shard writes its rows, rank 0
    the replicated tensors and then, once every shard is on disk, the manifest."""
    path = Path(path)
    if grid.data_rank == 0:
        io.write_tensors(path / shard_file(grid.latent_rank, grid.latent_size), rows)
    if grid.is_main:
        io.write_tensors(path / REPLICATED, replicated)
    if dist.is_initialized() and grid.world_size > 1:
        dist.barrier()
    if grid.is_main:
        write_manifest(path, cfg, metadata or {}, grid.latent_size, extra)
    if dist.is_initialized() and grid.world_size > 1:
        dist.barrier()
    return path


def save_sharded(model: ShardedSAE, path: str | Path, extra: dict | None = None) -> Path:
    """Write model (collective) as a sharded directory."""
    return write_sharded(path, model.cfg, model.grid, model.row_state(), model.replicated_state(),
                         model.metadata, extra)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    meta = io.read_json(path / MANIFEST)
    if meta.get("kind") != KIND:
        raise ValueError(f"{path / MANIFEST}: not a sharded fastsae directory (kind {meta.get('kind')!r}, "
                         f"expected {KIND!r}); a single-process SAE loads with SAE.load")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / MANIFEST}: format_version must be {FORMAT_VERSION}, "
                         f"got {meta.get('format_version')!r}")
    return meta


def read_rows(path: str | Path, manifest: dict, start: int, stop: int, device: str = "cpu") -> dict[str, Tensor]:
    """Rows start:stop of every per-latent tensor, read from whichever shards hold them."""
    path = Path(path)
    pieces: dict[str, list[Tensor]] = {}
    for s in manifest["shards"]:
        lo, hi = max(start, s["start"]), min(stop, s["stop"])
        if lo >= hi:
            continue
        file = path / s["file"]
        if not file.is_file():
            raise FileNotFoundError(f"{file}: shard listed in {path / MANIFEST} is missing")
        with io.open_tensors(file, device=device) as f:  # a bad header or a short file: named
            for name in f.keys():
                sliced = f.get_slice(name)
                if sliced.get_shape()[0] != s["stop"] - s["start"]:
                    raise ValueError(f"{file}: {name!r} has {sliced.get_shape()[0]} rows, the manifest says "
                                     f"{s['stop'] - s['start']}")
                pieces.setdefault(name, []).append(sliced[lo - s["start"]:hi - s["start"]])
    return {name: torch.cat(parts) for name, parts in pieces.items()}


def load_sharded(path: str | Path, grid: ProcessGrid | None = None, device: str | torch.device = "cpu") -> ShardedSAE:
    """This rank's rows of a sharded directory written with any number of shards."""
    path = Path(path)
    meta = read_manifest(path)
    cfg = SAEConfig.from_dict(meta["sae"])
    model = ShardedSAE(cfg, grid, device="meta")
    rows = read_rows(path, meta, model.shard.start, model.shard.stop, device=str(device))
    tensors = {**{n: rows[n] for n in model.row_tensors}, **io.read_tensors(path / REPLICATED, device=str(device))}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{path}: the sharded files lack {missing}")
    model.load_state_dict({n: tensors[n] for n in expected}, assign=True)
    model.metadata = meta.get("metadata", {})
    return model


def consolidate(path: str | Path, out: str | Path | None = None) -> SAE:
    """The single-process SAE of a sharded directory (saved to out when given): needs no process group."""
    sae = load_sharded(path).to_sae()
    if out is not None:
        sae.save(out)
    return sae


def shard_sae(sae: SAE, path: str | Path, shards: int) -> Path:
    """Write a single-process SAE as a sharded directory of `shards` shards (no process group needed)."""
    path = Path(path)
    rows_names = row_tensor_names(sae.cfg)
    state = sae.state_dict()
    for r, (start, stop) in enumerate(D.latent_bounds(sae.cfg.d_sae, shards)):
        io.write_tensors(path / shard_file(r, shards), {n: state[n][start:stop] for n in rows_names})
    io.write_tensors(path / REPLICATED, {n: t for n, t in state.items() if n not in rows_names})
    write_manifest(path, sae.cfg, json.loads(json.dumps(sae.metadata)), shards)
    return path


def sparsity_terms(cfg: SAEConfig, values: Tensor, local: Tensor, window: Tensor | None, threshold: Tensor | None,
                   W_dec: Tensor, group) -> tuple[Tensor | None, Tensor | None]:
    """`sparsity_terms_of` (l1, l0) over the whole latent group, from this rank's compact latents: values,
    local (N, w) indices into this rank's rows, window as the encoder gave it (None: θ not trained), threshold
    and W_dec this rank's rows. The same on every rank of group."""
    if cfg.activation == "jumprelu" and cfg.jumprelu_sparsity == "quadratic":
        if window is None:  # θ not trained here (inference, no_grad): the count itself
            rows = (values > 0).sum(-1).to(accumulation_dtype(values.dtype))
        else:
            rows = StepL0.apply(values, local, window, threshold, cfg.jumprelu_bandwidth)  # (N,) this rank's L0
        l0 = sum_shards(rows, group)  # each row's total L0, before the square
        return None, (2.0 / cfg.k * (l0 - cfg.k) ** 2).mean()  # losses.jumprelu_sparsity's quadratic term
    l1, l0 = sparsity_terms_of(cfg, values, local, window, threshold, W_dec)  # linear in the latents
    return (None if l1 is None else sum_shards(l1, group)), (None if l0 is None else sum_shards(l0, group))
