"""Compare two dictionaries by their decoder directions: mean max cosine similarity (MMCS) both ways,
the matched pairs, an optional optimal one-to-one matching, and feature splitting across sizes.

    cmp = compare(sae_a, sae_b, tau=0.9)       # SAEs, baselines, ToyDictionary or (n, d) tensors
    cmp.mmcs_ab, cmp.mmcs_ba                   # mean over A's (B's) directions of the best cosine in B (A)
    cmp.frac_a_matched                         # fraction of A's directions with a match >= tau in B
    cmp.best_ab[i], cmp.max_ab[i]              # A's direction i: its best match in B, and their cosine
    compare(a, b, one_to_one=True).assignment  # optimal one-to-one matching (scipy's linear_sum_assignment)
    splits(cmp, small="a")                     # each feature of the small dictionary and its family in the large

Signs. SAE latents are non-negative, so a decoder row d and its negation -d are different features (one
adds what the other removes): SAEs and the toy's ground truth compare *signed* cosines, and a flipped
copy of a direction does not match it. PCA and ICA directions have arbitrary signs, so a comparison
that involves one uses |cos| (absolute=None decides this; absolute=True forces it for any pair), and
`sign_ab`/`sign_ba` record whether each best match was a flipped one.

Scale. The cosine matrix of two 65,536-latent dictionaries is 16 GiB in fp32; it is never formed. Tiles
of block x block directions (default 4096² fp32 = 64 MiB) are multiplied one at a time, on the GPU
when there is one, and reduced into running row and column maxima, so both directions of the
comparison come out of one pass over the tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# 4096 x 4096 fp32 tile = 64 MiB (twice that with its |cos| copy): small next to any GPU, and on CPU
# large enough that the GEMM, not the per-tile reductions, dominates (bench/compare.py).
BLOCK = 4096
# linear_sum_assignment needs the dense cost matrix in float64: 2^26 entries = 512 MiB (8192 x 8192),
# and its O(n^3) time is about a minute there on one core.
MAX_ASSIGNMENT_ENTRIES = 1 << 26
SIGNLESS_BASELINES = ("pca", "ica")  # decompositions whose directions have arbitrary signs


def directions(d) -> Tensor:
    """A dictionary's directions as unit rows (n, d_in) float32: an SAE's decoder rows, a baseline's
    directions, a ToyDictionary's features, or any (n, d_in) tensor."""
    from ...evaluation.baselines import Decomposition
    from ...sae import SAE
    from ...toy import ToyDictionary

    if isinstance(d, SAE):
        rows = d.W_dec
    elif isinstance(d, Decomposition):
        rows = d.directions
    elif isinstance(d, ToyDictionary):
        rows = d.features
    elif isinstance(d, Tensor):
        rows = d
    else:
        raise TypeError(f"a dictionary must be an SAE, a baseline Decomposition, a ToyDictionary or an (n, d) "
                        f"tensor, got {type(d).__name__}")
    if rows.dim() != 2 or rows.shape[0] == 0:
        raise ValueError(f"dictionary directions must have shape (n >= 1, d_in), got {tuple(rows.shape)}")
    rows = rows.detach().float()
    if not torch.isfinite(rows).all():
        raise ValueError("dictionary directions contain NaN or Inf values")
    norms = rows.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise ValueError(f"dictionary has {int((norms == 0).sum())} zero directions; a cosine needs a norm")
    return rows / norms


def signless(d) -> bool:
    """Whether d's directions have arbitrary signs (PCA, ICA)."""
    from ...evaluation.baselines import Decomposition

    return isinstance(d, Decomposition) and d.name in SIGNLESS_BASELINES


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """The dense float64 reference: cos(a_i, b_j) of shape (n_a, n_b). For small dictionaries and tests."""
    a, b = a.double(), b.double()
    return (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T


def _fold(best: Tensor, arg: Tensor, sign: Tensor, vals: Tensor, idx: Tensor, sgn: Tensor) -> None:
    """Running maxima: keep the earlier candidate on a tie, so the lowest index wins as in a dense scan."""
    better = vals > best
    best.copy_(torch.where(better, vals, best))
    arg.copy_(torch.where(better, idx, arg))
    sign.copy_(torch.where(better, sgn, sign))


@torch.no_grad()
def max_cosines(a: Tensor, b: Tensor, *, absolute: bool = False, block: int = BLOCK,
                device: str | torch.device | None = None) -> tuple[Tensor, ...]:
    """Best match of every row of a among the rows of b and vice versa, in tiles of block x block.

    a (n_a, d), b (n_b, d): unit rows. Returns on the CPU
        max_ab (n_a,) float32, best_ab (n_a,) int64, sign_ab (n_a,) int8,
        max_ba (n_b,) float32, best_ba (n_b,) int64, sign_ba (n_b,) int8
    where max is the largest cos (or |cos| when absolute) and sign that cosine's sign.
    Ties go to the lowest index."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must be (n, d) with the same d, got {tuple(a.shape)} and {tuple(b.shape)}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    a, b = a.to(device, torch.float32), b.to(device, torch.float32)
    n_a, n_b = a.shape[0], b.shape[0]

    def state(n: int) -> tuple[Tensor, Tensor, Tensor]:
        return (torch.full((n,), -math.inf, device=device), torch.zeros(n, dtype=torch.int64, device=device),
                torch.ones(n, dtype=torch.int8, device=device))

    max_ab, best_ab, sign_ab = state(n_a)
    max_ba, best_ba, sign_ba = state(n_b)
    for i in range(0, n_a, block):
        a_blk = a[i:i + block]  # (bi, d)
        for j in range(0, n_b, block):
            cos = a_blk @ b[j:j + block].T  # (bi, bj) fp32
            score = cos.abs() if absolute else cos
            vals, idx = score.max(dim=1)  # (bi,)
            sgn = cos.gather(1, idx[:, None])[:, 0].sign().to(torch.int8)
            _fold(max_ab[i:i + block], best_ab[i:i + block], sign_ab[i:i + block], vals, idx + j, sgn)
            vals, idx = score.max(dim=0)  # (bj,)
            sgn = cos.gather(0, idx[None, :])[0].sign().to(torch.int8)
            _fold(max_ba[j:j + block], best_ba[j:j + block], sign_ba[j:j + block], vals, idx + i, sgn)
    sign_ab[sign_ab == 0] = 1  # an exactly orthogonal best match has no sign to report
    sign_ba[sign_ba == 0] = 1
    return tuple(t.cpu() for t in (max_ab, best_ab, sign_ab, max_ba, best_ba, sign_ba))


@dataclass
class Comparison:
    """The result of compare(a, b): per-direction best matches both ways."""

    max_ab: Tensor  # (n_a,) best cosine of each A direction with any B direction (|cos| when absolute)
    best_ab: Tensor  # (n_a,) int64: which B direction
    sign_ab: Tensor  # (n_a,) int8: the sign of that cosine (-1: matched to a flipped direction)
    max_ba: Tensor  # (n_b,)
    best_ba: Tensor  # (n_b,)
    sign_ba: Tensor  # (n_b,)
    tau: float
    absolute: bool
    assignment: tuple[Tensor, Tensor, Tensor] | None = None  # rows (m,), cols (m,), cos (m,): one-to-one

    @property
    def mmcs_ab(self) -> float:
        """Mean over A's directions of the max cosine with B."""
        return float(self.max_ab.double().mean())

    @property
    def mmcs_ba(self) -> float:
        return float(self.max_ba.double().mean())

    @property
    def frac_a_matched(self) -> float:
        """Fraction of A's directions with a match >= tau in B."""
        return float((self.max_ab >= self.tau).double().mean())

    @property
    def frac_b_matched(self) -> float:
        return float((self.max_ba >= self.tau).double().mean())

    def mutual_pairs(self) -> tuple[Tensor, Tensor, Tensor]:
        """Pairs (i in A, j in B) that are each other's best match: rows (m,), cols (m,), cos (m,)."""
        i = torch.arange(self.best_ab.shape[0])
        mutual = self.best_ba[self.best_ab] == i
        rows = i[mutual]
        return rows, self.best_ab[rows], self.max_ab[rows]

    def summary(self) -> dict:
        rows, _, cos = self.mutual_pairs()
        out = {"n_a": self.max_ab.shape[0], "n_b": self.max_ba.shape[0], "tau": self.tau,
               "cosine": "|cos|" if self.absolute else "signed cos",
               "mmcs_ab": self.mmcs_ab, "mmcs_ba": self.mmcs_ba,
               "frac_a_matched": self.frac_a_matched, "frac_b_matched": self.frac_b_matched,
               "mutual_pairs": int(rows.shape[0]), "mutual_pairs_above_tau": int((cos >= self.tau).sum())}
        if self.absolute:
            out.update(flipped_best_matches_ab=int((self.sign_ab < 0).sum()),
                       flipped_best_matches_ba=int((self.sign_ba < 0).sum()))
        if self.assignment is not None:
            _, _, a_cos = self.assignment
            out.update(one_to_one_pairs=int(a_cos.shape[0]), one_to_one_mean_cos=float(a_cos.double().mean()),
                       one_to_one_above_tau=int((a_cos >= self.tau).sum()))
        return out


def one_to_one(a: Tensor, b: Tensor, absolute: bool = False, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """The matching of A's directions to distinct B directions with the largest total cosine (min(n_a, n_b)
    pairs), by scipy's linear_sum_assignment on the dense matrix: for dictionaries up to ~8192 each."""
    if a.shape[0] * b.shape[0] > MAX_ASSIGNMENT_ENTRIES:
        raise ValueError(f"one_to_one: {a.shape[0]} x {b.shape[0]} directions exceed the dense matching limit of "
                         f"{MAX_ASSIGNMENT_ENTRIES:,} pairs; use the best-match comparison (one_to_one=False)")
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as err:
        raise ImportError("one_to_one matching needs scipy: pip install 'fastsae[eval]'") from err
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cos = (a.to(device, torch.float32) @ b.to(device, torch.float32).T).cpu().double()  # (n_a, n_b)
    score = cos.abs() if absolute else cos
    rows, cols = linear_sum_assignment(score.numpy(), maximize=True)
    rows, cols = torch.from_numpy(rows), torch.from_numpy(cols)
    return rows, cols, score[rows, cols].float()


def compare(a, b, *, tau: float = 0.9, absolute: bool | None = None, one_to_one_matching: bool = False,
            block: int = BLOCK, device: str | torch.device | None = None) -> Comparison:
    """Compare dictionaries a and b (SAEs, baselines, ToyDictionary, or (n, d) tensors of directions).
    absolute=None: |cos| if either is a sign-free basis (PCA/ICA), else signed (see the module docstring)."""
    if not 0 <= tau <= 1:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    absolute = (signless(a) or signless(b)) if absolute is None else absolute
    da, db = directions(a), directions(b)
    if da.shape[1] != db.shape[1]:
        raise ValueError(f"the dictionaries live in different spaces: d_in {da.shape[1]} vs {db.shape[1]}")
    result = Comparison(*max_cosines(da, db, absolute=absolute, block=block, device=device), tau=tau,
                        absolute=absolute)
    if one_to_one_matching:
        result.assignment = one_to_one(da, db, absolute, device)
    return result


def splits(cmp: Comparison, small: str = "a", tau: float = 0.5) -> list[dict]:
    """Feature splitting: each direction of the small dictionary with its family in the large one, the large
    directions whose best match (in the small dictionary) it is, with cosine >= tau, best first.

    tau = 0.5 is far above chance: two random unit vectors in d = 640 have cos ~ N(0, 1/640), so even the
    best of 65,536 random candidates sits near 4.5 / sqrt(640) = 0.18.
    Returns [{"feature": i, "children": [j, ...], "cos": [c, ...]}] for every small direction."""
    if small not in ("a", "b"):
        raise ValueError(f"small must be 'a' or 'b', got {small!r}")
    parent_of, cos = (cmp.best_ba, cmp.max_ba) if small == "a" else (cmp.best_ab, cmp.max_ab)
    n_small = (cmp.max_ab if small == "a" else cmp.max_ba).shape[0]
    keep = (cos >= tau).nonzero().squeeze(1)  # large directions close to some small one
    order = keep[torch.argsort(cos[keep], descending=True, stable=True)]
    families: list[dict] = [{"feature": i, "children": [], "cos": []} for i in range(n_small)]
    for j, parent, c in zip(order.tolist(), parent_of[order].tolist(), cos[order].tolist(), strict=True):
        families[parent]["children"].append(j)
        families[parent]["cos"].append(round(c, 4))
    return families
