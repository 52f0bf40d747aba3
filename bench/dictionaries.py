"""python -m bench.dictionaries: every kind of dictionary fastsae trains, on the same ≥ 1M Gemma 3 270M tokens, each
evaluated with its spliced CE loss recovered, plus the fused-vs-naive timing of the Matryoshka loss.

    python -m bench.dictionaries                 # train, evaluate, time, report (resumable: done jobs are skipped)
    python -m bench.dictionaries --list

The activations are bench.seeds' `layers` harvest (resid_post.3/.6/.9, mlp_in.6, mlp_out.6 of the same tokens,
research:train): each dictionary trains on its first whole shards holding 1,048,576 vectors (--tokens, one epoch:
no vector twice) and is evaluated on 4,096 held-out tokens of research:test. The report goes to
bench/results/dictionaries-<device>-<date>/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from bench.cpu_step import cpu_name
from bench.saving import RESULTS, run_environment, save_report
from bench.seeds import Job, run_job
from bench.seeds import _marker as marker
from fastsae import SAE

TOKENS = 1_048_576
BATCH = 1024  # 1,024 steps in the one epoch: the main job's recipe (1,000 steps of 1,024), here on distinct tokens
D_SAE = 8192
EVAL_TOKENS = 4096  # the main job's: an evaluation runs ~50 tokens/s on 2 cores (a forward per variant)
# The main job's recipe (fastsae.pipeline.runs.main_job): b_dec at the data's mean, and a dead window of a quarter
# of the run so that AuxK starts (the default 1M-token window is the whole run: 96.6% of a TopK SAE's latents
# were silent on held-out tokens in the first run, trained without these)
RECIPE = ("--b-dec-init", "mean", "--dead-window", str(TOKENS // 4))
TOPK = ("--activation", "topk", "--k", "32", "--auxk", "0.03125")  # AuxK at Gao et al.'s 1/32
JUMPRELU = ("--activation", "jumprelu", "--jumprelu-threshold", "1.0", "--jumprelu-bandwidth", "0.05")
KINDS = {  # name: (what it is, the train flags)
    "topk": ("SAE, TopK k=32 (the reference)", ("--site", "resid_post.6", *TOPK)),
    # θ starts where 32 of 8,192 latents fire at initialisation: with b_dec at the mean, the centred normalised
    # inputs have E‖x − b_dec‖² = 81 (not 640), so the unit encoder rows give pre-activations of std 0.36, whose
    # 1 − 32/8192 quantile is 0.98 (measured on a 4,096-row batch; the first run's 2.66, for unit variance, left
    # L0 at 0 by step 50). ε = 0.05 is 14% of that std (the default 1e-3 saw almost no pre-activation in its
    # window). Adam moves θ by about lr per step, ~0.4 over the epoch: the report gives how far it moved.
    "jumprelu-step": ("JumpReLU, θ trained, L0 through the step's STE (λ 0.1)",
                      ("--site", "resid_post.6", *JUMPRELU, "--jumprelu-sparsity", "step", "--l1", "0.1")),
    "jumprelu-quadratic": ("JumpReLU, θ trained, quadratic L0 penalty towards 32",
                           ("--site", "resid_post.6", *JUMPRELU, "--jumprelu-sparsity", "quadratic", "--k", "32")),
    "matryoshka": ("Matryoshka BatchTopK k=32, prefixes 512/2048/8192",
                   ("--site", "resid_post.6", "--activation", "batchtopk", "--k", "32", "--auxk", "0.03125",
                    "--matryoshka-widths", "512", "2048", "8192")),
    "transcoder": ("transcoder mlp_in.6 → mlp_out.6, TopK k=32",
                   ("--kind", "transcoder", "--in-site", "mlp_in.6", "--out-site", "mlp_out.6", *TOPK)),
    "skip-transcoder": ("skip transcoder mlp_in.6 → mlp_out.6, TopK k=32",
                        ("--kind", "skip_transcoder", "--in-site", "mlp_in.6", "--out-site", "mlp_out.6", *TOPK)),
    "crosscoder": ("acausal crosscoder over resid_post.3/.6/.9, TopK k=32",
                   ("--kind", "crosscoder", "--sites", "resid_post.3", "resid_post.6", "resid_post.9", *TOPK)),
}


def _train(name: str, flags: tuple[str, ...]) -> Job:
    def argv(w: Path) -> list[str]:
        out = w / "dictionaries" / name
        resume = ["--resume"] if (out / "run.json").exists() else []
        return ["train", "--data", str(w / "harvest-layers"), "--tokens", str(TOKENS), "--steps",
                str(TOKENS // BATCH), "--batch-size", str(BATCH), "--d-sae", str(D_SAE), "--checkpoint-every", "256",
                *RECIPE, "--out", str(out), *flags, *resume]
    return Job(f"dict-{name}", "train", argv)


def _evaluate(name: str) -> Job:
    return Job(f"dict-eval-{name}", "evaluate", lambda w: [
        "eval", "--sae", str(w / "dictionaries" / name / "sae"), "--corpus", "research:test", "--tokens",
        str(EVAL_TOKENS), "--baselines", "none", "--out", str(w / "dictionaries" / f"{name}-eval")])


JOBS = [*(_train(name, flags) for name, (_, flags) in KINDS.items()), *(_evaluate(name) for name in KINDS)]


def kind_row(w: Path, name: str) -> dict:
    """One kind's evaluation: FVU (of the output site for a transcoder), L0, dead fraction, CE loss recovered."""
    path = w / "dictionaries" / f"{name}-eval" / "metrics.json"
    if not path.exists():
        return {"kind": name, "what": KINDS[name][0], "status": f"pending: dict-eval-{name}"}
    results = json.loads(path.read_text())["results"]
    m = next(v for k, v in results.items() if k != "model")
    row = {"kind": name, "what": KINDS[name][0], "status": "done", "tokens": TOKENS, "fvu": m["fvu"], "l0": m["l0"],
           "dead_fraction": m["dead_fraction"], "ce_loss_recovered": m["ce_loss_recovered"]}
    if "per_site" in m:  # a crosscoder: each site's own FVU
        row["fvu_per_site"] = {site: s["fvu"] for site, s in m["per_site"].items()}
    if name.startswith("jumprelu"):
        row["theta"] = theta_moved(w / "dictionaries" / name)
    return row


def theta_moved(run: Path) -> dict:
    """How far training moved JumpReLU's θ from its start: mean and largest |θ − θ₀| over the latents (folding
    the input scale leaves θ as it is: the pre-activations do not change)."""
    sae = SAE.load(run / "sae")
    start, theta = sae.cfg.jumprelu_threshold, sae.threshold.detach().double()
    moved = (theta - start).abs()
    return {"start": start, "mean": theta.mean().item(), "mean_abs_change": moved.mean().item(),
            "max_abs_change": moved.max().item()}


def write_report(w: Path, out: Path | None = None) -> Path:
    env = run_environment("cpu", cpu=cpu_name(), store=str(w / "harvest-layers"), train_tokens=TOKENS, d_sae=D_SAE,
                          eval_tokens=EVAL_TOKENS)
    out = out or RESULTS / f"dictionaries-{env['device']}-{env['date']}"
    rows = [kind_row(w, name) for name in KINDS]
    lines = ["| kind | dictionary | FVU | L0 | dead | CE loss recovered |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "done":
            lines.append(f"| {r['kind']} | {r['what']} | {r['status']} | | | |")
            continue
        fvu = f"{r['fvu']:.4f}" + (" (" + ", ".join(f"{s} {v:.3f}" for s, v in r["fvu_per_site"].items()) + ")"
                                   if "fvu_per_site" in r else "")
        lines.append(f"| {r['kind']} | {r['what']} | {fvu} | {r['l0']:.1f} | {r['dead_fraction']:.3f} | "
                     f"{r['ce_loss_recovered']:.4f} |")
    lines += ["", f"{TOKENS:,} training vectors each (one epoch), d_sae {D_SAE}; evaluation on {EVAL_TOKENS:,} "
                  "held-out research:test tokens; dead = silent on those tokens; a transcoder's FVU is its output "
                  "site's, its CE loss recovered with the MLP output replaced; a crosscoder's CE with every site "
                  f"replaced. CPU: {env['cpu']}."]
    lines += [f"JumpReLU {r['kind']}: θ from {r['theta']['start']} moved by {r['theta']['mean_abs_change']:.4f} on "
              f"average (at most {r['theta']['max_abs_change']:.3f}); mean θ {r['theta']['mean']:.3f}."
              for r in rows if "theta" in r]
    return save_report(out, "dictionaries", {"environment": env, "rows": rows}, "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.dictionaries", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/seeds"), help="bench.seeds' run directory")
    p.add_argument("--out", type=Path, help="report directory (default bench/results/dictionaries-<device>-<date>)")
    p.add_argument("--only", nargs="+", metavar="KIND", choices=sorted(KINDS), help="only these kinds")
    p.add_argument("--list", action="store_true")
    args = p.parse_args(argv)
    jobs = [j for j in JOBS if not args.only or _kind(j) in args.only]
    if args.list:
        for job in jobs:
            print(f"{'done' if marker(args.work, job).exists() else '    '}  {job.stage:<9} {job.name}")
        return
    if not marker(args.work, Job("harvest-layers", "harvest", list)).exists() and not _has_rows(args.work):
        sys.exit("bench.dictionaries: no layers harvest yet: run python -m bench.seeds --only harvest-layers "
                 "--stage harvest")
    for job in tqdm(jobs, desc="dictionaries", unit="job"):
        run_job(job, args.work)
    write_report(args.work, args.out)


def _kind(job: Job) -> str:
    return job.name.removeprefix("dict-").removeprefix("eval-")


def _has_rows(w: Path) -> bool:
    """Whether the layers harvest, finished or not, has committed the training budget's rows."""
    manifest = w / "harvest-layers" / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text())["tokens"] >= TOKENS


if __name__ == "__main__":
    main()
