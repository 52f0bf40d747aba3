"""Per-row primitives of the torch backend on CPU, below both of its selection paths (torch_backend's fp32 one
and screened_topk's bf16 screen): the two-level top-k, the packing of a row's entries side by side, and the
per-entry dot products <grad[n], W[indices[n, j]]> (decode's value gradient, the screen's rescore)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def rows_dot(grad: Tensor, indices: Tensor, W: Tensor) -> Tensor:
    """out[n, j] = <grad[n], W[indices[n, j]]>: (N, d), (N, w), (d_sae, d) -> (N, w) in W's dtype.

    embedding_bag's per-sample-weight gradient is exactly this, one dot per entry with no (N, w, d) gather
    (5x faster than gathering the rows for a bmm at N 2048, k 32, d 768). The entries go latent by latent,
    so each row of W is read once for all the batch rows that use it while grad (N, d) stays in cache: 2.2x
    faster than batch order, sort included, on the AMD EPYC (13.6 -> 6.2 ms on 2 cores at that shape,
    bench/cpu_parts.py); on the Intel Xeon batch order is the faster, 9.0 against 11.8 ms
    (bench/results/training/cpu-parts-2026-12-06.md), a difference left unchosen for now.
    Every dot is the same sum in the same order whatever the entry order, so the result is too."""
    n, w = indices.shape
    flat = indices.reshape(-1)
    entries = torch.argsort(flat, stable=True)  # (N·w,) flat positions, latent-major
    counts = torch.bincount(flat, minlength=W.shape[0])
    starts = torch.cumsum(counts, 0) - counts  # (d_sae,) where each latent's entries begin
    # the op's "bags" are the latents (rows of W) and its "embedding table" is grad: dot(W[bag], grad[row])
    dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        W, grad.to(W.dtype).contiguous(), entries // w, starts, flat[entries], 0, -1)
    return torch.empty_like(dots).index_copy_(0, entries, dots).view(n, w)


TOPK_GROUP = 32  # columns per group in the two-level top-k


def topk_rows(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk(pre, k, dim=1) of (N, d) pre-activations: the same values, sorted descending (which of
    several equal entries is chosen may differ). On CPU, for d a multiple of TOPK_GROUP with at least 4k
    groups, two-level (`two_level_topk`); elsewhere torch.topk itself (on CUDA a radix select)."""
    n, d = pre.shape
    if pre.device.type != "cpu" or d % TOPK_GROUP or d // TOPK_GROUP < 4 * k or not pre.is_contiguous():
        return torch.topk(pre, k, dim=1)
    return two_level_topk(pre, k, TOPK_GROUP)


def two_level_topk(pre: Tensor, k: int, group: int) -> tuple[Tensor, Tensor]:
    """Top k of each row of (N, d) contiguous pre, d a multiple of group, looking only in k groups per row.

    The k groups of largest maximum hold every top-k entry: their maxima are k entries, so the k-th largest
    entry is >= the least of them, `floor`, and an entry >= floor lies in a group whose max is >= floor. So the
    top k of those k·group candidates, after dropping those below floor (~k are left on real data), are the
    row's top k. One pass of group maxima, a top-k over d/group of them and a gather cost half of torch.topk's
    pass over every entry at N 2048, d 16384, k 32 (14.9 against 27.8 ms on 2 cores, bench/cpu_parts.py).
    Any partition into groups will do. In fp32 a group is a run of `group` columns. In bf16 (the screen of
    ops/screened_topk.py) it is the strided columns j, j + d/group, ..., whose maxima are an elementwise max of
    `group` slices: 11.8 against 38.8 ms for runs at that shape, where torch reduces bf16 runs slowly
    (bench/results/training/cpu-parts-screen-2026-12-06).
    A row with NaN (torch.topk ranks it above everything) goes through torch.topk."""
    n, d = pre.shape
    n_groups = d // group
    strided = pre.dtype == torch.bfloat16
    maxima = pre.view(n, group, n_groups).amax(1) if strided else pre.view(n, n_groups, group).amax(2)
    best, chosen = torch.topk(maxima, k, dim=1, sorted=False)  # (N, k) the k groups of largest max
    floor = best.amin(1, keepdim=True)  # (N, 1) <= the k-th largest entry
    if torch.isnan(floor).any():
        return torch.topk(pre, k, dim=1)
    candidates, column = (_strided_members if strided else _run_members)(pre, chosen, group)  # (N, k·group)
    rows, slots = (candidates >= floor).nonzero(as_tuple=True)  # row-major; >= k per row
    # the survivors side by side, padded with -inf so that they are never chosen over a survivor
    kept, columns = _pack_rows(n, rows, candidates[rows, slots], column(rows, slots), float("-inf"))
    values, at = torch.topk(kept, k, dim=1)
    return values, columns.gather(1, at)


def _run_members(pre: Tensor, chosen: Tensor, group: int) -> tuple[Tensor, Callable]:
    """The entries of each row's chosen groups of `group` adjacent columns, and slot -> column."""
    n, d = pre.shape
    first = chosen + torch.arange(0, n * d, d, device=pre.device).unsqueeze(1) // group  # rows of (N·d/group, group)
    candidates = pre.view(-1, group).index_select(0, first.view(-1)).view(n, -1)
    return candidates, lambda rows, slots: chosen[rows, slots // group] * group + slots % group


def _strided_members(pre: Tensor, chosen: Tensor, group: int) -> tuple[Tensor, Callable]:
    """The entries of each row's chosen strided groups (group j: columns j + t·d/group), and slot -> column."""
    n, d = pre.shape
    k = chosen.shape[1]
    candidates = pre.view(n, group, d // group).gather(2, chosen.unsqueeze(1).expand(n, group, k)).view(n, -1)
    return candidates, lambda rows, slots: (slots // k) * (d // group) + chosen[rows, slots % k]


def _pack_rows(n: int, rows: Tensor, values: Tensor, columns: Tensor, pad: float) -> tuple[Tensor, Tensor]:
    """Entries (row, value, column), row-major, as (N, width) values and columns, each row's entries side by side
    in their order: width = the most any row has (at least 1); the rest of a row is pad and column 0."""
    counts = torch.bincount(rows, minlength=n)
    width = max(1, int(counts.max())) if rows.numel() else 1
    place = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    packed = values.new_full((n, width), pad)
    packed[rows, place] = values
    packed_columns = torch.zeros(n, width, dtype=torch.int64, device=rows.device)
    packed_columns[rows, place] = columns
    return packed, packed_columns
