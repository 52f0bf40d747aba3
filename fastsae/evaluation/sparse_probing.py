"""Sparse probing (SAEBench, Karvonen et al. 2025; after Gurnee et al. 2023): how well k latents of a dictionary
predict a label its documents carry, against the same k-sparse probes on baselines.

How it follows SAEBench's `sparse_probing` eval:
- each example is a text's token window (the first context_size tokens, BOS first), run through the model; the
  dictionary's codes are computed per token and mean-pooled over the window's scored tokens (BOS/EOS/pad left out);
- each label task is one-vs-rest per class, with as many negatives as positives drawn evenly from the other
  classes (`prepare_probe_data`); k latents are chosen on the training set by the largest |mean difference|
  between the classes (`get_top_k_mean_diff_mask`), then an L2 logistic regression (C = 1, scikit-learn's
  objective: fastsae.evaluation.logistic_probe) is trained on those k and scored by test accuracy;
- a task's accuracy at k is the mean over its classes; `full_probe_accuracy` is the logistic probe on all of
  the model's activation dimensions (SAEBench's `llm_test_accuracy`), the ceiling.

Where it departs:
- the labels are the corpus's own, not SAEBench's eight downloaded datasets (bias-in-bios, Amazon reviews, ...):
  each record's `source` (the package a document came from) and `kind` (narrative, verse, technical, ...) in
  the built-in and cached corpora (fastsae.harvest.corpus.read_records), or the same fields of a user's .jsonl;
- a document gives up to `windows_per_doc` windows, and train and test are split by document (a fifth of each
  class's documents, at least one, is test), so no text is on both sides; classes with fewer than two documents
  are left out and listed; SAEBench has 4,000 / 1,000 independent texts, we cap documents per class
  (`docs_per_class`) to keep a CPU run in minutes;
- the baselines are fastsae.evaluation.baselines (neurons: the activation dimensions, SAEBench's `llm_top_k`;
  PCA, ICA, random directions), with their dense coefficients (every direction, not the top-k sparsified ones
  the reconstruction metrics use), so that the probe alone chooses k of them.
"""

from __future__ import annotations

import gzip
import json
import lzma
import math
from pathlib import Path

import torch
from torch import Tensor

from . import logistic_probe as lp

KS = (1, 2, 5, 20)
LABEL_FIELDS = ("source", "kind")
TEST_FRACTION = 0.2  # SAEBench: 4,000 train / 1,000 test texts


def labelled_records(corpus: str | Path, fields: tuple[str, ...] = LABEL_FIELDS) -> list[dict]:
    """The records of corpus that carry a text and at least one of fields: a built-in or cached corpus name
    (fastsae.harvest.corpus.read_records) or a .jsonl(.gz/.xz) file of objects. [] for other sources (a .txt
    file or a directory carries no labels)."""
    from ..harvest.corpus import BUILTIN, CACHED, read_records

    name = str(corpus)
    if name.partition(":")[0] in BUILTIN or name.partition(":")[0] in CACHED:
        records = read_records(name)
    elif name.endswith((".jsonl", ".jsonl.gz", ".jsonl.xz")):
        opener = gzip.open if name.endswith(".gz") else lzma.open if name.endswith(".xz") else open
        with opener(name, "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    else:
        return []
    return [r for r in records if isinstance(r.get("text"), str) and any(r.get(f) is not None for f in fields)]


def sample_documents(records: list[dict], fields: tuple[str, ...], docs_per_class: int, seed: int) -> list[int]:
    """Indices of at most docs_per_class records of every class of every field (the union, sorted)."""
    gen = torch.Generator().manual_seed(seed)
    chosen: set[int] = set()
    for field in fields:
        by_class: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            if r.get(field) is not None:
                by_class.setdefault(str(r[field]), []).append(i)
        for members in by_class.values():
            order = torch.randperm(len(members), generator=gen)[:docs_per_class]
            chosen.update(members[j] for j in order.tolist())
    return sorted(chosen)


@torch.no_grad()
def dense_codes(decomposition, x: Tensor) -> Tensor:
    """(N, n) float32 codes of activations x (N, d): an SAE's latents, or every coefficient of a baseline."""
    if hasattr(decomposition, "analysis"):  # fastsae.evaluation.baselines.Decomposition
        dev = x.device
        return (x.float() - decomposition.mean.to(dev)) @ decomposition.analysis.to(dev).T
    return decomposition.encode(x.to(decomposition.dtype)).to_dense().float()


@torch.no_grad()
def pooled_codes(lm, site: str, tokenizer, texts: list[str], decompositions: dict, *, context_size: int,
                 windows_per_doc: int, excluded: list[int], batch_size: int, device: str
                 ) -> tuple[dict[str, Tensor], Tensor]:
    """Mean-pooled codes {name: (W, n)} of every decomposition, plus "activations" (W, d) (the raw site), over
    the windows of texts, and the document index (W,) of each window. A window is BOS + up to
    context_size - 1 tokens; shorter last windows are right-padded and the padding masked out."""
    from ..harvest.corpus import _first_id
    from ..model import capture, keep_mask

    bos, pad = _first_id(tokenizer, "bos_token_id", "cls_token_id"), _first_id(tokenizer, "pad_token_id") or 0
    body = context_size - (bos is not None)
    windows, owner = [], []
    for doc, ids in enumerate(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]):
        for start in range(0, min(len(ids), body * windows_per_doc), body):
            windows.append(([bos] if bos is not None else []) + ids[start:start + body])
            owner.append(doc)
    if not windows:
        raise ValueError("sparse probing: the labelled documents hold no tokens")
    pooled: dict[str, list[Tensor]] = {name: [] for name in ("activations", *decompositions)}
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([w + [pad] * (width - len(w)) for w in batch], device=device)
        real = torch.tensor([[j < len(w) for j in range(width)] for w in batch], device=device)
        x = capture(lm, [site], input_ids=ids, attention_mask=real.long())[site].float()  # (B, T, d)
        keep = keep_mask(ids, excluded) & real  # (B, T)
        weights = keep.float() / keep.sum(1, keepdim=True).clamp_min(1)  # mean over the scored tokens
        flat = x[keep]  # (P, d)
        rows = keep.nonzero()[:, 0]
        for name in pooled:
            codes = flat if name == "activations" else dense_codes(decompositions[name], flat)
            out = torch.zeros(len(batch), codes.shape[1], device=codes.device)
            out.index_add_(0, rows, codes * weights[keep][:, None])
            pooled[name].append(out.cpu())
    return {name: torch.cat(v) for name, v in pooled.items()}, torch.tensor(owner)


def split_documents(doc_labels: list[str | None], seed: int) -> tuple[dict[str, tuple[list[int], list[int]]],
                                                                       list[str]]:
    """{class: (train documents, test documents)} with TEST_FRACTION of each class's documents (at least one)
    in test, and the classes left out for having fewer than two documents."""
    by_class: dict[str, list[int]] = {}
    for doc, label in enumerate(doc_labels):
        if label is not None:
            by_class.setdefault(label, []).append(doc)
    gen = torch.Generator().manual_seed(seed)
    split, dropped = {}, []
    for label in sorted(by_class):
        docs = by_class[label]
        if len(docs) < 2:
            dropped.append(label)
            continue
        order = [docs[j] for j in torch.randperm(len(docs), generator=gen).tolist()]
        n_test = max(1, round(TEST_FRACTION * len(docs)))
        split[label] = (order[n_test:], order[:n_test])
    return split, dropped


def one_vs_rest(rows: dict[str, Tensor], label: str, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(row indices, 0/1 labels) of class label against as many negatives, drawn evenly from the other classes
    (SAEBench's prepare_probe_data). rows: class -> the indices of its windows."""
    pos = rows[label]
    others = [c for c in rows if c != label]
    per_class = math.ceil(len(pos) / len(others))
    neg = torch.cat([rows[c][torch.randperm(len(rows[c]), generator=gen)[:per_class]] for c in others])
    neg = neg[torch.randperm(len(neg), generator=gen)[:len(pos)]]
    idx = torch.cat([pos, neg])
    return idx, torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])


def k_sparse_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, ks: tuple[int, ...]
                      ) -> dict[int, float]:
    """{k: test accuracy} of the L2 logistic probe on the k features of largest |mean difference| on train."""
    out = {}
    for k in ks:
        idx = lp.top_mean_diff(train_x, train_y, min(k, train_x.shape[1]))
        w, b = lp.fit_logistic(train_x[:, idx], train_y)
        out[k] = lp.accuracy(lp.logits(test_x[:, idx], w, b) > 0, test_y)
    return out


def probe_task(codes: dict[str, Tensor], window_doc: Tensor, doc_labels: list[str | None], ks: tuple[int, ...],
               seed: int = 0) -> dict:
    """One label task: {"classes", "dropped_classes", "train_windows", "test_windows", "full_probe_accuracy",
    "accuracy": {name: {k: mean test accuracy over classes}}, "per_class": {class: {name: {k: acc}}}}.
    codes: {name: (W, n)} pooled per window, with the raw "activations" among them (the full probe's input)."""
    split, dropped = split_documents(doc_labels, seed)
    out: dict = {"classes": sorted(split), "dropped_classes": dropped}
    if len(split) < 2:
        out["skipped"] = f"fewer than two classes with two or more documents ({len(split)})"
        return out
    owner = window_doc.tolist()
    side_rows = []
    for side in (0, 1):
        rows = {}
        for c, docs in split.items():
            members = set(docs[side])
            rows[c] = torch.tensor([w for w, d in enumerate(owner) if d in members], dtype=torch.int64)
        side_rows.append(rows)
    empty = [c for c in split if min(len(side_rows[0][c]), len(side_rows[1][c])) == 0]  # documents without tokens
    for c in empty:
        del split[c], side_rows[0][c], side_rows[1][c]
    out["dropped_classes"] += empty
    out["classes"] = sorted(split)
    if len(split) < 2:
        out["skipped"] = f"fewer than two classes with windows on both sides ({len(split)})"
        return out
    out["train_windows"] = sum(len(r) for r in side_rows[0].values())
    out["test_windows"] = sum(len(r) for r in side_rows[1].values())
    gen = torch.Generator().manual_seed(seed)
    per_class: dict[str, dict] = {}
    full = []
    for label in split:
        (tr, ytr), (te, yte) = (one_vs_rest(rows, label, gen) for rows in side_rows)
        x = codes["activations"]
        w, b = lp.fit_logistic(x[tr], ytr)
        full.append(lp.accuracy(lp.logits(x[te], w, b) > 0, yte))
        per_class[label] = {name: k_sparse_accuracy(c[tr], ytr, c[te], yte, ks)
                            for name, c in codes.items() if name != "activations"}
    names = [n for n in codes if n != "activations"]
    out["full_probe_accuracy"] = sum(full) / len(full)
    out["accuracy"] = {n: {k: sum(per_class[c][n][k] for c in split) / len(split) for k in ks} for n in names}
    out["per_class"] = per_class
    return out


def run_sparse_probing(lm, tokenizer, site: str, corpus: str | Path, decompositions: dict, *, context_size: int,
                       excluded: list[int], ks: tuple[int, ...] = KS, fields: tuple[str, ...] = LABEL_FIELDS,
                       docs_per_class: int = 32, windows_per_doc: int = 1, batch_size: int = 4,
                       device: str = "cpu", seed: int = 0) -> dict:
    """Sparse probing of every decomposition on the label tasks corpus carries (module docstring). Returns
    {"corpus", "ks", "documents", "tasks": {field: probe_task(...)}} or {"corpus", "skipped": why}."""
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    records = labelled_records(corpus, fields)
    if not records:
        return {"corpus": str(corpus), "skipped": f"corpus {str(corpus)!r} carries no labels {list(fields)} "
                "(a built-in or cached corpus name, or a .jsonl whose records have them)"}
    docs = sample_documents(records, fields, docs_per_class, seed)
    codes, window_doc = pooled_codes(lm, site, tokenizer, [records[i]["text"] for i in docs], decompositions,
                                     context_size=context_size, windows_per_doc=windows_per_doc, excluded=excluded,
                                     batch_size=batch_size, device=device)
    tasks = {}
    for field in fields:
        labels = [None if records[i].get(field) is None else str(records[i][field]) for i in docs]
        tasks[field] = probe_task(codes, window_doc, labels, tuple(ks), seed)
    return {"corpus": str(corpus), "ks": list(ks), "documents": len(docs), "windows": int(window_doc.numel()),
            "tasks": tasks}
