"""`SAE`: the public, drop-in `nn.Module`.

    z     = act(W_enc (x - b_dec) + b_enc)      act: relu | topk | batchtopk | jumprelu
    x_hat = W_dec z + b_dec                     transcoders: predict y, another site (fastsae/transcoder.py)

Both weights are stored (d_sae, d_in), one row per latent: the sparse kernels gather and update whole latent
rows, and a tied SAE simply uses W_dec as its encoder. `fastsae.interop` converts to other libraries' layouts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import interop, io, ops, transcoder
from .config import DTYPES, SAEConfig
from .latents import SparseLatents, nonzero_entries
from .losses import LossCoefficients, accumulation_dtype, loss_terms, mse, sparsity_terms
from .ops import backend_for

# 2: cfg.json records the SHA-256 of sae.safetensors, which load() verifies. 1 (no checksum) is still read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
ACCEPTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# AuxK on CPU reconstructs the residual densely, through the (N, n_dead) pre-activations, while n_dead is at most
# this many times k_aux: its k_aux (d_in / 2 by default) is ten times the SAE's k, and the sparse path's gathers
# and sorts over N·k_aux entries cost more than dense GEMMs over that few columns. On 2 Xeon cores (N 4,096, d_in 640,
# k_aux 320; a session's scratch timing, not a committed benchmark) the two paths tied near 25·k_aux dead latents;
# 16 stays below that
DENSE_AUXK_WIDTH = 16


def dense_topk_decode(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, k: int) -> Tensor:
    """relu(top-k of x W_enc^T + b_enc per row, the rest 0) W_dec, dense, by autograd: (N, d_in) -> (N, d_in)."""
    pre = torch.addmm(b_enc, x, W_enc.T)  # (N, n)
    if k < pre.shape[1]:
        values, columns = pre.topk(k, dim=1, sorted=False)
        pre = torch.zeros_like(pre).scatter(1, columns, values)
    return pre.relu() @ W_dec


@dataclass
class SAEOutput:
    x_hat: Tensor  # (*lead, d_in)
    latents: SparseLatents  # (*lead, w)
    mse: Tensor  # scalar: mean over rows of Σ_d (x - x_hat)²
    l1: Tensor | None  # scalar: mean over rows of Σ_i z_i·w_i, w_i = ||W_dec[i]|| or 1 (relu/jumprelu)
    auxk: Tensor | None  # scalar: AuxK loss (TopK SAEs trained with dead-latent revival)
    loss: Tensor  # scalar: fastsae.losses.loss_terms with the coefficients forward was given
    kl: Tensor | None = None  # scalar: KL(clean || spliced), when forward was given a kl term
    threshold: Tensor | None = None  # (): BatchTopK in training, this batch's threshold (the trainer averages it)
    prefix_mse: Tensor | None = None  # (P,): a Matryoshka SAE's mse per prefix (its loss takes their mean)
    l0: Tensor | None = None  # scalar: JumpReLU's sparsity term (cfg.jumprelu_sparsity), weighted by l1_coefficient


def encode_flat(cfg: SAEConfig, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                threshold: Tensor | None = None, training: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """x (N, d_in) → values, indices (N, w), and BatchTopK's batch threshold in training, JumpReLU's window (N, w)
    when θ is trained (ops/jumprelu.py; latents then hold the halo, value 0), else None. Backend in force."""
    ops = backend_for(x.device)
    if cfg.apply_b_dec_to_input:
        x = x - b_dec
    if cfg.activation == "topk":
        return (*ops.encode_topk(x, W_enc, b_enc, cfg.k), None)
    if cfg.activation == "relu":
        return (*ops.encode_threshold(x, W_enc, b_enc, None), None)
    if cfg.activation == "jumprelu":
        if threshold is not None and threshold.requires_grad and torch.is_grad_enabled():
            return ops.encode_jumprelu(x, W_enc, b_enc, threshold, cfg.jumprelu_bandwidth)
        return (*ops.encode_threshold(x, W_enc, b_enc, threshold), None)
    # batchtopk: the batch's top N·k while training; at inference the learnt threshold makes rows independent.
    if not training:
        return (*ops.encode_threshold(x, W_enc, b_enc, threshold.expand(cfg.d_sae).contiguous()), None)
    return ops.encode_batchtopk(x, W_enc, b_enc, cfg.k)


class SAEWeights(nn.Module):
    """What `SAE` and `fastsae.train.sharded.ShardedSAE` share: the config and flags, the parameters of
    some rows of latents (`init_parameters`), weights in the compute dtype, the input checks, and the
    decoder constraint and input-scale folding, which act on whole latent rows and so on any slice of them."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"cfg must be a fastsae.SAEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        # Check inputs for NaN/Inf on every call (one pass over x); turn off for speed once a pipeline is trusted.
        self.check_finite = True
        # Mixed precision: None computes in the weights' dtype; bfloat16 keeps fp32 master weights
        # but takes bf16 inputs and runs the GEMMs and gathers on bf16 copies (fp32 accumulation).
        self.compute_dtype: torch.dtype | None = None
        # Provenance saved with the weights (model, site, store, folded input scale): JSON-able values.
        self.metadata: dict = {}

    def init_parameters(self, W: Tensor) -> None:
        """Register the parameters of W's rows of latents, on W's device: W (n, d_in), the initial decoder
        rows, is also the initial encoder (untied); biases start at 0, a JumpReLU threshold at
        cfg.jumprelu_threshold."""
        cfg, n, dtype, device = self.cfg, W.shape[0], self.cfg.torch_dtype, W.device
        self.W_dec = nn.Parameter(W.to(dtype))  # (n, d_in)
        if not cfg.tied:
            self.W_enc = nn.Parameter(W.to(dtype).clone())  # (n, d_in)
        self.b_enc = nn.Parameter(torch.zeros(n, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dtype))
        if cfg.activation == "jumprelu":  # per latent, trained by its straight-through estimator (ops/jumprelu.py)
            self.threshold = nn.Parameter(torch.full((n,), cfg.jumprelu_threshold, device=device, dtype=torch.float32),
                                          requires_grad=cfg.jumprelu_sparsity != "l1")  # "l1": θ frozen
        elif cfg.activation == "batchtopk":
            self.register_buffer("threshold", torch.zeros((), device=device, dtype=torch.float32))
        if cfg.kind == "skip_transcoder":  # (d_in, d_in), zero
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_in, device=device, dtype=dtype))

    def __getattr__(self, name: str):
        if name == "W_enc" and self.cfg.tied:
            return self.W_dec
        return super().__getattr__(name)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype inputs must have: compute_dtype when set, else the weights'."""
        return self.compute_dtype or self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def cast(self, t: Tensor) -> Tensor:
        """A weight in the compute dtype (a differentiable cast under mixed precision)."""
        return t if self.compute_dtype is None or t.dtype == self.compute_dtype else t.to(self.compute_dtype)

    def flatten_input(self, x: Tensor) -> tuple[Tensor, torch.Size]:
        """x (*lead, d_in), checked (type, width, dtype, device, finite) → (N, d_in) and lead."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        d_in = self.cfg.d_in
        if x.dim() < 1 or x.shape[-1] != d_in:
            raise ValueError(f"x must have shape (..., d_in={d_in}), got {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"x must hold at least one row, got shape {tuple(x.shape)}")
        if x.dtype not in ACCEPTED_DTYPES:
            raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
        if x.dtype != self.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the SAE computes in {self.dtype}: "
                            f"cast one to the other (x.to(sae.dtype) or sae.to({x.dtype}))")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the SAE is on {self.device}: move one to the other")
        if self.check_finite and not torch.isfinite(x).all():
            raise ValueError("x contains NaN or Inf values")
        return x.reshape(-1, d_in), x.shape[:-1]

    # ---- the decoder-norm constraint ----------------------------------------------------------------

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit norm."""
        W = self.W_dec
        norms = torch.linalg.vector_norm(W, dim=1, keepdim=True, dtype=torch.float32)  # (d_sae, 1), no fp32 copy
        W.div_(norms.clamp_min_(torch.finfo(torch.float32).tiny).to(W.dtype))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Drop the component of each decoder row's gradient along that (unit) row, so Adam moves it on the sphere."""
        W, g = self.W_dec, self.W_dec.grad
        if g is None:
            return
        if g.dtype == W.dtype == torch.float32:  # one dot per row and one in-place pass, no (d_sae, d_in) temporary
            # linalg.vecdot multiplies into a temporary of its inputs' size before summing: a block of rows at
            # a time keeps that temporary in cache (4 MB). Dots and update: 5.0 ms on 2 CPU cores at d_sae 16384,
            # d_in 768, against 7.0 ms in one go and 7.3 ms as bmm products (bench/cpu_parts.py)
            parallel = torch.empty(W.shape[0], 1, dtype=W.dtype, device=W.device)  # (d_sae, 1)
            block = max(1, (1 << 20) // W.shape[1]) if W.device.type == "cpu" else W.shape[0]
            for start in range(0, W.shape[0], block):
                torch.linalg.vecdot(g[start:start + block], W[start:start + block], dim=1,
                                    out=parallel[start:start + block, 0])
            g.addcmul_(parallel, W, value=-1.0)
            return
        parallel = (g.float() * W.float()).sum(1, keepdim=True)  # (d_sae, 1)
        g.sub_((parallel * W.float()).to(g.dtype))

    @torch.no_grad()
    def fold_input_scale_(self, scale: float, output_scale: float | None = None) -> SAEWeights:
        """An SAE trained on inputs multiplied by scale becomes one that takes raw inputs, exactly:
        act(W_enc(s·x - b_dec) + b_enc) = act((s·W_enc)(x - b_dec/s) + b_enc) and x_hat/s = (W_dec/s) z + b_dec/s.
        Latent values are unchanged; decoder rows end with norm 1/s (as in SAELens's folding). A transcoder
        trained on targets multiplied by output_scale (default scale) folds each where it acts."""
        if not (scale > 0 and scale < float("inf")):
            raise ValueError(f"scale must be finite and > 0, got {scale}")
        if self.cfg.tied:
            raise ValueError("fold_input_scale_: a tied SAE cannot scale its encoder and decoder apart")
        if self.cfg.kind not in ("sae", "crosscoder") or output_scale is not None:
            return transcoder.fold_scales_(self, scale, output_scale)
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)
        self.metadata["input_scale_folded"] = self.metadata.get("input_scale_folded", 1.0) * scale
        return self


class SAE(SAEWeights):
    def __init__(self, cfg: SAEConfig, *, device: torch.device | str | None = None, seed: int | None = None):
        super().__init__(cfg)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "meta":  # shapes only: load() fills the values in
            W = torch.empty(cfg.d_sae, cfg.d_in, device=device)
        else:
            # Decoder rows are random unit vectors, the encoder starts as the
            # decoder's transpose (Conerly et al. 2024; Gao et al. 2024).
            gen = torch.Generator(device=device)
            gen.manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
            W = torch.randn(cfg.d_sae, cfg.d_in, device=device, generator=gen)
            W /= W.norm(dim=1, keepdim=True)
        self.init_parameters(W)

    # ---- forward -----------------------------------------------------------------------------------

    def encode(self, x: Tensor) -> SparseLatents:
        """(*lead, d_in) → SparseLatents with values/indices of shape (*lead, w)."""
        x2, lead = self.flatten_input(x)
        values, indices, _ = self._encode_flat(x2)
        return SparseLatents(values, indices, self.cfg.d_sae).reshape(*lead)

    def decode(self, latents: SparseLatents | Tensor) -> Tensor:
        """SparseLatents (*lead, w), or dense activations (*lead, d_sae) → x_hat (*lead, d_in).

        Exactly z @ W_dec + b_dec, for any z: decoding is linear in the values, so negative entries
        (a steering or erasure edit) decode as written, never dropped. Dense z is decoded from its non-zero
        entries; when it requires grad, as the dense product, so that every entry gets its gradient.
        Indices outside [0, d_sae) are refused on every backend."""
        if isinstance(latents, Tensor):
            if latents.dim() < 1 or latents.shape[-1] != self.cfg.d_sae:
                raise ValueError(f"decode: dense latents must have shape (..., d_sae={self.cfg.d_sae}), "
                                 f"got {tuple(latents.shape)}")
            if latents.requires_grad:  # (*lead, d_sae) @ (d_sae, d_in), accumulated in fp32
                return latents.to(self.dtype) @ self.cast(self.W_dec) + self.cast(self.b_dec)
            values, indices = nonzero_entries(latents)
        elif isinstance(latents, SparseLatents):
            if latents.d_sae != self.cfg.d_sae:
                raise ValueError(f"decode: latents have d_sae={latents.d_sae}, this SAE has d_sae={self.cfg.d_sae}")
            values, indices = latents.values, latents.indices
        else:
            raise TypeError(f"decode: latents must be SparseLatents or a Tensor, got {type(latents).__name__}")
        lead, w = values.shape[:-1], values.shape[-1]
        values = values.reshape(-1, w).to(self.dtype)
        x_hat = ops.decode(values, indices.reshape(-1, w), self.cast(self.W_dec), self.cast(self.b_dec))
        return x_hat.reshape(*lead, self.cfg.d_in)

    def forward(self, x: Tensor, *, target: Tensor | None = None, dead_mask: Tensor | None = None,
                k_aux: int | None = None, coefficients: LossCoefficients | None = None,
                kl: Callable[[Tensor], Tensor] | None = None) -> SAEOutput:
        """Reconstruction and loss terms; loss = fastsae.losses.loss_terms(coefficients), by default mse +
        cfg.l1_coefficient · l1 (jumprelu: · l0). With dead_mask (d_sae,) bool, TopK/BatchTopK SAEs also compute
        AuxK (Gao et al. 2024): the top k_aux (default d_in // 2) dead latents reconstruct the detached residual x -
        x_hat. kl: a function of x_hat (*lead, d_in) giving a KL term (a SpliceKL's). target: a transcoder's y."""
        if k_aux is not None and (isinstance(k_aux, bool) or not isinstance(k_aux, int)
                                  or not 1 <= k_aux <= self.cfg.d_sae):
            raise ValueError(f"k_aux must be None or an int in [1, d_sae={self.cfg.d_sae}], got {k_aux!r}")
        x2, y2, lead = transcoder.flatten_pair(self, x, target)  # (N, d_in) each; y2 is x2 for an SAE
        values, indices, extra = self._encode_flat(x2)
        x_hat, prefix_mse = transcoder.decode_with_skip(self, values, indices, x2, y2)  # (N, d_in), (P,) | None
        l1, l0 = sparsity_terms(self.cfg, values, indices, extra, getattr(self, "threshold", None), self.W_dec)
        auxk = (self._auxk(x2, y2 - x_hat, dead_mask, k_aux, accumulation_dtype(x2.dtype))
                if dead_mask is not None and self.cfg.activation in ("topk", "batchtopk") else None)
        kl_term = None if kl is None else (lambda x_hat: kl(x_hat.reshape(*lead, self.cfg.d_in)))
        terms = loss_terms(y2, x_hat, coefficients or LossCoefficients(l1=self.cfg.l1_coefficient), l1=l1,
                           auxk=auxk, kl=kl_term, prefix_mse=prefix_mse, l0=l0)
        latents = SparseLatents(values, indices, self.cfg.d_sae).reshape(*lead)
        tau = extra if self.cfg.activation == "batchtopk" else None
        return SAEOutput(x_hat.reshape(x.shape), latents, terms.mse, l1, auxk, terms.loss, terms.kl, tau, prefix_mse,
                         l0)

    def skip(self, x: Tensor) -> Tensor:
        """A skip transcoder's skip term W_skip x: (*lead, d_in) -> (*lead, d_in)."""
        return transcoder.skip_term(self, x)

    def _auxk(self, x: Tensor, residual: Tensor, dead_mask: Tensor, k_aux: int | None, acc: torch.dtype) -> Tensor:
        if dead_mask.shape != (self.cfg.d_sae,) or dead_mask.dtype != torch.bool:
            raise ValueError(f"dead_mask must be a bool tensor of shape ({self.cfg.d_sae},), "
                             f"got {dead_mask.dtype} {tuple(dead_mask.shape)}")
        dead = dead_mask.nonzero().squeeze(1)  # (n_dead,)
        if dead.numel() == 0:
            return residual.new_zeros((), dtype=acc)
        k_aux = min(k_aux if k_aux is not None else max(1, self.cfg.d_in // 2), dead.numel())
        x_c = x - self.cast(self.b_dec) if self.cfg.apply_b_dec_to_input else x
        W_enc, b_enc = self.cast(self.W_enc[dead]), self.cast(self.b_enc[dead])
        if x.device.type == "cpu" and dead.numel() <= DENSE_AUXK_WIDTH * k_aux:
            e_hat = dense_topk_decode(x_c, W_enc, b_enc, self.cast(self.W_dec[dead]), k_aux)
            return mse(residual.detach(), e_hat)
        ops = backend_for(x.device)
        # The same fused TopK, over the dead latents' rows only: no dense (N, d_sae) top-k.
        values, slots = ops.encode_topk(x_c, W_enc, b_enc, k_aux)
        no_bias = torch.zeros_like(self.cast(self.b_dec))  # the residual has no b_dec to add back
        e_hat = ops.decode(values, dead[slots], self.cast(self.W_dec), no_bias)
        return mse(residual.detach(), e_hat)  # residual: target - x_hat

    def _encode_flat(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(N, d_in) → values, indices (N, w), and BatchTopK's batch threshold in training."""
        return encode_flat(self.cfg, x, self.cast(self.W_enc), self.cast(self.b_enc), self.cast(self.b_dec),
                           getattr(self, "threshold", None), self.training)

    def _decode_flat(self, values: Tensor, indices: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return ops.decode_prefixes(values, indices, self.cast(self.W_dec), self.cast(self.b_dec), x,
                                   self.cfg.matryoshka_widths)

    def _apply(self, fn, recurse=True):
        """`sae.to(torch.bfloat16)` and friends: cfg.dtype follows the weights (a new config object, since
        one may be shared between SAEs). float64 (the tests' reference copies) has no cfg.dtype: kept."""
        out = super()._apply(fn, recurse)
        name = _DTYPE_NAMES.get(self.W_dec.dtype)
        if name is not None and name != self.cfg.dtype:
            self.cfg = dataclasses.replace(self.cfg, dtype=name)
        return out

    # ---- files --------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the SAE as directory path: `sae.safetensors` and `cfg.json` (format_version, the config,
        metadata, and the SHA-256 of the weights, which load() verifies). The directory is built aside and
        swapped in whole (io.replace_directory): a kill leaves the old SAE or the new one, never one's
        weights beside the other's config. An existing path may hold only an SAE's two files."""
        path = Path(path)
        if self.W_dec.dtype != self.cfg.torch_dtype:
            raise ValueError(f"save: the weights are {self.W_dec.dtype}, which SAEConfig.dtype cannot record "
                             f"({tuple(DTYPES)}): cast the SAE to one of them first")
        # Thresholds are float32 whatever the weights (sae.to(bf16) casts them too; bf16 -> fp32 is exact).
        tensors = {k: v.float() if k == "threshold" else v for k, v in self.state_dict().items()}
        problem = _threshold_problem(tensors.get("threshold"))
        if problem:
            raise ValueError(f"save: {problem}")
        header = {"format_version": FORMAT_VERSION, "library": "fastsae", **self.cfg.to_dict(),
                  "metadata": self.metadata}

        def write(tmp: Path) -> None:
            io.write_tensors(tmp / WEIGHTS_FILE, tensors, metadata={"format_version": str(FORMAT_VERSION)})
            io.write_json(tmp / CONFIG_FILE, {**header, "weights_sha256": io.sha256(tmp / WEIGHTS_FILE)})

        return io.replace_directory(path, write, allowed=(CONFIG_FILE, WEIGHTS_FILE))

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", verify: bool = True) -> SAE:
        """An SAE saved by save(); or one saved by SAELens or EleutherAI's sparsify, detected by its files
        and read by fastsae.interop. verify=False skips the weights' checksum (a full read of the file).

        In eval mode, as transformers' from_pretrained gives a model: a BatchTopK SAE then encodes each row by
        its learnt threshold, not by the batch's top N·k, which in a batch with BOS rows of huge norm left the
        other tokens a quarter of their latents (the trainer switches to train mode for its steps)."""
        path = Path(path)
        cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not cfg_path.is_file() and path.is_dir():
            held = sorted(p.name for p in path.iterdir() if (p / CONFIG_FILE).is_file())
            if held:  # e.g. a sparsify run directory: one SAE per hook point
                raise FileNotFoundError(f"{path} has no {CONFIG_FILE}; it holds SAEs in {held}: "
                                        f"load one of them, e.g. SAE.load({str(path / held[0])!r})")
        meta = io.read_json(cfg_path)
        if "format_version" not in meta:
            return cls.from_tensors(*interop.read_other_library(path, meta, str(device))).eval()
        version = meta.pop("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"{cfg_path}: format_version must be one of {READABLE_VERSIONS}, got {version!r} "
                             f"(saved by a newer fastsae?)")
        meta.pop("library", None)
        metadata = meta.pop("metadata", {})
        checksum = meta.pop("weights_sha256", None)
        if not isinstance(metadata, dict):
            raise io.CorruptFileError(cfg_path, f"field 'metadata' must be a JSON object, got {metadata!r}")
        if version >= 2 and not isinstance(checksum, str):
            raise io.CorruptFileError(cfg_path, f"field 'weights_sha256' must be a string, got {checksum!r}")
        try:
            cfg = SAEConfig.from_dict(meta)
        except (TypeError, ValueError) as err:
            raise io.CorruptFileError(cfg_path, str(err)) from None
        if checksum is not None and verify and weights_path.is_file():
            io.verify_sha256(weights_path, checksum, cfg_path)
        sae = cls(cfg, device="meta")
        sae.metadata = metadata
        tensors = io.read_tensors(weights_path, device=str(device))
        problem = sae._tensor_problem(tensors)
        if problem:
            raise io.CorruptFileError(weights_path, f"{problem} (for the config in {cfg_path})")
        sae.load_state_dict(tensors, assign=True)
        return sae.eval()

    @classmethod
    def from_tensors(cls, cfg: SAEConfig, tensors: dict[str, Tensor], metadata: dict | None = None,
                     source: object = "tensors") -> SAE:
        """An SAE holding tensors (its state_dict, on any device): what `fastsae.interop.read_saelens`
        and `read_sparsify` return becomes an SAE as `SAE.from_tensors(*read_saelens(path))`."""
        sae = cls(cfg, device="meta")
        sae.metadata = dict(metadata or {})
        sae.load_tensors(tensors, source=source)
        return sae

    def load_tensors(self, tensors: dict[str, Tensor], source: object = "tensors") -> None:
        """Replace this SAE's tensors, refusing any missing, extra, misshapen or wrongly typed one."""
        problem = self._tensor_problem(tensors)
        if problem:
            raise ValueError(f"{source}: {problem}")
        self.load_state_dict(tensors, assign=True)

    def _tensor_problem(self, tensors: dict[str, Tensor]) -> str | None:
        """What is wrong with tensors as this SAE's state_dict, or None."""
        expected = self.state_dict()
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            return f"expected tensors {sorted(expected)}; missing {missing}, unexpected {extra}"
        for name, want in expected.items():
            got = tensors[name]
            if got.shape != want.shape or got.dtype != want.dtype:
                return f"tensor {name!r} must be {tuple(want.shape)} {want.dtype}, got {tuple(got.shape)} {got.dtype}"
        return _threshold_problem(tensors.get("threshold"))


def _threshold_problem(theta: Tensor | None) -> str | None:
    ok = theta is None or theta.device.type == "meta" or bool(torch.isfinite(theta).all() and (theta >= 0).all())
    return None if ok else "tensor 'threshold' must be finite and >= 0"

