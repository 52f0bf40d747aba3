"""The ops layer: the same SAE math in three backends, and the dispatch between them.

- ``reference``: dense float64 autograd, the ground truth for tests;
- ``torch``: sparse-aware PyTorch (default off CUDA);
- ``triton``: fused Triton kernels (default on CUDA).

Every backend module offers the same functions on 2-D inputs
(x is already centred by b_dec; W_enc and W_dec are (d_sae, d_in)):

    encode_topk(x, W_enc, b_enc, k)              -> values, indices          (N, k)
    encode_threshold(x, W_enc, b_enc, threshold) -> values, indices          (N, w)
    encode_batchtopk(x, W_enc, b_enc, k)         -> values, indices, tau     (N, w), tau the batch threshold ()
    decode(values, indices, W_dec, b_dec)        -> x_hat                    (N, d_in)
    matryoshka_decode(values, indices, W_dec, b_dec, x, widths)
                                                 -> x_hat (N, d_in), loss (P,) each nested prefix's mse

and the two in-place updates of training (a Triton kernel each on CUDA):

    adam_step(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, rows)
        Adam with bias correction; rows=True keeps param's rows unit-norm (the decoder constraint)
    resample_rows(latents, directions, W_dec, W_enc, b_enc, encoder_scale, state)
        dead latents' rows rewritten from new unit directions, their Adam moments zeroed

`backend_for(device)` gives the module in force; `use_backend(name)` switches all of them at once.

Where each op lives. A backend module holds a function of the op's name for the six ops above; the
other rows are the pieces their backwards are built from. Names are relative: the kernel launcher
`encoder_topk.encoder_topk` is `fastsae.kernels.encoder_topk.encoder_topk` (the file kernels/encoder_topk.py);
variants are functions of kernels/_variants.py (every compiled variant, for tests/ops/test_compile.py);
autograd, torch path, code and reference names are under `fastsae.ops`; tests are files under tests/
(their names are unique there). A dash: there is none. tests/ops/test_op_table.py checks every name.

| op                | kernel                               | variants           | autograd                     |
|-------------------|--------------------------------------|--------------------|------------------------------|
| encode_topk       | encoder_topk.encoder_topk            | topk_variants      | _autograd.SparseEncode       |
| encode_threshold  | encoder_threshold.encoder_threshold  | threshold_variants | _autograd.SparseEncode       |
| encode_batchtopk  | encoder_topk.encoder_topk_candidates | topk_variants      | _autograd.SparseEncode       |
| encode_jumprelu   | encoder_threshold.encoder_threshold  | threshold_variants | jumprelu.ThresholdSTE        |
| decode            | sparse_decode.sparse_decode          | sparse_variants    | triton_backend._SparseDecode |
| matryoshka_decode | prefix_decode.prefix_decode          | prefix_variants    | matryoshka._MatryoshkaDecode |
| decode_value_grad | sparse_decode.sparse_value_grad      | sparse_variants    | triton_backend._SparseDecode |
| gather_rows       | sparse_decode.sparse_decode          | sparse_variants    | _autograd.SparseEncode       |
| segment_sum       | segment_reduce.segment_reduce        | sparse_variants    | _autograd.SparseEncode       |
| linear            | —                                    | —                  | —                            |
| adam_step         | adam.adam_step                       | optimizer_variants | —                            |
| resample_rows     | resample.resample_rows               | optimizer_variants | —                            |
| jumprelu_l0       | —                                    | —                  | jumprelu.StepL0              |

| op                | torch path                     | float64 reference           | tests                           |
|-------------------|--------------------------------|-----------------------------|---------------------------------|
| encode_topk       | torch_backend.encode_topk      | reference.encode_topk       | test_kernels, test_backends     |
| encode_threshold  | torch_backend.encode_threshold | reference.encode_threshold  | test_kernels, test_backends     |
| encode_batchtopk  | torch_backend.encode_batchtopk | reference.encode_batchtopk  | test_kernels, test_backends     |
| encode_jumprelu   | torch_backend.encode_jumprelu  | reference.encode_jumprelu   | test_jumprelu_ste               |
| decode            | torch_backend.decode           | reference.decode            | test_kernels, test_backends     |
| matryoshka_decode | matryoshka.matryoshka_decode   | reference.matryoshka_decode | test_matryoshka                 |
| decode_value_grad | row_select.rows_dot            | reference.decode_value_grad | test_kernels, test_sparse_prims |
| gather_rows       | torch_backend.PRIMS            | reference.gather_rows       | test_kernels, test_sparse_prims |
| segment_sum       | torch_backend.segment_rows_sum | reference.segment_sum       | test_kernels, test_sparse_prims |
| linear            | cpu_gemm.linear                | reference.linear            | test_cpu_gemm                   |
| adam_step         | torch_backend.adam_step        | reference.adam_step         | test_optim                      |
| resample_rows     | torch_backend.resample_rows    | reference.resample_rows     | test_resample                   |
| jumprelu_l0       | jumprelu.StepL0                | reference.jumprelu_loss     | test_jumprelu_ste               |

- matryoshka_decode is the Matryoshka loss's decode (ops/matryoshka.py): every prefix's reconstruction
  error in one pass over the active latents, and a backward that shares the prefixes' work too (suffix sums
  of their residuals), never one (N, d_in) reconstruction per prefix. On Triton one kernel
  (kernels/prefix_decode.py) walks each row's latent-sorted entries and writes x_hat and every prefix's loss;
  the backward is the torch path's (matryoshka._MatryoshkaDecode's, torch ops on the CUDA tensors), and
  float64 inputs take the torch path. Its float64 reference is the naive sum of per-prefix
  dense decodes; `python -m bench.matryoshka` times it against that and its torch.compile.
- decode_value_grad is decode's gradient with respect to its values, <grad[n], W_dec[idx[n, j]]>; the torch
  path's autograd for it and for decode is torch_backend._DecodeRows.
- gather_rows and segment_sum are the two `_autograd.SparsePrims`: the encoders' input gradient, and their
  weight and bias gradients (segment_sum is the decoder's weight gradient too). The torch path's
  gather_rows is the `F.embedding_bag` in torch_backend.PRIMS.
- encode_jumprelu is JumpReLU with θ trained (fastsae/ops/jumprelu.py): the threshold encoder run with θ − ε/2
  (on Triton the fused kernel itself; the torch path where some θ < ε/2) keeps the active latents and the *halo*
  below θ, and the window of slots within ε/2 of θ. SparseEncode gives x's, W_enc's and b_enc's gradients,
  ThresholdSTE θ's (reconstruction), as a latent-sorted sum over the (N, w) slots: no (N, d_sae) tensor and no
  θ kernel. jumprelu_l0 is the L0 term's step (StepL0, in fastsae.losses.jumprelu_sparsity). Their reference is
  the dense estimator: reference.Step and reference.JumpReLU (SAELens's), in reference.jumprelu_loss.
- linear is the torch path's encoder GEMM (oneDNN's fp32 GEMM on CPU; no autograd, F.linear where a
  gradient is asked for).
- Every op also runs inside the whole SAE, forward and every gradient against the reference, in
  tests/modules/test_sae_backends.py (Triton) and tests/ops/test_backends.py (torch), where the
  reference's own gradients are checked against finite differences; tests/ops/test_reference.py checks
  decode's autograd against decode_value_grad and segment_sum.

Under torch.compile, `backend_for` gives fastsae/ops/custom_ops.py instead: the three encoders and decode,
and their backwards (`encode_grads`, the SparseEncode backward; `decode_grads`, the backends' decode
backward, torch_backend.decode_grads and triton_backend.decode_grads), and matryoshka_decode with its
backward (`matryoshka_grads`), as `torch.ops.fastsae` custom ops
that run the backend in force, with fakes for the shapes; tests/modules/test_sae_compile.py checks each
activation compiled against eager.

The latent-sharded ops (`distributed.py`) run the backend's op on each rank's slice of the latents and
join the slices with collectives; their reference is the unsharded op (replicate, which feeds every
rank's encoder the same input, is the identity forward and sums its gradient over the latent group), and
tests/train/test_sharded.py checks them against the unsharded SAE (tests/train/test_sharded_kinds.py: JumpReLU with θ
trained, Matryoshka and transcoders, ops/sharded_terms.py).

| sharded op       | code                         | autograd                      | float64 reference          |
|------------------|------------------------------|-------------------------------|----------------------------|
| replicate        | distributed.replicate        | distributed._Replicate        | —                          |
| encode_topk      | distributed.encode_topk      | distributed._GatherCandidates | reference.encode_topk      |
| encode_batchtopk | distributed.encode_batchtopk | —                             | reference.encode_batchtopk |
| encode_threshold | distributed.encode_threshold | —                             | reference.encode_threshold |
| decode           | distributed.decode           | distributed._SumShards        | reference.decode           |
| encode_jumprelu  | sharded_terms.encode_jumprelu | jumprelu.ThresholdSTE        | reference.encode_jumprelu  |
| decode_prefixes  | sharded_terms.decode_prefixes | distributed._SumShards       | reference.matryoshka_decode |

`decode` here is the checked entry point for latents that come from outside (a user's SparseLatents):
it refuses indices outside [0, d_sae) once, for every backend (the Triton gather would read another
row or out of bounds). Latents the encoders produce are valid by construction and skip the check,
which costs a host sync.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import custom_ops  # registers torch.ops.fastsae
from .backend_choice import (  # noqa: F401 (the package face: fastsae.ops.set_backend etc.)
    BACKENDS,
    backend_module,
    get_backend,
    set_backend,
    triton_available,
    use_backend,
)


def backend_for(device: torch.device) -> ModuleType:
    """The backend module for tensors on device; while torch.compile traces, the same ops registered as
    custom ops (ops/custom_ops.py) that run this backend, since Dynamo cannot trace the backends themselves."""
    name = get_backend(device)
    if name != "reference" and torch.compiler.is_compiling():
        return custom_ops
    return backend_module(name)


def decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """values, indices (N, w), W_dec (d_sae, d_in), b_dec (d_in,) -> (N, d_in), after checking the indices."""
    if indices.dtype not in (torch.int64, torch.int32) or indices.shape != values.shape or indices.dim() != 2:
        raise ValueError(f"decode: indices must be int64 of the values' shape {tuple(values.shape)} (N, w), "
                         f"got {indices.dtype} {tuple(indices.shape)}")
    d_sae = W_dec.shape[0]
    if indices.numel():
        low, high = (int(v) for v in torch.aminmax(indices))
        if low < 0 or high >= d_sae:
            raise ValueError(f"decode: latent indices must be in [0, d_sae={d_sae}), got values in [{low}, {high}]")
    return backend_for(values.device).decode(values, indices.long(), W_dec, b_dec)


def decode_prefixes(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                    x: torch.Tensor, widths: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """decode (x_hat (N, d_in)) of latents the encoders made, and with Matryoshka prefix widths each prefix's
    mse of x (P,) from the same fused pass (ops/matryoshka.py); widths None: (x_hat, None)."""
    backend = backend_for(values.device)
    if widths is None:
        return backend.decode(values, indices, W_dec, b_dec), None
    return backend.matryoshka_decode(values, indices, W_dec, b_dec, x, widths)
