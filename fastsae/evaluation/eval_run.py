"""`fastsae eval` as a function: trained SAEs (a sweep) + a model + held-out corpus windows -> report.

The model, site, corpus and window settings default to what the SAE's metadata recorded. The
SAE records which windows of its corpus' seeded order it trained on (`metadata["windows"]`, from
its store's manifest or its stream; SAEs from before the record fall back to their store's
manifest), and the eval windows are the last of the others: held out from training by record.

`metrics` adds metrics beyond the reconstruction and downstream ones: "absorption" and "sparse-probing"
(fastsae.evaluation.probe_metrics), into metrics.json and the report's text (report.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import io
from ..harvest.corpus import held_out_windows, may_overlap, read_documents, token_windows
from ..harvest.harvester import harvested_windows
from ..harvest.store import ActivationStore, is_store
from ..sae import CONFIG_FILE, SAE
from .eval_report import write_report
from .evaluate import evaluate_with_baselines
from .probe_metrics import format_probe_metrics, parse_metrics, run_probe_metrics

HEADLINE = ("l0", "fvu", "explained_variance", "cossim", "ce_loss_recovered", "kl_div_with_sae",
            "perplexity_increase", "dead_fraction", "embedding_cossim_with_sae")


def find_saes(paths: list[str | Path]) -> dict[str, Path]:
    """SAE directories by name: each path is an SAE (has cfg.json) or a sweep directory holding SAEs."""
    found: dict[str, Path] = {}
    for p in map(Path, paths):
        if (p / CONFIG_FILE).is_file():
            dirs = [p]
        else:
            dirs = sorted(c.parent for c in p.glob(f"*/{CONFIG_FILE}")) + sorted(c.parent for c in
                                                                               p.glob(f"*/sae/{CONFIG_FILE}"))
            if not dirs:
                raise FileNotFoundError(f"--sae {p}: neither an SAE directory ({CONFIG_FILE}) nor a sweep holding some")
        for d in dirs:
            name = _describe(d)
            if name in found:  # two SAEs of the same configuration: tell them apart by directory
                name = f"{name} ({d.parent.name}/{d.name})"
            while name in found:
                name += "'"
            found[name] = d
    return found


def _describe(path: Path) -> str:
    """A sweep member's name from its configuration: "topk k=32 4096", "relu l1=5 16384"."""
    cfg = io.read_json(path / CONFIG_FILE)
    sparsity = f"k={cfg.get('k')}" if cfg.get("k") is not None else f"l1={cfg.get('l1_coefficient'):g}"
    return f"{cfg.get('activation')} {sparsity} {cfg.get('d_sae')}"


def _store(sae: SAE) -> ActivationStore | None:
    path = sae.metadata.get("store")
    return ActivationStore(path) if path and is_store(path) else None


def trained_windows(sae: SAE) -> dict | None:
    """The record of the corpus windows sae trained on: its own, else its store's, else None."""
    if "windows" in sae.metadata:
        return sae.metadata["windows"]
    store = _store(sae)
    return harvested_windows(store) if store is not None else None


def run_eval(sae_paths: list[str | Path], out: str | Path, *, model: str | None = None, site: str | None = None,
             corpus: str | None = None, tokens: int = 16_384, context_size: int | None = None,
             baselines: tuple[str, ...] = ("pca", "ica", "neurons", "random"), fit_tokens: int = 32_768,
             batch_size: int = 4, device: str = "cpu", progress: bool = True, reference: bool = False,
             metrics: tuple[str, ...] = ()) -> dict:
    """Evaluate the SAEs at sae_paths against baselines and write the report to out (module docstring).
    reference: the straightforward evaluation, one whole forward per variant (for benchmarks)."""
    from ..model import capture, load, special_token_ids

    metrics = parse_metrics(metrics)
    paths = find_saes(sae_paths)
    saes = {name: SAE.load(path, device=device) for name, path in paths.items()}
    first = next(iter(saes.values()))
    model = model or first.metadata.get("model")
    site = site or first.metadata.get("site")
    if not model or not site:
        raise ValueError("the SAE does not record its model and site (metadata); pass --model and --site")
    widths = {s.cfg.d_in for s in saes.values()}
    if len(widths) != 1:
        raise ValueError(f"the SAEs take different input widths {sorted(widths)}: evaluate them apart")
    store = _store(first)
    trained = trained_windows(first) or {}
    corpus = corpus or trained.get("corpus", "english-classics")
    context_size = context_size or trained.get("context_size", 128)
    text_field, seed = trained.get("text_field", "text"), trained.get("seed", 0)
    lm, tokenizer = load(model, device=device)
    all_windows = token_windows(tokenizer, read_documents(corpus, text_field), context_size, seed=seed)
    n_eval = max(1, tokens // context_size)
    same_order = (trained.get("corpus"), trained.get("context_size")) == (str(corpus), context_size)
    if trained and not same_order and may_overlap(trained["corpus"], corpus):
        print(f"warning: the SAE trained on windows of {trained['context_size']} tokens of {trained['corpus']}; "
              f"evaluating on windows of {context_size} of {corpus}, which may overlap them")
    used = trained.get("ranges", []) if same_order else []
    held_out, overlap = held_out_windows(all_windows.shape[0], used, n_eval)
    if overlap:
        print(f"warning: the corpus has {all_windows.shape[0]} windows and the SAE trained on "
              f"{sum(b - a for a, b in used)}, so {overlap} of the {n_eval} used for evaluation overlap them")
    windows = all_windows[held_out]
    width = capture(lm, [site], input_ids=windows[:1].to(device))[site].shape[-1]  # resolves the site, too
    if width != first.cfg.d_in // first.cfg.n_sites:  # a crosscoder's d_in: its n_sites sites side by side
        raise ValueError(f"the SAEs take d_in={first.cfg.d_in} but site {site!r} of model {model!r} has width "
                         f"{width}: pass the --model and --site they were trained on")
    excluded = store.meta["excluded_token_ids"] if store else special_token_ids(lm, tokenizer)
    if baselines and any(s.cfg.kind == "crosscoder" for s in saes.values()):
        print(f"note: baselines ({', '.join(baselines)}) are not defined for crosscoders; evaluating without them")
        baselines = ()
    start = time.perf_counter()
    fit_x, fit_source = None, None
    if baselines:
        fit_x, fit_source = fit_activations(lm, site, store, all_windows, excluded, fit_tokens, batch_size, device)
    seconds = {"baseline_activations": time.perf_counter() - start}
    results = evaluate_with_baselines(lm, site, windows, saes, fit_x, kinds=tuple(baselines), batch_size=batch_size,
                                      exclude_token_ids=excluded, progress=progress, reference=reference,
                                      seconds=seconds)
    extra = run_probe_metrics(metrics, lm, tokenizer, site, saes, corpus, fit_x, tuple(baselines), context_size,
                              excluded, batch_size, device, seed, seconds)
    meta = {"model": model, "site": site, "corpus": str(corpus), "eval_windows": n_eval,
            "eval_window_ranges": _ranges(held_out.tolist()), "window_seed": seed, "overlap_windows": overlap,
            "context_size": context_size, "saes": {n: str(p) for n, p in paths.items()},
            "baseline_fit_tokens": None if fit_x is None else fit_x.shape[0], "baseline_fit_source": fit_source,
            "seconds": {k: round(v, 3) for k, v in seconds.items()}}
    _write(out, results, meta, tuple(baselines), extra)
    return results


def _write(out: str | Path, results: dict, meta: dict, baselines: tuple[str, ...], extra: dict) -> None:
    """Write the report (with report.md when extra holds more metrics) and print its text and files."""
    text = format_table(results) + format_probe_metrics(extra)
    files = write_report(out, results, meta, baselines=baselines, extra=extra, text=text if extra else None)
    print(text)
    print("report: " + ", ".join(str(Path(f).resolve()) for f in files))


FULL_PRECISION = (torch.float32, torch.float64)


def fit_activations(lm, site: str, store: ActivationStore | None, windows: torch.Tensor, excluded: list[int],
                    fit_tokens: int, batch_size: int, device: str) -> tuple[torch.Tensor, str]:
    """(≤ fit_tokens, d) float32 activations at site to fit the baselines on, and where they came from: the
    store's first rows where it keeps the site in full precision, else the model's own over the corpus's first
    windows (the tokens a store harvests first). A store's bfloat16 rounding is too coarse for FastICA: on the
    main job's 32,768 activations its fit ran all 400 iterations without converging (tol 1e-3), where the same
    tokens in float32 converge after 106 and give a lower held-out FVU
    (bench/results/evaluation/ica-cpu-2026-11-21-*)."""
    from ..model import capture, keep_mask

    if store is not None and site in store.sites and store.dtype in FULL_PRECISION:
        return store.first_rows(site, fit_tokens).float(), "store"
    rows, n = [], 0
    for i in range(0, windows.shape[0], batch_size):
        if n >= fit_tokens:
            break
        batch = windows[i:i + batch_size]
        rows.append(capture(lm, [site], input_ids=batch.to(device))[site][keep_mask(batch, excluded).to(device)]
                    .float().cpu())
        n += rows[-1].shape[0]
    source = "model" if store is None or site not in store.sites else f"model (the store keeps {store.meta['dtype']})"
    return torch.cat(rows)[:fit_tokens], source


def _ranges(indices: list[int]) -> list[list[int]]:
    """Sorted window indices as half-open ranges (what a window record holds)."""
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1][1] += 1
        else:
            out.append([i, i + 1])
    return out


def format_table(results: dict) -> str:
    names = [n for n in results if n != "model"]
    keys = [k for k in HEADLINE if any(k in results[n] for n in names)]
    lines = ["| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for n in names:
        cells = [f"{results[n][k]:.4g}" if isinstance(results[n].get(k), float) else str(results[n].get(k, ""))
                 for k in keys]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    shared = results["model"]
    if "ce_loss_without_sae" in shared:
        lines.append(f"clean CE {shared['ce_loss_without_sae']:.4f}, zero-ablated "
                     f"{shared['ce_loss_with_ablation']:.4f}, mean-ablated {shared['ce_loss_with_mean_ablation']:.4f}"
                     f" over {shared['tokens']:,} tokens")
        gap = max(abs(results[n]["ce_loss_with_sae_and_error"] - shared["ce_loss_without_sae"]) for n in names
                  if "ce_loss_with_sae_and_error" in results[n])
        lines.append(f"self-check: CE with x_hat + error term differs from clean by at most {gap:.2g}")
    return "\n".join(lines)
