"""python -m bench.interventions: features as actions on Gemma 3 270M, the committed result of issue 14.

    python -m bench.interventions --sae runs/h14/train5/sae runs/h14/train6/sae runs/h14/train7/sae --site resid_post.6

Writes bench/results/analysis/interventions-<device>-<date>/ (or --out):
    patch.json, patch.png       IOI patching curves, SAE vs PCA vs neurons, 100 prompts: m = 1..64 at --site
                                (time and forwards per curve; --site-saes: more sparsities there, a curve
                                each), m = 1, 2, 4 .. 64 at the other SAEs' sites;
                                the baselines fitted on --patch-corpus (--fit-tokens of research:train by
                                default), the prompt-fitted PCA kept as the row pca_prompts
    erasure.json, erasure.png   gendered-pronoun erasure at --site: loss increase on the pronoun-predicting
                                tokens vs all others, SAE latents vs PCA directions chosen the same way, and
                                LEACE (--concept names: the next token a first name)
    circuit.json/.png/.svg      the circuit of the top SAE's latent most associated with the concept
    steer.json, steer.png       steering with that latent
    summary.md                  the numbers, with the environment: the parts' sections (summary-<part>.md)
                                in order, so that parts run one at a time (--skip) add up to one summary
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import time
from pathlib import Path

import torch

from bench.saving import RESULTS
from fastsae import io
from fastsae.analysis.interventions import circuit_ablation, erasure, ioi_patching, steering_sweep
from fastsae.analysis.interventions.latent_edits import SAEDictionary
from fastsae.analysis.sae_dirs import load_saes
from fastsae.harvest import read_documents, token_windows
from fastsae.model import capture, keep_mask, load, special_token_ids

SWEEP_MS = (1, 2, 4, 8, 16, 32, 64)
PARTS = ("patch", "erasure", "circuit", "steer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--sae", nargs="+", required=True, help="SAEs at adjacent sites (they record their sites)")
    parser.add_argument("--site", default="resid_post.6", help="site of the erasure (default resid_post.6)")
    parser.add_argument("--site-saes", nargs="+", default=[], metavar="SAE",
                        help="IOI patching: more SAEs at --site (other sparsities), one curve and ceiling each beside "
                             "--sae's, labelled by their run directory")
    parser.add_argument("--concept", default="gendered_pronouns", choices=sorted(erasure.CONCEPTS),
                        help="erasure's concept and the circuit root's (the top site's latent most associated with "
                             "predicting it; default gendered_pronouns)")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--max-m", type=int, default=64)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16, 64], help="erasure: directions ablated")
    parser.add_argument("--erasure-windows", type=int, default=96,
                        help="64-token windows with the concept: half fit, half evaluate")
    parser.add_argument("--circuit-tokens", type=int, default=16_384, help="corpus tokens searched for contexts")
    parser.add_argument("--windows-corpus", default="english-classics:test",
                        help="the erasure windows and the circuit contexts (64 tokens; default english-classics:test)")
    parser.add_argument("--patch-corpus", default="research:train",
                        help="IOI patching: the general corpus the PCA/neuron baselines are fitted on (default "
                             "research:train; 'prompts' fits them on the IOI prompts, as before issue 28)")
    parser.add_argument("--fit-tokens", type=int, default=32_768,
                        help="IOI patching: corpus tokens the baselines are fitted on (64-token windows)")
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    parser.add_argument("--out", help="default bench/results/analysis/interventions-cpu-<date>")
    args = parser.parse_args(argv)
    out = Path(args.out or RESULTS / "analysis" / f"interventions-cpu-{dt.date.today().isoformat()}")
    out.mkdir(parents=True, exist_ok=True)
    env = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "machine": platform.machine(), "date": dt.date.today().isoformat()}
    model, tokenizer = load(args.model)
    saes = load_saes(args.sae)
    header = f"# Features as actions on {args.model} ({env['device']}, {env['threads']} threads, {env['date']})"
    sections = {}

    windows = token_windows(tokenizer, read_documents(args.windows_corpus), 64, seed=1)
    concept = erasure.token_ids(tokenizer, erasure.CONCEPTS[args.concept])
    top_site = list(saes)[-1]
    if "patch" not in args.skip:
        sections["patch"] = patch_section(model, tokenizer, saes, out, args)
    if "erasure" not in args.skip:
        sections["erasure"] = erasure_section(erasure_part(model, saes, windows, concept, out, args, env))
    if {"circuit", "steer"} - set(args.skip):
        latent = _concept_latent(model, tokenizer, top_site, saes[top_site], windows[-args.circuit_tokens // 64:],
                                 concept)
    if "circuit" not in args.skip:
        sections["circuit"] = circuit_section(model, tokenizer, saes, (top_site, latent), windows, out, args, env)
    if "steer" not in args.skip:
        sections["steer"] = steer_section(model, tokenizer, top_site, saes[top_site], latent, out, env)
    print(write_summary(out, header, sections))
    print(f"results in {out}")
    return 0


def patch_section(model, tokenizer, saes, out: Path, args) -> list[str]:
    """IOI patching at every m at --site (the performance case: M = 64, 100 prompts); the layer sweep at a grid
    of m."""
    corpus = None if args.patch_corpus == "prompts" else token_windows(
        tokenizer, read_documents(args.patch_corpus), 64, args.fit_tokens, seed=1)
    if args.site_saes:  # several sparsities at --site: one mapping {label: sae}, one set of runs (ioi_patching)
        more = {_label(p): sae for p in args.site_saes for site, sae in load_saes([p]).items() if site == args.site}
        if args.site not in saes or len(more) != len(args.site_saes):
            raise SystemExit(f"--site-saes: every SAE must be at --site {args.site} (and have its own run directory)")
        saes = {**saes, args.site: {_label(saes[args.site].path): saes[args.site], **more}}
    report = ioi_patching.write_report(model, tokenizer, saes, out, model_name=args.model, n=args.prompts,
                                       max_m=args.max_m, ms=SWEEP_MS, full_site=args.site, corpus=corpus)
    fitted = next(iter(report["results"].values()))["baselines_fitted_on"]
    lines = ["## IOI patching (fraction of the clean logit difference restored)", "",
             f"Baselines fitted on the {fitted}" + (f" of {args.patch_corpus}" if corpus is not None else "")
             + (" (pca_prompts: PCA fitted on the prompts)" if corpus is not None else "") + ".", "",
             report["summary"], ""]
    for where, result in report["results"].items():
        times = ", ".join(f"{name} {c['seconds']:.0f} s / {c['forwards']} forwards"
                          for name, c in result["curves"].items())
        lines.append(f"- {where}: LD clean {result['clean_logit_diff']:.2f}, corrupted "
                     f"{result['corrupted_logit_diff']:.2f}; SAE with all {result['all_latents']} active latents "
                     f"patched: {result['all_latents_fraction']:.3f}, its error term alone: "
                     f"{result['error_only_fraction']:.3f}; curves (M={args.max_m}): {times}")
    return lines + [""]


def erasure_part(model, saes, windows, concept, out: Path, args, env: dict) -> dict:
    """Erase the concept at --site, on windows where it occurs at least twice (so that ~5% of positions are
    targets, not ~1%); saves erasure.json and its plot."""
    rich = erasure.next_token_mask(windows, concept).sum(1) >= 2
    chosen = windows[rich][:args.erasure_windows]
    target = erasure.next_token_mask(chosen, concept)
    result = erasure.erasure(model, args.site, saes[args.site], chosen, target, counts=args.counts,
                             fit_windows=args.erasure_windows // 2)
    result["concept"] = {"name": args.concept, "words": list(erasure.CONCEPTS[args.concept]), "token_ids": concept,
                         "env": env}
    io.write_json(out / "erasure.json", result)
    erasure.plot(result, out / "erasure.png")
    return result


def circuit_section(model, tokenizer, saes, root: tuple[str, int], windows, out: Path, args, env: dict) -> list[str]:
    start = time.perf_counter()
    site, latent = root
    contexts = circuit_ablation.top_contexts(model, site, saes[site], latent, windows[-args.circuit_tokens // 64:])
    graph = circuit_ablation.circuit(model, saes, root, contexts, depth=len(saes) - 1, tokenizer=tokenizer)
    graph.update(model=args.model, seconds=time.perf_counter() - start, env=env, concept=args.concept)
    circuit_ablation.save(graph, out / "circuit.json")
    circuit_ablation.draw(graph, out / "circuit.png")
    return ["## Circuit", "", "```", circuit_ablation.describe(graph), "```", f"({graph['seconds']:.0f} s)", ""]


def steer_section(model, tokenizer, site: str, sae, latent: int, out: Path, env: dict) -> list[str]:
    result = steering_sweep.steer(model, tokenizer, site, sae, latent, "The old man walked into the room, and",
                                  alphas=(0.0, 2.0, 5.0, 10.0, 20.0))
    result["env"] = env
    io.write_json(out / "steer.json", result)
    steering_sweep.plot(result, out / "steer.png")
    return ["## Steering", "", "```", steering_sweep.format_result(result), "```", ""]


def erasure_section(result: dict) -> list[str]:
    concept = result.get("concept", {}).get("name", "gendered_pronouns").replace("_", " ")
    lines = [f"## Concept erasure at {result['site']}: next token in {concept} ({result['target_positions']} "
             f"target and {result['other_positions']} other positions; clean loss {result['clean_loss_target']:.3f} / "
             f"{result['clean_loss_other']:.3f})", "",
             "| method | n | Δloss target | Δloss other | selectivity (Δtarget / Δother) |",
             "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        sel = f"{r['selectivity']:.1f}" if r["selectivity"] is not None else "other tokens' loss did not rise"
        lines.append(f"| {r['method']} | {r['n']} | {r['delta_target']:.3f} | {r['delta_other']:.4f} | {sel} |")
    return lines + [""]


def write_summary(out: Path, header: str, sections: dict[str, list[str]]) -> str:
    """Save each part's section as out/summary-<part>.md and assemble out/summary.md from every part's section
    on disk, in PARTS order: a part run on its own (--skip the others) replaces its section and keeps theirs."""
    for part, lines in sections.items():
        io.atomic_write(out / f"summary-{part}.md", lambda tmp, lines=lines: Path(tmp).write_text("\n".join(lines)))
    text = "\n".join([header, ""] + [(out / f"summary-{p}.md").read_text() for p in PARTS
                                     if (out / f"summary-{p}.md").is_file()]) + "\n"
    io.atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(text))
    return text


def _label(path) -> str:
    """An SAE's label in the IOI curves: its run directory (train/<name>/sae -> <name>)."""
    path = Path(path)
    return path.parent.name if path.name == "sae" else path.name


@torch.no_grad()
def _concept_latent(model, tokenizer, site, sae, windows, concept) -> int:
    """The latent of sae most associated (standardised mean difference) with predicting a concept token."""
    acts = torch.cat([capture(model, [site], input_ids=windows[i:i + 8])[site] for i in range(0, len(windows), 8)])
    keep = keep_mask(windows, special_token_ids(model, tokenizer))
    dictionary = SAEDictionary(sae)
    scores = erasure.association(dictionary, dictionary.codes(acts), erasure.next_token_mask(windows, concept), keep)
    return int(scores.argmax())


if __name__ == "__main__":
    raise SystemExit(main())
