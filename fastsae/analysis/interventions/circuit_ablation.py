"""Circuits by ablation (Cunningham et al. 2023, §5.2 "automatic circuit detection"): which features of the layer
below make a feature fire, recursively.

    contexts = top_contexts(model, "resid_post.7", sae7, 1234, windows, n=16)     # its top-activating windows
    graph = circuit(model, {"resid_post.5": sae5, "resid_post.6": sae6, "resid_post.7": sae7},
                    ("resid_post.7", 1234), contexts, depth=2, tokenizer=tokenizer)
    draw(graph, "circuit.png")      # and circuit.svg, whose nodes link to the feature browser

On the contexts, every node's activation A is its latent's value summed over the real non-BOS positions up to
the root's strongest position in each context (later positions cannot influence it). To expand a node at
site L: candidates at the site below (the previous entry of saes) are ranked by attribution, the first-order
effect of zero-ablating each, Σ z_k (∂A/∂x · W_dec[k]) from one forward and backward; the best `candidates`
are then ablated exactly (one batched forward each, stopping at site L), the effect measured as the fraction
of A removed, (A - A_ablated) / A, and the `keep` largest become the node's children. Children are expanded the
same way until `depth` levels or the first site. Effects are excitatory (positive: ablating the child lowers
the node); a negative effect means the child inhibits it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ... import io
from ...model import hook_site, keep_mask, special_token_ids
from ..features.feature_contexts import Example
from .latent_edits import Intervention, SAEDictionary, hook_interventions
from .padded_prompts import PromptBatch, pad_id


class _Reached(Exception):
    """Raised once the last site needed is computed: the rest of the forward is not needed."""


def _forward(model: nn.Module, contexts: PromptBatch, ivs: dict[str, Intervention], stop: str) -> None:
    """model(contexts) with the interventions, stopped right after site stop (hooks run in registration order,
    so every intervention at stop has recorded before the stop hook raises)."""
    device = next(model.parameters()).device

    def halt(_x):
        raise _Reached

    with hook_interventions(model, ivs), hook_site(model, stop, halt):
        try:
            model(**contexts.to(device).inputs())
        except _Reached:
            pass


def as_batch(contexts: Tensor | PromptBatch | Sequence[Example], tokenizer=None) -> PromptBatch:
    """Contexts as a batch: token windows (S, T), a PromptBatch, or Examples (e.g. a feature cache's top
    contexts), which start mid-document and get BOS prepended when the tokenizer has one."""
    if isinstance(contexts, PromptBatch):
        return contexts
    if isinstance(contexts, Tensor):
        if contexts.dim() != 2:
            raise ValueError(f"contexts must be token ids (S, T), got shape {tuple(contexts.shape)}")
        return PromptBatch(contexts, torch.ones_like(contexts))
    bos = getattr(tokenizer, "bos_token_id", None)
    rows = [([bos] if bos is not None and e.token_ids[:1] != [bos] else []) + list(e.token_ids) for e in contexts]
    return PromptBatch.from_ids(rows, pad_id(tokenizer) if tokenizer is not None else 0)


def node_id(site: str, latent: int, index: int) -> str:
    """`layer_feature`, the layer read from the site name ("resid_post.7" -> 7; else its index in saes)."""
    match = re.search(r"(\d+)$", site)
    return f"{match.group(1) if match else index}_{latent}"


@torch.no_grad()
def top_contexts(model: nn.Module, site: str, sae, latent: int, windows: Tensor, n: int = 16,
                 batch_size: int = 8, excluded: Sequence[int] | None = None) -> Tensor:
    """(n, T) the windows where latent's largest activation (over non-excluded positions) is largest."""
    excluded = special_token_ids(model) if excluded is None else excluded
    best = []
    for first in range(0, windows.shape[0], batch_size):
        ids = windows[first:first + batch_size]
        iv = Intervention(sae, record=True)
        _forward(model, as_batch(ids), {site: iv}, site)
        z = SAEDictionary(sae).values(iv.codes[0], torch.tensor([latent]))[..., 0].cpu()  # (b, T)
        best.append((z * keep_mask(ids, excluded)).amax(-1))
    order = torch.cat(best).argsort(descending=True)[:n]
    return windows[order]


class _Graph:
    def __init__(self, model, saes, contexts, excluded, candidates, keep, tokenizer, browsers):
        self.model, self.saes, self.sites = model, dict(saes), list(saes)
        self.contexts, self.candidates, self.keep = contexts, candidates, keep
        self.tokenizer, self.browsers = tokenizer, dict(browsers or {})
        self.positions = contexts.keep(excluded)  # (S, T) real, non-special tokens
        self.nodes: dict[str, dict] = {}
        self.edges: list[dict] = []
        self.expanded: set[str] = set()
        self.forwards = 0

    def activation(self, site: str, latent: int, codes, span: Tensor) -> Tensor:
        """A: the latent's values summed over span (S, T), differentiable in codes."""
        device = codes.values.device
        z = SAEDictionary(self.saes[site]).values(codes, torch.tensor([latent], device=device))[..., 0]
        return (z * span.to(device)).sum()

    def run(self, ivs: dict[str, Intervention], stop: str) -> None:
        _forward(self.model, self.contexts, ivs, stop)
        self.forwards += 1

    def add_node(self, site: str, latent: int, codes, span: Tensor) -> str:
        key = node_id(site, latent, self.sites.index(site))
        if key not in self.nodes:
            z = SAEDictionary(self.saes[site]).values(codes, torch.tensor([latent], device=codes.values.device))
            z = (z[..., 0].detach().cpu() * self.positions)  # (S, T)
            self.nodes[key] = {"id": key, "site": site, "latent": latent,
                               "activation": float(self.activation(site, latent, codes, span).detach()),
                               "top_tokens": self.top_tokens(z)}
            if site in self.browsers:
                self.nodes[key]["href"] = f"{self.browsers[site]}/feature.html#{latent}"
        return key

    def top_tokens(self, z: Tensor, n: int = 3) -> list[str]:
        """The n distinct tokens where the latent is largest on the contexts."""
        out: list[str] = []
        flat = z.flatten()
        for index in flat.argsort(descending=True).tolist():
            if flat[index] <= 0 or len(out) == n:
                break
            token = int(self.contexts.input_ids.flatten()[index])
            text = self.tokenizer.decode([token]) if self.tokenizer is not None else str(token)
            if text not in out:
                out.append(text)
        return out

    def expand(self, site: str, latent: int, span: Tensor, depth: int) -> None:
        index = self.sites.index(site)
        if depth == 0 or index == 0:
            return
        below = self.sites[index - 1]
        lower, upper = SAEDictionary(self.saes[below]), self.saes[site]
        # attribution: one forward to `site` and one backward to `below`
        with torch.enable_grad():
            ivs = {below: Intervention(lower, record=True, grad=True),
                   site: Intervention(upper, record=True, grad=True)}
            self.run(ivs, site)
            a = self.activation(site, latent, ivs[site].codes[0], span)
            (grad,) = torch.autograd.grad(a, ivs[below].outputs[0])
        base = float(a.detach())
        if base <= 0:
            return
        lower_codes = ivs[below].codes[0].detach()
        grad = grad * self.positions.to(grad.device)[..., None]
        estimate = lower.contributions(lower_codes, grad)  # first-order A - A_ablated for each candidate
        ranked = estimate.argsort(descending=True)[:self.candidates].tolist()
        effects = []
        with torch.no_grad():
            for k in ranked:
                ivs = {below: Intervention(lower, zero=[k], positions=self.positions),
                       site: Intervention(upper, record=True)}
                self.run(ivs, site)
                ablated = float(self.activation(site, latent, ivs[site].codes[0], span))
                effects.append((base - ablated, k))
        parent = node_id(site, latent, index)
        for effect, k in sorted(effects, reverse=True)[:self.keep]:
            child = self.add_node(below, k, lower_codes, span)
            self.edges.append({"source": child, "target": parent, "effect": effect / base, "effect_abs": effect,
                               "attribution": float(estimate[k]) / base})
        for _, k in sorted(effects, reverse=True)[:self.keep]:
            if node_id(below, k, index - 1) not in self.expanded:  # a feature reached twice is expanded once
                self.expanded.add(node_id(below, k, index - 1))
                self.expand(below, k, span, depth - 1)


def circuit(model: nn.Module, saes: Mapping[str, object], root: tuple[str, int],
            contexts: Tensor | PromptBatch | Sequence[Example], *,
            depth: int = 2, keep: int = 3, candidates: int = 16, tokenizer=None,
            browsers: Mapping[str, str] | None = None, excluded: Sequence[int] | None = None) -> dict:
    """The graph of features that drive root = (site, latent) on contexts (see as_batch); saes ordered from
    the lowest site up. browsers: {site: feature-browser directory} to link nodes to. See the module docstring."""
    site, latent = root
    if site not in saes:
        raise ValueError(f"root site {site!r} has no SAE; saes has {list(saes)}")
    contexts = as_batch(contexts, tokenizer)
    excluded = special_token_ids(model, tokenizer) if excluded is None else excluded
    graph = _Graph(model, saes, contexts, excluded, candidates, keep, tokenizer, browsers)
    graph.expanded.add(node_id(site, latent, list(saes).index(site)))
    with torch.no_grad():
        iv = Intervention(saes[site], record=True)
        graph.run({site: iv}, site)
    z = SAEDictionary(saes[site]).values(iv.codes[0], torch.tensor([latent]))[..., 0].cpu() * graph.positions
    if not (z > 0).any():
        raise ValueError(f"latent {latent} at {site} never fires on the contexts")
    peak = z.argmax(-1)  # (S,) the root's strongest position per context
    span = graph.positions & (torch.arange(contexts.input_ids.shape[1])[None, :] <= peak[:, None])
    graph.add_node(site, latent, iv.codes[0], span)
    graph.expand(site, latent, span, depth)
    return {"root": node_id(site, latent, list(saes).index(site)), "sites": list(saes), "depth": depth,
            "keep": keep, "candidates": candidates, "contexts": len(contexts),
            "nodes": list(graph.nodes.values()), "edges": graph.edges, "forwards": graph.forwards}


def draw(graph: dict, path: str | Path) -> list[Path]:
    """The graph as a picture: one column per site (lowest left), nodes `layer_feature` with their top tokens,
    edge width proportional to the effect. Writes path (PNG) and the same picture as SVG beside it, whose
    nodes link to their feature-browser pages when the graph has them. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    sites = [s for s in graph["sites"] if any(n["site"] == s for n in graph["nodes"])]
    columns = {s: [n for n in graph["nodes"] if n["site"] == s] for s in sites}
    where = {}
    for x, s in enumerate(sites):
        for y, node in enumerate(columns[s]):
            where[node["id"]] = (x, y - (len(columns[s]) - 1) / 2)
    tall = max(len(c) for c in columns.values())
    fig, ax = plt.subplots(figsize=(3.2 * len(sites) + 1, 1.3 * tall + 1.5))
    biggest = max([abs(e["effect"]) for e in graph["edges"]] or [1.0])
    for e in graph["edges"]:
        (x0, y0), (x1, y1) = where[e["source"]], where[e["target"]]
        ax.plot([x0, x1], [y0, y1], color="C3" if e["effect"] < 0 else "C0", alpha=0.6, zorder=1,
                linewidth=0.5 + 8 * abs(e["effect"]) / biggest)
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, f"{e['effect']:.2f}", fontsize=7, ha="center", va="center",
                bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8}, zorder=2)
    for node in graph["nodes"]:
        x, y = where[node["id"]]
        tokens = " ".join(repr(t) for t in node["top_tokens"])
        label = ax.text(x, y, f"{node['id']}\n{tokens}", ha="center", va="center", fontsize=8, zorder=3,
                        bbox={"boxstyle": "round", "fc": "#ffe9a8" if node["id"] == graph["root"] else "#e8eef7",
                              "ec": "0.3"})
        if node.get("href"):
            label.set_url(node["href"])
    ax.set_xticks(range(len(sites)), sites)
    ax.set_yticks([])
    ax.set_xlim(-0.6, len(sites) - 0.4)
    ax.set_ylim(-tall / 2 - 0.2, tall / 2 + 0.2)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"circuit of {graph['root']} (edge: fraction of the parent's activation removed by ablating the "
                 f"child)", fontsize=9)
    fig.tight_layout()
    written = [path, path.with_suffix(".svg")]
    for out in written:
        io.write_figure(out, fig)
    plt.close(fig)
    return written


def describe(graph: dict) -> str:
    """The graph as text: every edge, child -> parent with its effect and the nodes' top tokens."""
    nodes = {n["id"]: n for n in graph["nodes"]}
    lines = [f"circuit of {graph['root']} {nodes[graph['root']]['top_tokens']} on {graph['contexts']} contexts "
             f"({graph['forwards']} forwards)"]
    for e in graph["edges"]:
        lines.append(f"  {e['source']} {nodes[e['source']]['top_tokens']} -> {e['target']}: effect {e['effect']:.3f} "
                     f"(attribution estimate {e['attribution']:.3f})")
    return "\n".join(lines)


def annotate(graph: dict, caches: Mapping[str, str | Path], picture: str | None = None) -> list[Path]:
    """Tell the feature browser about the graph: for each node at a site in caches ({site: feature cache
    directory}), an entry in <cache>/annotations/circuit.json (the browser's annotation contract) listing what it
    drives and what drives it, merged with entries of earlier circuits. Returns the files written."""
    nodes = {n["id"]: n for n in graph["nodes"]}
    written = []
    for site, cache in caches.items():
        path = Path(cache) / "annotations" / "circuit.json"
        data = io.read_json(path) if path.is_file() else {"title": "Circuits (by ablation)", "features": {}}
        for node in (n for n in graph["nodes"] if n["site"] == site):
            parts = [f"{e['target']} ({e['effect']:.2f})" for e in graph["edges"] if e["source"] == node["id"]]
            parts_in = [f"{e['source']} {nodes[e['source']]['top_tokens']} ({e['effect']:.2f})"
                        for e in graph["edges"] if e["target"] == node["id"]]
            text = f"In the circuit of {graph['root']}: "
            text += "; ".join(filter(None, [f"drives {', '.join(parts)}" if parts else "",
                                            f"driven by {', '.join(parts_in)}" if parts_in else ""])) or "the root"
            entry = {"text": text}
            if picture:
                entry["links"] = [{"text": f"circuit of {graph['root']}", "href": picture}]
            data["features"][str(node["latent"])] = entry
        io.write_json(path, data)
        written.append(path)
    return written


def save(graph: dict, path: str | Path) -> Path:
    """The graph as JSON, written atomically."""
    io.write_json(Path(path), graph)
    return Path(path)



def run_circuit(model_name: str, sae_paths: Sequence[str], latent: int, out, *,
                sites: Sequence[str] | None = None, root_site: str | None = None, n_contexts: int = 16,
                feature_cache: str | None = None, corpus: str = "english:test", tokens: int = 32_768,
                context_size: int = 64, depth: int = 2, keep: int = 3, candidates: int = 16,
                browsers: Mapping[str, str] | None = None, annotate_caches: Mapping[str, str] | None = None,
                device: str = "cpu") -> dict:
    """`fastsae circuit`: the circuit of latent at root_site (default: the highest SAE's site) on its top
    contexts — from a feature cache (fastsae features) when given, else the top n_contexts of `tokens` corpus
    tokens — written as out/circuit.json, out/circuit.png and out/circuit.svg; with annotate_caches ({site:
    feature cache}), also as browser annotations of its nodes."""
    from ...harvest import read_documents, token_windows
    from ...model import load
    from ..sae_dirs import load_saes

    out = Path(out)
    model, tokenizer = load(model_name, device=device)
    saes = load_saes(sae_paths, sites, device=device)
    root_site = root_site or list(saes)[-1]
    if root_site not in saes:
        raise ValueError(f"--root-site {root_site!r}: no SAE there; SAEs are at {list(saes)}")
    if feature_cache:
        from ..features.feature_cache import FeatureCache  # the feature cache of `fastsae features`

        contexts = as_batch(FeatureCache.load(feature_cache).top(latent)[:n_contexts], tokenizer)
    else:
        windows = token_windows(tokenizer, read_documents(corpus), context_size, tokens)
        contexts = top_contexts(model, root_site, saes[root_site], latent, windows, n=n_contexts)
    graph = circuit(model, saes, (root_site, latent), contexts, depth=depth, keep=keep, candidates=candidates,
                    tokenizer=tokenizer, browsers=browsers)
    graph["model"] = model_name
    graph["summary"] = describe(graph)
    out.mkdir(parents=True, exist_ok=True)
    save(graph, out / "circuit.json")
    draw(graph, out / "circuit.png")
    if annotate_caches:
        annotate(graph, annotate_caches, picture=str((out / "circuit.svg").resolve()))
    return graph
