"""The one place a site is hooked: `hook_site` calls a function on the activation at a site during every
forward, and may replace it. `capture`, `splice`, `SpliceKL` and the analysis tools are built on it.

    with hook_site(model, "resid_post.3", fn):   # fn(x (batch, seq, d)) -> replacement, or None to keep x
        model(input_ids)

Outputs that are tuples (Hugging Face blocks return (hidden, ...)) have their first element passed and
replaced; "input" sites get the module's first positional argument (or its first keyword argument).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn

from .sites import Site, resolve

SiteFn = Callable[[Tensor], Tensor | None]


@contextmanager
def hook_site(model: nn.Module, site: str | Site, fn: SiteFn) -> Iterator[Site]:
    """Within the block, every forward of model calls fn on the activation at site; a tensor it returns
    replaces the activation (downstream layers see it), None leaves it unchanged."""
    where = site if isinstance(site, Site) else resolve(model, site)
    module = model.get_submodule(where.module)
    if where.capture == "input":
        def pre(_module, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            key = next(iter(kwargs))
            new = fn(kwargs[key])
            return None if new is None else (args, {**kwargs, key: new})
        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        def post(_module, _args, output):
            is_seq = isinstance(output, (tuple, list))
            new = fn(output[0] if is_seq else output)
            if new is None:
                return None
            return (new, *output[1:]) if is_seq else new
        handle = module.register_forward_hook(post)
    try:
        yield where
    finally:
        handle.remove()


@contextmanager
def hook_sites(model: nn.Module, fns: dict[str, SiteFn]) -> Iterator[dict[str, Site]]:
    """hook_site for several sites at once: {site: fn}."""
    with ExitStack() as stack:
        yield {name: stack.enter_context(hook_site(model, name, fn)) for name, fn in fns.items()}


class _Stop(Exception):
    """Raised by a hook once every site is captured: the rest of the forward is not needed."""


@torch.no_grad()
def capture(model: nn.Module, sites: Iterable[str], stop_early: bool = True, **inputs) -> dict[str, Tensor]:
    """Run model(**inputs) and return the activations at sites, each (batch, seq, d).

    stop_early: the forward stops as soon as every site is captured, so later
    layers and the LM head never run."""
    names = list(dict.fromkeys(sites))
    if not names:
        raise ValueError("capture needs at least one site")
    out: dict[str, Tensor] = {}

    def grab(name: str) -> SiteFn:
        def fn(x: Tensor) -> None:
            out[name] = x.detach()
            if stop_early and len(out) == len(names):
                raise _Stop

        return fn

    with hook_sites(model, {name: grab(name) for name in names}):
        try:
            model(**inputs)
        except _Stop:
            pass
    missing = [name for name in names if name not in out]
    if missing:
        raise RuntimeError(f"sites {missing} were not reached by the forward")
    return out
