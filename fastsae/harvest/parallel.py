"""The layout and merging of a store harvested by several processes (`torchrun ... -m fastsae harvest`,
`harvester.harvest_parallel`); this module runs no model.

Rank r of W harvests the contiguous range r of the windows (`window_range`) into a store of its own,

    store/parts/rank-00001-of-00002/    manifest.json, shard-*.safetensors   (an ordinary store)

with the windows' global indices in its `sequence` column, so each part resumes by itself exactly as
a single-process harvest does (a killed rank loses nothing committed; the others' parts are untouched).
When every part is complete, the store's own manifest merges them: the parts' shards are hard-linked
into the store under one numbering (rank order; no data is copied) and their rows, norm sums and
windows added up. The merged store holds the same (window, position) vectors as a single-process
harvest of the same windows, in other shards.

A store harvested by W processes resumes with W processes; another count is refused (the parts are
ranges of W).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import Tensor

from .. import io
from .store import MANIFEST, ActivationStore

PARTS = "parts"
_SAME = ("model", "sites", "dtype", "context_size", "excluded_token_ids")


def window_range(n_windows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank's contiguous [lo, hi) of n_windows, the first n_windows % world_size ranks one longer."""
    base, extra = divmod(n_windows, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def part_dir(out: str | Path, rank: int, world_size: int) -> Path:
    return Path(out) / PARTS / f"rank-{rank:05d}-of-{world_size:05d}"


def check_world(out: Path, world_size: int) -> None:
    """Refuse out when its parts were harvested by another number of processes."""
    found = sorted(p.name for p in (out / PARTS).glob("rank-*")) if (out / PARTS).is_dir() else []
    other = [name for name in found if not name.endswith(f"-of-{world_size:05d}")]
    if other:
        raise ValueError(f"{out} was harvested by another number of processes ({other[0]}): resume it with "
                         f"that many, or harvest into a new directory")


def merge_parts(out: str | Path, world_size: int, missing_ok: bool = False) -> bool:
    """Write out's manifest over its complete parts (idempotent). False, or an error unless missing_ok,
    while a part is missing or unfinished."""
    out = Path(out)
    metas = []
    for r in range(world_size):
        path = part_dir(out, r, world_size) / MANIFEST
        meta = io.read_json(path) if path.is_file() else None
        done = meta is not None and meta["sequences_done"] >= meta["source"]["part"]["windows"][1]
        if not done:
            if missing_ok:
                return False
            raise RuntimeError(f"{path.parent}: rank {r}'s part is missing or unfinished; resume the harvest")
        metas.append(meta)
    first = metas[0]
    for r, meta in enumerate(metas):
        for key in _SAME:
            if meta[key] != first[key]:
                raise ValueError(f"{part_dir(out, r, world_size)}: {key} {meta[key]!r} differs from rank 0's "
                                 f"{first[key]!r}")
    shards, norm_sums = [], dict.fromkeys(first["sites"], 0.0)
    for r, meta in enumerate(metas):
        for shard in meta["shards"]:
            name = f"shard-{len(shards):05d}.safetensors"
            _link(part_dir(out, r, world_size) / shard["file"], out / name)
            shards.append({**shard, "file": name})
        for site in norm_sums:  # float64 sums, in rank order
            norm_sums[site] += meta["norm_sums"][site]
    source = {k: v for k, v in first["source"].items() if k != "part"}
    io.write_json(out / MANIFEST, {**first, "source": source, "tokens": sum(m["tokens"] for m in metas),
                                   "sequences_done": metas[-1]["source"]["part"]["windows"][1],
                                   "norm_sums": norm_sums, "shards": shards})
    return True


def _link(src: Path, dst: Path) -> None:
    """dst becomes src's file (a hard link; a copy where the filesystem has none), replaced atomically."""
    if dst.exists() and os.path.samefile(src, dst):
        return
    tmp = dst.parent / io.temp_name(dst.name)  # a name the next writer's clean-up knows
    try:
        os.link(src, tmp)
    except OSError:  # no hard links on this filesystem: a copy, written (and failing) as every file is
        io.atomic_write(dst, lambda t: shutil.copyfile(src, t))
        return
    with io.writing(dst):
        try:
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def vectors_by_position(store: ActivationStore, site: str | None = None) -> dict[tuple[int, int], Tensor]:
    """{(window, position): vector} of one site (default: the first): a store's contents as a set."""
    site = site or next(iter(store.sites))
    out = {}
    for i in range(len(store.shards)):
        shard = store.load_shard(i, keys=("sequence", "position", site))
        for s, p, v in zip(shard["sequence"].tolist(), shard["position"].tolist(), shard[site], strict=True):
            out[(s, p)] = v
    return out
