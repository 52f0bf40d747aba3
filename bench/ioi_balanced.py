"""python -m bench.ioi_balanced: does name-balanced training data lift the SAE's IOI ceiling past 0.8? (issue 28)

    python -m bench.ioi_balanced corpus --out DIR [--tokens 2097152]     # control.jsonl, balanced.jsonl, corpus.json
    python -m bench.ioi_balanced measure --control-store S --balanced-store S --heldout-store S \\
        --sae CONTROL_SAE BALANCED_SAE --out DIR                          # ioi-balanced.json

bench.ioi_names found the ceiling (every latent patched, the error term left corrupted) following how often the
training data held the prompts' names: at resid_post.3, 0.789 on IOI prompts of the 12 names research:train's
5.2M tokens held most often, 0.090 on 12 it never held. The IOI names are modern American first names; the
corpus is mostly older books. This experiment changes the training data and nothing else. Two corpora:

- control.jsonl: research:train's documents in a seeded order, until they hold `tokens` Gemma tokens (and 5%
  more, so that a harvest of `tokens` fills);
- balanced.jsonl: the first half of those documents, and name passages worth the other half. A name passage is
  a sentence of research:train that holds an IOI name the corpus already uses as a name (SOURCE_MIN occurrences
  or more: David, John, Thomas, ...), copied with each such name replaced by an IOI name drawn at random. The
  draw is one injective mapping per document and copy, so a document's people stay distinct and consistent; the
  copies go on until the passages hold half the tokens. Every IOI name then occurs, hundreds of times, in the
  contexts that names occur in, and no IOI prompt or template is in the data.

bench.seeds' causal stage harvests both at resid_post.3 (where the ceiling was highest), trains one 16,384-latent
TopK SAE (k 32) on each with the same recipe and steps, and runs `measure`: bench.ioi_names' measurement of both
SAEs (name groups ranked by the control store's counts, the ceiling on prompts of every name too), each IOI
name's count in both stores, and each SAE's FVU on held-out research:test tokens (what the balanced data costs on
general text).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from bench import ioi_names
from fastsae import io
from fastsae.analysis.interventions.ioi import NAMES, single_token_names
from fastsae.analysis.sae_dirs import load_saes
from fastsae.harvest.corpus import read_documents
from fastsae.harvest.store import ActivationStore
from fastsae.model import load

CORPUS, MODEL = "research:train", "gemma-3-270m"
TOKENS = 2_097_152  # per SAE: 512 steps of bench.seeds' batch of 4,096
SOURCE_MIN = 20  # occurrences in research:train for an IOI name to count as one the corpus uses as a name
SLACK = 1.05  # tokens written per token harvested: windows lose a BOS each, documents end in an EOS
SENTENCE = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


def _name_pattern(names: list[str]) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b")


def count_names(documents: list[str], names: list[str]) -> Counter:
    """How often each name occurs as a whole, capitalised word."""
    pattern, counts = _name_pattern(names), Counter()
    for text in documents:
        counts.update(pattern.findall(text))
    return counts


def name_sentences(text: str, pattern: re.Pattern) -> list[str]:
    return [s.strip() for s in SENTENCE.split(text) if pattern.search(s)]


def substituted(sentences: list[str], pattern: re.Pattern, targets: list[str], rng: random.Random) -> str:
    """The sentences joined, each source name replaced by its target: one injective draw for all of them."""
    present = sorted({m for s in sentences for m in pattern.findall(s)})
    mapping = dict(zip(present, rng.sample(targets, len(present)), strict=True))
    return " ".join(pattern.sub(lambda m: mapping[m.group(1)], s) for s in sentences)


def passages(documents: list[str], sources: list[str], targets: list[str], seed: int = 0) -> Iterator[str]:
    """Name passages, one per document holding a source name, copy after copy, each copy in its own order."""
    pattern = _name_pattern(sources)
    holding = [found for text in documents if (found := name_sentences(text, pattern))]
    if not holding:
        raise ValueError(f"no document holds any of the source names {sources}")
    rng, copy = random.Random(seed), 0
    while True:
        for index in random.Random(seed + copy).sample(range(len(holding)), len(holding)):
            yield substituted(holding[index], pattern, targets, rng)
        copy += 1


def _take(texts, tokenizer, tokens: int) -> tuple[list[str], int]:
    """Texts from the iterable, in order, until they hold `tokens` tokens (an EOS each)."""
    out, held = [], 0
    for text in texts:
        if held >= tokens:
            break
        out.append(text)
        held += len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) + 1
    if held < tokens:
        raise ValueError(f"the corpus holds {held:,} tokens, fewer than the {tokens:,} asked for")
    return out, held


def build(tokenizer, documents: list[str], out: Path, tokens: int, seed: int = 0) -> dict:
    """control.jsonl, balanced.jsonl and corpus.json (what they hold) in out."""
    names = single_token_names(tokenizer, NAMES)
    counts = count_names(documents, names)
    sources = sorted(n for n in names if counts[n] >= SOURCE_MIN)
    order = random.Random(seed).sample(documents, len(documents))
    control, control_tokens = _take(order, tokenizer, int(tokens * SLACK))
    base, base_tokens = _take(control, tokenizer, int(tokens * SLACK / 2))
    names_part, names_tokens = _take(passages(documents, sources, names, seed), tokenizer, int(tokens * SLACK / 2))
    out.mkdir(parents=True, exist_ok=True)
    for name, texts in (("control", control), ("balanced", base + names_part)):
        lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
        io.atomic_write(out / f"{name}.jsonl", lambda tmp, lines=lines: Path(tmp).write_text(lines))
    meta = {"corpus": CORPUS, "seed": seed, "tokens": tokens, "names": len(names), "source_min": SOURCE_MIN,
            "sources": {n: counts[n] for n in sources}, "corpus_counts": {n: counts[n] for n in names},
            "control": {"documents": len(control), "tokens": control_tokens},
            "balanced": {"documents": len(base), "document_tokens": base_tokens, "passages": len(names_part),
                         "passage_tokens": names_tokens,
                         "passage_counts": dict(count_names(names_part, names).most_common())}}
    io.write_json(out / "corpus.json", meta)
    return meta


def measure(model, tokenizer, control: ActivationStore, balanced: ActivationStore, heldout: ActivationStore,
            saes: dict) -> dict:
    """saes: {label: (path, site, sae)} -> ioi-balanced.json's content."""
    out = ioi_names.measure(model, tokenizer, control, {path: (site, sae) for path, site, sae in saes.values()},
                            heldout)
    names = single_token_names(tokenizer, NAMES)
    ids = {tokenizer.encode(" " + n, add_special_tokens=False)[0]: n for n in names}
    sites = {site for _, site, _ in saes.values()}
    balanced_counts = ioi_names.name_rows(balanced, sites, list(ids))[0]
    out["balanced_store"], out["balanced_store_tokens"] = str(balanced.path), balanced.tokens
    out["balanced_counts"] = {ids[t]: c for t, c in balanced_counts.items()}
    out["labels"] = {label: path for label, (path, _, _) in saes.items()}
    return out


def _summary(result: dict) -> list[str]:
    lines = []
    for label, path in result["labels"].items():
        r = result["saes"][path]
        lines.append(f"{label}: ceiling {r['all']['all_latents_fraction']:.3f} on every name (FVU names "
                     f"{r['all']['fvu_names']:.3f}), {r['frequent']['all_latents_fraction']:.3f} on the "
                     f"{result['group']} most frequent, {r['rare']['all_latents_fraction']:.3f} on the least; "
                     f"held-out FVU {r['heldout_fvu']:.3f}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("corpus", help="write control.jsonl, balanced.jsonl and corpus.json")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--tokens", type=int, default=TOKENS, help="tokens each SAE trains on")
    c.add_argument("--model", default=MODEL, help="whose tokenizer counts the tokens")
    m = sub.add_parser("measure", help="the two SAEs' ceilings, name counts and held-out FVU")
    m.add_argument("--model", default=MODEL)
    for store in ("control", "balanced", "heldout"):
        m.add_argument(f"--{store}-store", type=Path, required=True)
    m.add_argument("--sae", nargs=2, required=True, metavar=("CONTROL", "BALANCED"))
    m.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    model, tokenizer = load(args.model)
    if args.command == "corpus":
        meta = build(tokenizer, list(read_documents(CORPUS)), args.out, args.tokens)
        print(f"{len(meta['sources'])} source names; balanced: {meta['balanced']['passages']:,} name passages "
              f"({meta['balanced']['passage_tokens']:,} tokens) beside {meta['balanced']['documents']:,} documents")
        return 0
    saes = {label: (path, *next(iter(load_saes([path]).items()))) for label, path in zip(
        ("control", "balanced"), args.sae, strict=True)}
    result = measure(model, tokenizer, ActivationStore(args.control_store), ActivationStore(args.balanced_store),
                     ActivationStore(args.heldout_store), saes)
    args.out.mkdir(parents=True, exist_ok=True)
    io.write_json(args.out / "ioi-balanced.json", result)
    print("\n".join(_summary(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
