"""python -m bench.seeds: the seeds' training findings at research scale, one command, resumable stage by stage.

    python -m bench.seeds --list                 # every job, its stage, and whether it is done
    python -m bench.seeds --stage harvest        # one stage; a killed run resumes where it stopped
    python -m bench.seeds --stage train --only scale-1M
    python -m bench.seeds                        # every stage in order: harvest, train, evaluate, compare, causal,
                                                 # report

Stages (each job is a `fastsae` command run in a subprocess with its own progress bar; a job is done when its
marker `<work>/done/<job>.json` exists, written after the command succeeded, so a rerun skips it and an
interrupted one is rerun with --resume, which the harvest and train commands honour):

    harvest    `seeds`: 10.49M tokens of research:train at resid_post.6 of Gemma 3 270M (≥ 10M distinct vectors once
               BOS is dropped); `layers`: the first 5.24M of the same windows at resid_post.3/.6/.9 and
               mlp_in.6/mlp_out.6 (crosscoders, transcoders, circuits and connections); `heldout`: 16,384 tokens
               of research:test at resid_post.6 (the seeds' activation correlation)
    train      the dictionaries below, each on distinct tokens: steps × batch never exceeds the store's rows, so
               no token is seen twice by one dictionary
    evaluate   `fastsae eval` of each dictionary on 8,192 tokens of held-out technical prose (research:test:technical)
               and of held-out narrative (research:test:narrative): FVU, L0, dead fraction, CE loss recovered,
               perplexity
    compare    `fastsae compare` of the two seeds (universality: decoder cosines, and the Pearson correlation of
               their latents' activations on the held-out tokens, --correlation-store) and of 4k → 16k → 64k
               (feature splitting), after `fastsae features` of those three on the held-out tokens, so that
               their browsers (`fastsae browse`, <work>/features/<name>/browser) link parents and children
    causal     SAEs on the `layers` harvest, then IOI patching, erasure, circuits, connections and autointerp, and
               the feature browser of the k=32 SAE at resid_post.6 with a screenshot of its logit-drop histogram
               (bench/seeds_causal.py: its jobs run `python -m bench.<module>` or `fastsae`, and its rows)
    report     bench/results/seeds-<device>-<date>/report.md (+ .json): one row per finding, the seed's claim and
               number, ours, the verdict and the reason; a row whose jobs have not run yet says which; the causal
               stage's figures (PNG) copied into its figures/

The runs live in --work (default runs/seeds; 47 GB of activations). On 2 CPU cores the whole benchmark takes
many hours: run it a stage, or a job, at a time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from bench.cpu_step import cpu_name
from bench.saving import RESULTS, run_environment, save_report
from fastsae import io

MODEL, SITE, CORPUS = "gemma-3-270m", "resid_post.6", "research:train"
SEEDS_TOKENS = 81_920 * 128  # 10,485,760 tokens: 10.40M vectors once each window's BOS is dropped
LAYERS_TOKENS = 40_960 * 128  # the first half of the same window order
LAYER_SITES = ("resid_post.3", "mlp_in.6", "mlp_out.6", "resid_post.6", "resid_post.9")
BATCH = 4096
EVAL_CORPORA = {"technical": "research:test:technical", "narrative": "research:test:narrative"}
EVAL_TOKENS = 8192  # per held-out corpus: an evaluation runs ~50 tokens/s on 2 cores
# universality's activation correlation: Pearson r of the two seeds' latents over held-out tokens (16,384 tokens x
# 16,384 latents: 1 GiB of centred fp32 codes per seed)
HELDOUT_CORPUS, HELDOUT_TOKENS = "research:test", 16_384
STAGES = ("harvest", "train", "evaluate", "compare", "causal", "report")


@dataclass(frozen=True)
class Job:
    name: str
    stage: str
    argv: Callable[[Path], list[str]]  # the `fastsae` arguments, given the work directory
    module: str = "fastsae"  # run as `python -m <module> <argv>` (bench.seeds_causal's jobs run bench modules)


def _harvest(name: str, sites: tuple[str, ...], tokens: int, corpus: str = CORPUS) -> Job:
    return Job(f"harvest-{name}", "harvest", lambda w: [
        "harvest", "--model", MODEL, "--corpus", corpus, "--sites", *sites, "--tokens", str(tokens),
        "--dtype", "bfloat16", "--out", str(w / f"harvest-{name}"), "--resume"])


def _train(name: str, tokens: int | None, *flags: str, store: str = "seeds", site: str = SITE) -> Job:
    """A dictionary trained on the store's first `tokens` vectors (None: all of them), steps = tokens // BATCH, so
    that no vector is seen twice and the smaller budgets are prefixes of the larger ones."""
    def argv(w: Path) -> list[str]:
        out = w / "train" / name
        rows = store_rows(w, store)
        extra = [f(w) if callable(f) else f for f in flags]
        resume = ["--resume"] if (out / "run.json").exists() else []
        budget = ["--tokens", str(tokens)] if tokens else []  # the store's first shards (ActivationStore.prefix)
        steps = min(tokens or rows, rows) // BATCH
        # the main job's recipe: b_dec at the data's mean, latents dead after a quarter of the run (AuxK, resampling)
        recipe = ["--b-dec-init", "mean", "--dead-window", str(steps * BATCH // 4)]
        return ["train", "--data", str(w / f"harvest-{store}"), "--site", site, "--batch-size", str(BATCH),
                "--steps", str(steps), *budget, "--checkpoint-every", "100", *recipe, "--out", str(out), *extra,
                *resume]
    return Job(name, "train", argv)


def store_rows(w: Path, store: str) -> int:
    """The vectors a finished harvest stored (BOS, EOS and padding positions are not stored)."""
    if not _marker(w, Job(f"harvest-{store}", "harvest", list)).exists():
        raise KeyError(f"harvest-{store}")
    return json.loads((w / f"harvest-{store}" / "manifest.json").read_text())["tokens"]


def _matched_k(w: Path) -> str:
    """TopK's k at the L1 ReLU's measured L0 (its evaluation on held-out technical prose), for the matched pair."""
    l0 = eval_metrics(w, "relu-resample", "technical")["l0"]
    return str(max(1, round(l0)))


TOPK = ("--activation", "topk", "--k", "32", "--auxk", "0.03125")
TRAIN_JOBS = [
    _train("scale-0.25M", 262_144, "--d-sae", "16384", *TOPK),
    _train("scale-1M", 1_048_576, "--d-sae", "16384", *TOPK),
    _train("scale-4M", 4_194_304, "--d-sae", "16384", *TOPK),
    _train("scale-10M", None, "--d-sae", "16384", *TOPK),
    _train("seed1-10M", None, "--d-sae", "16384", *TOPK, "--seed", "1"),
    _train("split-4k", None, "--d-sae", "4096", *TOPK),
    _train("split-64k", None, "--d-sae", "65536", *TOPK),
    _train("relu-resample", None, "--d-sae", "16384", "--activation", "relu", "--resample", "anthropic"),
    _train("topk-matched", None, "--d-sae", "16384", "--activation", "topk", "--k", _matched_k,
           "--auxk", "0.03125"),
    # KL + reconstruction against MSE alone at L0 64, on 1M tokens each: every KL step runs Gemma's upper layers
    # forward and backward (about 10× an MSE step on 2 CPU cores). KL_COEF puts the KL term (~0.3 nats) on the
    # scale of the summed mse of inputs normalised to ||x|| = sqrt(640) (~30 at FVU 0.05).
    _train("mse-k64-1M", 1_048_576, "--d-sae", "16384", "--activation", "topk", "--k", "64", "--auxk", "0.03125"),
    _train("kl-k64-1M", 1_048_576, "--d-sae", "16384", "--activation", "topk", "--k", "64", "--auxk", "0.03125",
           "--kl", "100"),
]
DICTIONARIES = [job.name for job in TRAIN_JOBS]


def _evaluate(name: str, tag: str) -> Job:
    def argv(w: Path) -> list[str]:
        if not _marker(w, Job(name, "train", list)).exists():
            raise KeyError(name)  # its dictionary is trained first
        return ["eval", "--sae", str(w / "train" / name / "sae"), "--corpus", EVAL_CORPORA[tag], "--tokens",
                str(EVAL_TOKENS), "--baselines", "none", "--out", str(w / "eval" / f"{name}-{tag}")]
    return Job(f"eval-{name}-{tag}", "evaluate", argv)


def _needs(w: Path, *jobs: str) -> None:
    """KeyError naming the first of jobs not done yet (run_job runs it first)."""
    for job in jobs:
        if not _marker(w, Job(job, "", list)).exists():
            raise KeyError(job)


def _compare(name: str, a: str, b: str, *flags: str, caches: bool = False) -> Job:
    """`fastsae compare` of two trained dictionaries; flags naming `{work}` get the work directory. With caches,
    the two dictionaries' feature caches (built first) get the family annotations their browsers link by."""
    def argv(w: Path) -> list[str]:
        _needs(w, a, b, *((f"features-{a}", f"features-{b}") if caches else ()))
        linked = ["--cache-a", str(w / "features" / a), "--cache-b", str(w / "features" / b)] if caches else []
        return ["compare", str(w / "train" / a / "sae"), str(w / "train" / b / "sae"), "--tau", "0.7",
                "--out", str(w / "compare" / name), *linked, *(f.format(work=w) for f in flags)]
    return Job(f"compare-{name}", "compare", argv)


def _features(name: str) -> Job:
    """A dictionary's feature cache on the held-out tokens (top contexts; no ablation effects), for its browser."""
    def argv(w: Path) -> list[str]:
        _needs(w, name, "harvest-heldout")
        return ["features", "--sae", str(w / "train" / name / "sae"), "--store", str(w / "harvest-heldout"),
                "--effects", "0", "--out", str(w / "features" / name)]
    return Job(f"features-{name}", "compare", argv)


def _browse(name: str) -> Job:
    """The feature browser of a split dictionary, after the comparisons wrote its parent/child links."""
    def argv(w: Path) -> list[str]:
        _needs(w, *(f"compare-{c}" for c in SPLIT_COMPARISONS if name in SPLIT_COMPARISONS[c]))
        return ["browse", "--cache", str(w / "features" / name)]
    return Job(f"browse-{name}", "compare", argv)


SPLIT_COMPARISONS = {"split-4k-16k": ("split-4k", "scale-10M"), "split-16k-64k": ("scale-10M", "split-64k")}
SPLIT_SIZES = ("split-4k", "scale-10M", "split-64k")


JOBS = [_harvest("seeds", (SITE,), SEEDS_TOKENS), _harvest("layers", LAYER_SITES, LAYERS_TOKENS),
        _harvest("heldout", (SITE,), HELDOUT_TOKENS, HELDOUT_CORPUS), *TRAIN_JOBS,
        *(_evaluate(name, tag) for name in DICTIONARIES for tag in EVAL_CORPORA),
        _compare("seeds", "scale-10M", "seed1-10M", "--correlation-store", "{work}/harvest-heldout",
                 "--correlation-tokens", str(HELDOUT_TOKENS)), *(_features(name) for name in SPLIT_SIZES),
        *(_compare(name, a, b, caches=True) for name, (a, b) in SPLIT_COMPARISONS.items()),
        *(_browse(name) for name in SPLIT_SIZES)]


# ---- running -------------------------------------------------------------------------------------------------

def _marker(w: Path, job: Job) -> Path:
    return w / "done" / f"{job.name}.json"


def run_job(job: Job, w: Path) -> None:
    """Run one job's command unless its marker says it is done; a failure raises with the command's exit code."""
    if _marker(w, job).exists():
        return
    argv = _argv_after_dependencies(job, w)
    command = "fastsae" if job.module == "fastsae" else f"python -m {job.module}"
    print(f"[{job.stage}] {job.name}: {command} {' '.join(argv)}", file=sys.stderr, flush=True)
    started = dt.datetime.now()
    code = subprocess.call([sys.executable, "-m", job.module, *argv])
    if code:
        raise SystemExit(f"bench.seeds: {job.name} failed (exit {code}); rerun the same command to resume it")
    io.write_json(_marker(w, job), {"argv": argv, "started": started.isoformat(timespec="seconds"),
                                    "seconds": round((dt.datetime.now() - started).total_seconds(), 1)})


def _argv_after_dependencies(job: Job, w: Path) -> list[str]:
    """The job's arguments; a job they wait for (their KeyError names it, e.g. topk-matched's wait for the ReLU's
    evaluation) runs first, whatever its stage, so that one pass of the stages runs everything."""
    names = {j.name: j for j in JOBS}
    while True:
        try:
            return job.argv(w)
        except KeyError as err:
            needed = names.get(err.args[0])
            if needed is None or _marker(w, needed).exists():
                raise
            run_job(needed, w)


def eval_metrics(w: Path, name: str, tag: str) -> dict:
    """One dictionary's evaluation results on one held-out corpus (KeyError while it has not run)."""
    path = w / "eval" / f"{name}-{tag}" / "metrics.json"
    if not path.exists():
        raise KeyError(f"eval-{name}-{tag}")
    results = json.loads(path.read_text())["results"]
    return {**next(v for k, v in results.items() if k != "model"), "model": results["model"]}


# ---- the report ----------------------------------------------------------------------------------------------

def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def _scale_row(w: Path) -> dict:
    ours = []
    for name in ("scale-0.25M", "scale-1M", "scale-4M", "scale-10M"):
        t, n = eval_metrics(w, name, "technical"), eval_metrics(w, name, "narrative")
        ours.append(f"{name.removeprefix('scale-')}: FVU {_fmt(t['fvu'])}/{_fmt(n['fvu'])}, "
                    f"CE rec. {_fmt(t['ce_loss_recovered'])}/{_fmt(n['ce_loss_recovered'])}")
    best = min(eval_metrics(w, "scale-10M", tag)["ce_loss_recovered"] for tag in EVAL_CORPORA)
    verdict = "reproduced" if best >= 0.95 else "not reproduced"
    return {"finding": "Scale: more training tokens, better dictionary; the dictionary model keeps ~95% of the "
                       "model's performance",
            "seed": "001: the SAE-spliced model recovers 95% of the model's loss (one-layer model, MLP, 8B tokens)",
            "ours": "; ".join(ours) + " (technical/narrative)", "verdict": verdict,
            "reason": f"16,384-latent TopK k=32 at resid_post.6 of Gemma 3 270M; worst held-out CE recovered at 10M "
                      f"tokens {best:.3f} against the seed's 0.95 (a different model, site and loss)"}


def _resample_row(w: Path) -> dict:
    r, t = eval_metrics(w, "relu-resample", "technical"), eval_metrics(w, "topk-matched", "technical")
    return {"finding": "L1 ReLU with Anthropic resampling vs TopK with AuxK at matched L0",
            "seed": "001: resampling dead neurons keeps the dictionary alive (dead fraction low)",
            "ours": f"ReLU+resampling: L0 {r['l0']:.1f}, dead {r['dead_fraction']:.3f}, FVU {_fmt(r['fvu'])}, CE rec. "
                    f"{_fmt(r['ce_loss_recovered'])}; TopK+AuxK: L0 {t['l0']:.1f}, dead {t['dead_fraction']:.3f}, "
                    f"FVU {_fmt(t['fvu'])}, CE rec. {_fmt(t['ce_loss_recovered'])}",
            "verdict": "reproduced" if r["dead_fraction"] <= 0.1 else "not reproduced",
            "reason": "dead = silent on the evaluation's held-out tokens; the schedule is the published one scaled to "
                      "the run's length (fastsae.train.resample)"}


def _universality_row(w: Path) -> dict:
    report = json.loads((w / "compare" / "seeds" / "comparison.json").read_text())
    s = report["summary"]
    ours = (f"decoder cosine: mean max {s['mmcs_ab']:.3f}/{s['mmcs_ba']:.3f}, {s['frac_a_matched']:.1%} of latents "
            f"have a match ≥ 0.7")
    reason = "16,384-latent TopK k=32, seeds 0 and 1, the same 10.4M tokens in different orders"
    shared, measure = s["frac_a_matched"], "decoder cosine ≥ 0.7 (no held-out correlation yet)"
    if "activation_correlation" in report:  # absent from a comparison run before the held-out harvest
        c = report["activation_correlation"]["summary"]
        ours += (f"; activation correlation: mean max {c['mean_max_corr_ab']:.3f}/{c['mean_max_corr_ba']:.3f}, "
                 f"{c['frac_a_matched']:.1%}/{c['frac_b_matched']:.1%} of live latents have r ≥ 0.7")
        reason += (f"; r is Pearson's over {c['tokens']:,} held-out tokens ({HELDOUT_CORPUS}), over the "
                   f"{c['live_a']:,}/{c['live_b']:,} latents that fire there")
        shared, measure = c["frac_a_matched"], "activation correlation r ≥ 0.7 (seed 001's measure)"
    return {"finding": "Universality: two seeds learn the same features",
            "seed": "001: runs with different random initialisations learn similar features (activation "
                    "correlation across runs)",
            "ours": ours + " (seed 0 → seed 1 / seed 1 → seed 0)",
            "verdict": "reproduced" if shared >= 0.5 else "not reproduced",
            "reason": reason + f"; the verdict: ≥ half of seed 0's latents matched by {measure}"}


def _splitting_row(w: Path) -> dict:
    parts = []
    for name in ("split-4k-16k", "split-16k-64k"):
        s = json.loads((w / "compare" / name / "comparison.json").read_text())["splits"]["summary"]
        parts.append(f"{name.removeprefix('split-')}: {s['split']} of {s['small_features']} split, "
                     f"mean family {s['mean_family_size']:.2f}")
    return {"finding": "Feature splitting across dictionary sizes",
            "seed": "001: features of a small dictionary split into finer ones in larger dictionaries",
            "ours": "; ".join(parts), "verdict": "reproduced" if parts else "not reproduced",
            "reason": "a small latent's family: the large latents whose decoder cosine with it is ≥ 0.5"}


def _kl_row(w: Path) -> dict:
    m, k = (eval_metrics(w, name, "technical") for name in ("mse-k64-1M", "kl-k64-1M"))
    gain = m["perplexity_increase"] - k["perplexity_increase"]
    return {"finding": "KL + reconstruction training lowers the perplexity increase at the same L0",
            "seed": "000: GPT-2 small layer 4, L0 ≈ 60: +2.6 perplexity with KL training",
            "ours": f"L0 {k['l0']:.0f}: perplexity +{k['perplexity_increase']:.2f} with KL, "
                    f"+{m['perplexity_increase']:.2f} with MSE only (clean {m['perplexity_without_sae']:.1f})",
            "verdict": "reproduced" if gain > 0 else "not reproduced",
            "reason": "16,384-latent TopK k=64 on 1M tokens each at resid_post.6 (the seed's model and site differ); "
                      "KL coefficient 100 (bench.seeds)"}


ROWS: list[Callable[[Path], dict]] = [_scale_row, _resample_row, _kl_row, _universality_row, _splitting_row]

from bench import seeds_causal  # noqa: E402 — its jobs are built from Job and _train above

JOBS += seeds_causal.jobs(Job, _train)
ROWS += seeds_causal.ROWS


def report_rows(w: Path) -> list[dict]:
    """One row per finding; a finding whose jobs have not run yet is a 'pending' row naming the missing job."""
    rows = []
    for make in ROWS:
        try:
            rows.append(make(w))
        except (KeyError, FileNotFoundError) as err:
            name = make.__name__.strip("_").removesuffix("_row")
            missing = err.args[0] if isinstance(err, KeyError) else Path(err.filename).parent.name
            rows.append({"finding": name, "seed": "", "ours": "", "verdict": "pending",
                         "reason": f"not run yet: {missing} (python -m bench.seeds)"})
    return rows


def write_report(w: Path, out: Path | None = None) -> Path:
    rows = report_rows(w)
    env = run_environment("cpu", cpu=cpu_name(), work=str(w))
    out = out or RESULTS / f"seeds-{env['device']}-{env['date']}"
    lines = ["| finding | seed's claim | ours | verdict | reason |", "|---|---|---|---|---|"]
    lines += [f"| {r['finding']} | {r['seed']} | {r['ours']} | {r['verdict']} | {r['reason']} |" for r in rows]
    done = sorted(p.stem for p in (w / "done").glob("*.json"))
    payload = {"environment": env, "rows": rows, "jobs_done": done, "figures": copy_figures(w, out)}
    return save_report(out, "report", payload, "\n".join(lines))


def copy_figures(w: Path, out: Path) -> list[str]:
    """The causal stage's PNGs (IOI curves, erasure, circuits, connections, the logit-drop histogram) into
    out/figures, each named after the directory it came from; returns their names."""
    names = []
    for folder in seeds_causal.FIGURE_DIRS:
        for png in sorted((w / folder).glob("*.png")):
            name = f"{folder.name}-{png.name}"
            (out / "figures").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, out / "figures" / name)
            names.append(name)
    return names


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.seeds", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=STAGES, help="run one stage (default: every stage in order)")
    p.add_argument("--only", nargs="+", metavar="JOB", help="run only these jobs")
    p.add_argument("--work", type=Path, default=Path("runs/seeds"), help="run directory (default runs/seeds)")
    p.add_argument("--out", type=Path, help="report directory (default bench/results/seeds-<device>-<date>)")
    p.add_argument("--list", action="store_true", help="list the jobs and whether each is done")
    args = p.parse_args(argv)
    if args.list:
        for job in JOBS:
            print(f"{'done' if _marker(args.work, job).exists() else '    '}  {job.stage:<9} {job.name}")
        return
    unknown = set(args.only or ()) - {job.name for job in JOBS}
    if unknown:
        p.error(f"--only: unknown jobs {sorted(unknown)}; see --list")
    for stage in [args.stage] if args.stage else STAGES:
        if stage == "report":
            write_report(args.work, args.out)
            continue
        jobs = [j for j in JOBS if j.stage == stage and (not args.only or j.name in args.only)]
        for job in tqdm(jobs, desc=stage, unit="job", disable=not jobs):
            run_job(job, args.work)


if __name__ == "__main__":
    main()
