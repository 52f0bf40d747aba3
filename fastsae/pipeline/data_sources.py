"""Where training data comes from, opened from one typed `DataConfig`.

    source = "toy"           the toy dictionary of fastsae.toy (64-d synthetic activations)
           = a store dir     an activation store (fastsae harvest): shuffled batches of one site
           = "stream"        straight from a model's forward passes over corpus windows, through a mixing buffer
           = a file          an (N, d_in) .npy (memory-mapped) or .safetensors array

`open_data(cfg, dtype)` checks the settings against the source (an unknown site raises where it is resolved,
naming it and listing the valid ones) and returns a `DataSource`: the input width, the batches, the
normalising scale its batches carry (store and stream: mean norm sqrt(d)) and the provenance to record
with the SAE. `finish_sae` folds that same scale into the trained SAE, once, and records the provenance.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..sae import SAE

SOURCES = ("toy", "stream")  # besides a store directory or an array file


@dataclass
class DataConfig:
    source: str = "toy"  # "toy", "stream", an activation store directory, or an .npy/.safetensors array
    batch_size: int = 1024
    seed: int = 0  # the batch order (store, array, toy) or the window order and mixing (stream)
    site: str | None = None  # the store's site (needed when it holds several); the model's with "stream"
    target_site: str | None = None  # a transcoder's output site: a store serves (site, target_site) pairs
    sites: list[str] | None = None  # a crosscoder's sites, in order: a store serves them side by side (site: the first)
    normalize: bool | None = None  # scale to mean norm sqrt(d) (folded into the saved SAE); None: on for store/stream
    # "stream" only: the model, its device, and the corpus windows it runs on
    model: str | None = None
    device: str | None = None
    corpus: str = "english-classics"
    text_field: str = "text"
    # the token budget: of the windows with "stream" (None: the whole corpus); of a store, its first whole shards
    # holding >= tokens vectors (ActivationStore.prefix; None: all of it)
    tokens: int | None = None
    context_size: int = 128
    # "stream" only: the scale measured on the first windows, kept so a resumed run uses the same
    norm_scale: float | None = None

    def __post_init__(self):
        def check(name: str, ok: bool, expected: str) -> None:
            if not ok:
                raise ValueError(f"DataConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        check("source", isinstance(self.source, str) and bool(self.source),
              "'toy', 'stream', a store directory or an .npy/.safetensors file")
        check("batch_size", is_int(self.batch_size) and self.batch_size >= 1, "an int >= 1")
        check("seed", is_int(self.seed), "an int")
        check("site", self.site is None or (isinstance(self.site, str) and bool(self.site)), "a site name or None")
        check("target_site", self.target_site is None or (isinstance(self.target_site, str) and (
            self.source == "toy" or (bool(self.site) and self.source not in SOURCES))),
              "None, or a site name given with site= and a store source (or any label with the toy)")
        if isinstance(self.sites, tuple):
            self.sites = list(self.sites)
        check("sites", self.sites is None or (isinstance(self.sites, list) and len(self.sites) >= 2 and all(
            isinstance(s, str) and s for s in self.sites) and self.source != "stream" and self.target_site is None
            and self.site in (None, self.sites[0])),
              "None, or >= 2 site names of a store source or labels for the toy (site, if given, the first; no "
              "target_site)")
        check("normalize", self.normalize in (None, True, False), "True, False or None")
        check("context_size", is_int(self.context_size) and self.context_size >= 2, "an int >= 2")
        least = self.context_size if self.source == "stream" else 1  # a stream's budget holds whole windows
        check("tokens", self.tokens is None or (is_int(self.tokens) and self.tokens >= least),
              f"None or an int >= {least}" + (" (context_size)" if least > 1 else ""))
        check("norm_scale", self.norm_scale is None or (isinstance(self.norm_scale, (int, float))
                                                        and 0 < self.norm_scale < math.inf), "None or a number > 0")
        if self.source == "stream":
            for name in ("model", "site"):
                check(name, bool(getattr(self, name)), "given with source='stream'")

    @property
    def kind(self) -> str:
        """"toy", "stream", "store" or "array": the one place a source string is told apart."""
        from ..harvest.store import is_store

        if self.source in SOURCES:
            return self.source
        return "store" if is_store(self.source) else "array"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DataConfig got unknown fields {unknown}; expected some of {sorted(known)}")
        return cls(**d)


@dataclass
class DataSource:
    cfg: DataConfig  # with what opening resolved filled in (the store's only site, normalize, norm_scale)
    d_in: int
    make_batches: Callable[[int], Iterable[torch.Tensor]] = field(repr=False)
    scale: float = 1.0  # the factor every batch was multiplied by (the loader's own); folded into the SAE
    provenance: dict = field(default_factory=dict)  # model, site, store, windows: recorded in SAE.metadata
    target_scale: float | None = None  # a transcoder's output-site scale (pairs' y), folded into its decoder
    site_scales: tuple[float, ...] | None = None  # a crosscoder's per-site scales, folded per site (crosscoder.py)

    def batches(self, steps: int) -> Iterable[torch.Tensor]:
        """The batches of a run of `steps` steps."""
        return self.make_batches(steps)


def open_data(cfg: DataConfig, dtype: torch.dtype = torch.float32, *, rank: int = 0, world_size: int = 1,
              device: torch.device | str | None = None) -> DataSource:
    """Open cfg's source, serving batches in dtype (the SAE's; a stream serves float32); see the module
    docstring. A store serves data rank `rank` of `world_size` its part of each batch, on device."""
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"cfg must be a DataConfig, got {type(cfg).__name__}")
    kind = cfg.kind
    if cfg.target_site is not None and kind not in ("store", "toy"):
        raise ValueError(f"DataConfig.target_site: (x, y) pairs come from an activation store or the toy, got "
                         f"source {cfg.source!r}")
    if cfg.sites and kind not in ("store", "toy"):
        raise ValueError(f"DataConfig.sites: a crosscoder's sites come from an activation store or the toy, got "
                         f"source {cfg.source!r}")
    if kind == "toy":
        return _toy(cfg)
    if kind == "store":
        return _store(cfg, dtype, rank, world_size, device or "cpu")
    if kind == "stream":
        return _stream(cfg)
    return _array(cfg, dtype)


def finish_sae(sae: SAE, data: DataSource) -> SAE:
    """Make the trained SAE take raw activations and say where they came from: the loader's own scale
    folded in (once: fold_input_scale_ records it in metadata), the provenance recorded."""
    sae.metadata.update(data.provenance)
    if data.site_scales is not None and any(s != 1.0 for s in data.site_scales):
        from ..crosscoder import fold_site_scales_

        fold_site_scales_(sae, data.site_scales)
    if data.scale != 1.0 or data.target_scale not in (None, 1.0):
        sae.fold_input_scale_(data.scale, output_scale=data.target_scale)
    return sae


def _toy(cfg: DataConfig) -> DataSource:
    """The toy's batches; with target_site, (x, y) pairs, with sites, the sites side by side, of ToySites (their
    names are labels): a transcoder's or a crosscoder's toy."""
    from ..toy import ToyDictionary, ToySites

    if cfg.target_site is None and not cfg.sites:
        toy = ToyDictionary.random(seed=cfg.seed)
        return DataSource(cfg, toy.features.shape[1],
                          lambda steps: toy.batches(cfg.batch_size, steps, seed=cfg.seed + 1))
    sites = ToySites.random(len(cfg.sites) if cfg.sites else 2, pairs=not cfg.sites, seed=cfg.seed)
    d_in = sites.sites[0].features.shape[1]
    provenance = {"out_site": cfg.target_site} if cfg.target_site else {"sites": list(cfg.sites)}
    return DataSource(cfg, d_in if sites.pairs else d_in * len(sites.sites),
                      lambda steps: sites.batches(cfg.batch_size, steps, seed=cfg.seed + 1), provenance=provenance)


def _array(cfg: DataConfig, dtype: torch.dtype) -> DataSource:
    from ..train.batches import ArrayBatches, load_array

    if not Path(cfg.source).is_file():
        raise FileNotFoundError(f"DataConfig.source {cfg.source!r}: expected 'toy', 'stream', an activation store "
                                f"directory (with manifest.json) or an .npy/.safetensors file")
    try:
        array = load_array(cfg.source)
    except ValueError as err:  # CorruptFileError, a wrong shape: say which setting named the file
        raise ValueError(f"DataConfig.source: {err}") from err
    except OSError as err:  # unreadable
        raise type(err)(f"DataConfig.source {cfg.source}: {err.strerror or err}") from err
    name = f"DataConfig.source {cfg.source}"
    return DataSource(cfg, array.shape[1], lambda steps: ArrayBatches(array, cfg.batch_size, steps, seed=cfg.seed,
                                                                       dtype=dtype, name=name))


def _store(cfg: DataConfig, dtype: torch.dtype, rank: int = 0, world_size: int = 1,
           device: torch.device | str = "cpu") -> DataSource:
    from ..harvest import ActivationStore, ShuffledLoader, harvested_windows

    store = ActivationStore(cfg.source)
    if cfg.tokens is not None:
        store = store.prefix(cfg.tokens)
    site = cfg.sites[0] if cfg.sites else cfg.site
    if site is None:
        if len(store.sites) != 1:
            raise ValueError(f"DataConfig.site: the store {store.path} holds {sorted(store.sites)}; name one")
        site = next(iter(store.sites))
    for name, value in (("site", site), ("target_site", cfg.target_site or site),
                        *(("sites", s) for s in cfg.sites or ())):
        if value not in store.sites:
            raise ValueError(f"DataConfig.{name}: site {value!r} is not in the store {store.path}; it holds "
                             f"{sorted(store.sites)}")
    if cfg.target_site is not None and store.sites[cfg.target_site] != store.sites[site]:
        raise ValueError(f"DataConfig.target_site: a transcoder's output width is its input's (d_in); "
                         f"{cfg.target_site} has d={store.sites[cfg.target_site]}, {site} has d={store.sites[site]}")
    cfg = dataclasses.replace(cfg, site=site, normalize=True if cfg.normalize is None else cfg.normalize)
    # normalize=True raises here, clearly, for a store harvested before it kept norm statistics
    loader = ShuffledLoader(store, site, cfg.batch_size, seed=cfg.seed, dtype=dtype, normalize=cfg.normalize,
                            drop_last=True, rank=rank, world_size=world_size, device=device,
                            target_site=cfg.target_site, sites=cfg.sites)
    provenance = {"model": store.meta["model"], "site": site, "store": str(store.path.resolve()), "rows": store.tokens}
    if cfg.target_site is not None:  # a transcoder: it reads site and writes target_site
        provenance["out_site"] = cfg.target_site
    if cfg.sites:  # a crosscoder: it reads and rebuilds these sites, side by side in this order
        provenance["sites"] = list(cfg.sites)
    windows = harvested_windows(store)
    if windows is not None:
        provenance["windows"] = windows
    return DataSource(cfg, store.sites[site] * len(cfg.sites or [site]), loader.batches, loader.scale, provenance,
                      loader.target_scale if cfg.target_site is not None else None, loader.site_scales or None)


def _stream(cfg: DataConfig) -> DataSource:
    """Batches straight from the model's forward (a mixing buffer, no store). The normalising scale is
    measured on the first windows once and kept in the config, so a resumed run uses the same."""
    from ..harvest import StreamingActivations, read_documents, token_windows, window_record
    from ..model import capture, keep_mask, load, resolve, special_token_ids

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load(cfg.model, device=device)
    resolve(model, cfg.site)  # an unknown site raises here, naming it and listing the model's sites
    windows = token_windows(tokenizer, read_documents(cfg.corpus, cfg.text_field), cfg.context_size, cfg.tokens,
                            seed=cfg.seed)
    model_device = next(model.parameters()).device
    excluded = special_token_ids(model, tokenizer)
    probe = capture(model, [cfg.site], input_ids=windows[:8].to(model_device))[cfg.site]
    d_in = probe.shape[-1]
    cfg = dataclasses.replace(cfg, normalize=True if cfg.normalize is None else cfg.normalize)
    if cfg.normalize and cfg.norm_scale is None:
        keep = keep_mask(windows[:8], excluded)
        cfg = dataclasses.replace(
            cfg, norm_scale=d_in ** 0.5 / float(probe[keep.to(model_device)].double().norm(dim=-1).mean()))
    stream = StreamingActivations(model, cfg.site, windows, cfg.batch_size, seed=cfg.seed,
                                  scale=cfg.norm_scale if cfg.normalize else 1.0, exclude_token_ids=excluded)
    # One pass over the windows; the seeded order is token_windows' own, so the record names them.
    provenance = {"model": cfg.model, "site": cfg.site,
                  "windows": window_record(cfg.corpus, cfg.text_field, cfg.context_size, cfg.seed,
                                           [[0, windows.shape[0]]])}
    return DataSource(cfg, d_in, lambda steps: stream, stream.scale, provenance)
