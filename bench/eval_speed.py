"""The main job's evaluation phase (`run_eval`: held-out windows, baselines, metrics, report) timed three ways
in one run on the same windows and SAE, and their metrics compared:

- before: the evaluation as it was before issue #18's part 5: one whole forward of the model per variant and
  batch, the baselines fitted on the store's rows as stored (the main job's store keeps bfloat16, on which its
  FastICA ran all 400 iterations without converging), the ICA baseline by scikit-learn's FastICA (fit_before),
  fp32 linears by PyTorch's default GEMM (MKL on x86; oneDNN's, fastsae.ops.cpu_gemm, switched off);
- reference: today's baselines (fitted once, shared with fastsae's path) and GEMMs, the straightforward forwards;
- fastsae: today's: the blocks below the site once per batch, the blocks above it batched over the variants,
  the LM head a chunk of scored positions at a time; the baselines fitted on full-precision activations
  (eval_run.fit_activations), FastICA's iterations in float32 on a CPU (baselines.fit); fp32 linears on a CPU
  by oneDNN (fastsae.ops.cpu_gemm).

fastsae and reference must agree on every metric (rtol 1e-5); fastsae and before (rtol 1e-4: MKL against
oneDNN) on the model's and the SAE's
(the baselines were refitted, so theirs move: the report lists them side by side).

    python -m bench.eval_speed --sae runs/gemma/train/sae                  # the main job's SAE and settings
    python -m bench.eval_speed --sae runs/gemma/train/sae --tokens 1024    # fewer windows
    python -m bench.eval_speed --random-model gemma-3-270m                 # no weights, no trained SAE

--random-model builds, in a temporary directory, a randomly initialised model of Gemma 3 270M's exact
architecture (RANDOM_MODELS) with fastsae's character-level tokenizer, and a random TopK SAE of the main job's
shape at its site, whose metadata records the main job's training windows: the same work as the main job's
eval phase (the windows, variants, LM head and baseline fits have the same shapes, and the fit activations
are captured from the model, as the main job's are: its store keeps bfloat16, eval_run.fit_activations), so the
timings are representative, while the metric values mean nothing; but for the ICA fit, an upper bound: on the
random model's activations it runs all 400 iterations, where the main job's converges after ~110
(eval_run.fit_activations). It needs no download, for a GPU machine offline. There is no store there, so
the before path's baselines are fitted on the same captured activations (on a CPU, FastICA in float64
is all that differs).
--layers, --vocab and --width shrink that model for a quick test.

The reference path reuses the fastsae path's baseline fits and is charged their time. Minutes of the before
path go to its ICA fit (400 float64 iterations of two 640 × 640 × 32,768 GEMMs on 2 CPU cores; bench/ica.py
times the fit alone). Also times the LM head's GEMMs alone (every variant's logits at every
scored position), the part no exact evaluation can skip: the cross-entropy and the KL need each variant's
full log-softmax.
Prints a table and saves JSON + markdown under bench/results/evaluation/eval-speed-<device>-<date>.*
(eval-speed-random-… with --random-model)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import torch

from bench.saving import RESULTS, run_environment, save_report
from fastsae import SAE, SAEConfig, io
from fastsae.evaluation import baselines, eval_run
from fastsae.evaluation.eval_run import run_eval
from fastsae.evaluation.evaluate import HEAD_ROWS
from fastsae.harvest.corpus import window_record

RTOL, ATOL = 1e-5, 1e-6  # what tests/evaluation/test_eval_fast.py asks of the two paths
# before runs its fp32 products on MKL, fastsae on oneDNN: another summation order. A ratio of small KLs
# (kl_div_score, ~0.005 nats on the tiny test model) moved by 1.8e-5 relative on an Intel Xeon.
BEFORE_RTOL = 1e-4
# Gemma 3 270M's architecture: `fastsae.model.load("gemma-3-270m")[0].config` (the models extra's GGUF as
# transformers 5.23 reads it; the values of google/gemma-3-270m's config.json). The layer types are the
# config's default for any depth: every 6th layer global attention, the others a 512-token sliding window.
# transformers 4.x has no rope_parameters but defaults to these two thetas (rope_theta, rope_local_base_freq).
RANDOM_MODELS = {"gemma-3-270m": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
    "vocab_size": 262_144, "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 32_768, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 512,
    "tie_word_embeddings": True,
    "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}})}
# The main job's SAE and what it trained on (fastsae.pipeline.runs.main_job: a TopK SAE, d_sae 4096, k 32, at
# resid_post.6, on 262,144 harvested tokens of english:train in windows of 128, the store's default)
MAIN_JOB_SAE, MAIN_JOB_SITE = {"activation": "topk", "d_sae": 4096, "k": 32}, "resid_post.6"
MAIN_JOB_WINDOWS = window_record("english:train", "text", 128, 0, [[0, 262_144 // 128]])


def random_model(name: str, path: Path, *, layers: int | None = None, vocab: int | None = None,
                 width: int | None = None, seed: int = 0) -> Path:
    """A randomly initialised model of name's architecture (RANDOM_MODELS; layers, vocab and width override
    its depth, vocabulary and d_model) with fastsae's character-level tokenizer, saved under path where
    fastsae.model.load finds it."""
    import transformers as T

    from fastsae.model.loading import char_tokenizer

    config_class, model_class, shape = RANDOM_MODELS[name]
    tokenizer = char_tokenizer()
    for key, value in (("num_hidden_layers", layers), ("vocab_size", vocab), ("hidden_size", width)):
        shape = shape if value is None else {**shape, key: value}
    if shape["vocab_size"] < len(tokenizer):
        raise ValueError(f"--vocab must be at least the tokenizer's {len(tokenizer)} tokens, got {vocab}")
    torch.manual_seed(seed)
    cfg = getattr(T, config_class)(**shape, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
    getattr(T, model_class)(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_sae(model: Path, site: str, d_in: int, path: Path, seed: int = 0) -> Path:
    """A randomly initialised SAE of the main job's shape, whose metadata names model and site and the main
    job's training windows (run_eval evaluates on the windows after them), saved under path."""
    sae = SAE(SAEConfig(d_in=d_in, **MAIN_JOB_SAE), seed=seed)
    sae.metadata.update(model=str(model), site=site, windows=MAIN_JOB_WINDOWS)
    return sae.save(path)


def compare(fast: dict, ref: dict, rtol: float = RTOL) -> tuple[float, str, list[str]]:
    """The largest |fast - ref| / max(|ref|, ATOL / rtol) over every float metric, where it is, and the
    metrics outside rtol (relative) and ATOL (absolute)."""
    worst, where, bad = 0.0, "", []
    for name, metrics in ref.items():
        for key, value in metrics.items():
            if not isinstance(value, float) or math.isnan(value):
                continue
            got = fast[name][key]
            rel = abs(got - value) / max(abs(value), ATOL / rtol)
            if rel > worst:
                worst, where = rel, f"{name}/{key}"
            if abs(got - value) > rtol * abs(value) + ATOL:
                bad.append(f"{name}/{key}: {got!r} vs {value!r}")
    return worst, where, bad


def head_gemm_seconds(model_name: str, device: str, rows: int, repeats: int = 1) -> float:
    """Seconds of the LM head's GEMMs alone for rows (variants × scored positions), HEAD_ROWS at a time."""
    from fastsae.model import lm_head_logits, load

    model, _ = load(model_name, device=device)
    d = model.get_output_embeddings().weight.shape[1]
    h = torch.randn(HEAD_ROWS, d, device=device)
    with torch.no_grad():
        lm_head_logits(model, h[:8])  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            for first in range(0, rows, HEAD_ROWS):
                lm_head_logits(model, h[:min(HEAD_ROWS, rows - first)])
        if device == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


class FitOnce:
    """baselines.fit that fits each (kind, inputs, n, k, seed) once: the second run_eval of this benchmark gets
    the first run's baselines (the same inputs and seed give the same fit) without paying again for the ICA
    fit (minutes on 2 CPU cores); the benchmark charges the first run's fitting time to both paths."""

    def __init__(self, fit):
        self.fit, self.done = fit, {}

    def __call__(self, kind, x, n, k, seed=0):
        key = (kind, n, k, seed, tuple(x.shape), float(x.double().sum()), float(x.double().square().sum()))
        if key not in self.done:
            self.done[key] = self.fit(kind, x, n, k, seed)
        return self.done[key]


FIT = baselines.fit


def fit_before(kind: str, x: torch.Tensor, n: int, k: int, seed: int = 0) -> baselines.Decomposition:
    """baselines.fit as it was when issue #18 was filed: the ICA baseline by scikit-learn's FastICA (float64,
    numpy on the CPU; its ConvergenceWarning silenced), where scikit-learn is installed; else fastsae's
    FastICA in float64 (the before path then understates the old fit's time: bench/ica.py has both)."""
    if kind != "ica" or BEFORE_ICA != "scikit-learn":
        return FIT(kind, x, n, k, seed)
    from sklearn.decomposition import FastICA

    x = x.double().cpu()
    mu = x.mean(0)
    n = min(n, *x.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ica = FastICA(n_components=n, whiten="unit-variance", random_state=seed, max_iter=400, tol=1e-3)
        ica.fit((x - mu).numpy())
    return baselines.ica_decomposition(torch.from_numpy(ica.mixing_), mu, min(k, n))


BEFORE_ICA = "scikit-learn" if importlib.util.find_spec("sklearn") else "fastsae, float64"
PATHS = ("fastsae", "reference", "before")  # fastsae's first: it fits the baselines, the reference reuses them


@contextlib.contextmanager
def pipeline(path: str):
    """run_eval as of path. "before": the evaluation before issue #18 part 5 — the straightforward forwards,
    the baselines fitted on the store's rows whatever their precision (the main job's keep bfloat16), the
    ICA baseline by scikit-learn (fit_before) and every fp32 linear (the model's, the SAE encoder's) by
    PyTorch's F.linear, MKL on x86, with oneDNN switched off (fastsae.ops.cpu_gemm) — with its own baseline
    fits. Otherwise today's, the fits shared (FitOnce)."""
    if path != "before":
        yield
        return
    saved = eval_run.FULL_PRECISION, baselines.ICA_CPU_DATA_DTYPE, baselines.fit, torch.backends.mkldnn.enabled
    eval_run.FULL_PRECISION = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    baselines.ICA_CPU_DATA_DTYPE, baselines.fit = None, FitOnce(fit_before)
    torch.backends.mkldnn.enabled = False  # fp32 linears by F.linear (MKL), not oneDNN (fastsae.ops.cpu_gemm)
    try:
        yield
    finally:
        eval_run.FULL_PRECISION, baselines.ICA_CPU_DATA_DTYPE, baselines.fit, torch.backends.mkldnn.enabled = saved


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--sae", help="a trained SAE directory (its metadata names model and site)")
    what.add_argument("--random-model", choices=sorted(RANDOM_MODELS),
                      help="a random model of this architecture and a random SAE of the main job's shape")
    parser.add_argument("--layers", type=int, help="the random model's depth (default: the real model's)")
    parser.add_argument("--vocab", type=int, help="the random model's vocabulary (default: the real model's)")
    parser.add_argument("--width", type=int, help="the random model's d_model (default: the real model's)")
    parser.add_argument("--site", default=MAIN_JOB_SITE, help="the random SAE's site (default: the main job's)")
    parser.add_argument("--tokens", type=int, default=4096, help="eval tokens (the main job's eval_tokens: 4096)")
    parser.add_argument("--fit-tokens", type=int, default=32_768,
                        help="activations the baselines are fitted on (run_eval's default, the main job's: 32,768)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per batch (run_eval's default)")
    parser.add_argument("--out", default=str(RESULTS / "evaluation"),
                        help="results directory (default: bench/results/evaluation)")
    return parser


def _time_paths(args, device: str) -> dict:
    """Every path of PATHS run on the same windows and SAE: {"runs": seconds per path, "results": metrics per
    path, "meta": the last run's metadata, "shape": the random model's config (or None), "n_variants",
    "scored" (positions the LM head scores per variant), "head_s" (its GEMMs alone)}."""
    runs, results, shape = {}, {}, None
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(baselines, "fit", FitOnce(FIT)):
        sae = args.sae
        if args.random_model:
            model = random_model(args.random_model, Path(tmp) / "model", layers=args.layers, vocab=args.vocab,
                                 width=args.width)
            shape = io.read_json(model / "config.json")
            sae = random_sae(model, args.site, shape["hidden_size"], Path(tmp) / "sae")
            print(f"random {args.random_model}: {shape['num_hidden_layers']} layers, d_model {shape['hidden_size']}, "
                  f"vocabulary {shape['vocab_size']:,}; random SAE {MAIN_JOB_SAE} at {args.site}", flush=True)
        for path in PATHS:
            start = time.perf_counter()
            with pipeline(path):
                results[path] = run_eval([sae], Path(tmp) / path, tokens=args.tokens, fit_tokens=args.fit_tokens,
                                         batch_size=args.batch_size, device=device, progress=False,
                                         reference=path != "fastsae")
            total = time.perf_counter() - start
            meta = io.read_json(Path(tmp) / path / "metrics.json")["meta"]
            runs[path] = {"eval_phase_s": total, **{f"{k}_s": v for k, v in meta["seconds"].items()}}
            print(f"{path}: eval phase {total:.1f} s ({meta['seconds']})", flush=True)
        n_variants = 3 + 2 + 4  # clean, zero, mean; the SAE with and without its error term; 4 baselines
        scored = results["fastsae"]["model"]["tokens"] - meta["eval_windows"]  # ≈ scored positions: a window's
        head_s = head_gemm_seconds(meta["model"], device, n_variants * scored)  # last token predicts nothing
    # the reference run reused the fastsae run's baselines: charge it the same fitting time
    ref = runs["reference"]
    ref["eval_phase_s"] += runs["fastsae"]["fit_baselines_s"] - ref["fit_baselines_s"]
    ref["fit_baselines_s"] = runs["fastsae"]["fit_baselines_s"]
    return {"runs": runs, "results": results, "meta": meta, "shape": shape, "n_variants": n_variants,
            "scored": scored, "head_s": head_s}


def _summary(timed: dict) -> dict:
    """Speedups, and how far the paths' metrics lie apart (fastsae against reference and against before)."""
    runs, results = timed["runs"], timed["results"]
    worst, where, bad = compare(results["fastsae"], results["reference"])
    # the before path fitted its baselines on other activations: only the model's and the SAE's metrics must agree
    evaluated = [name for name in results["before"] if name not in baselines.KINDS]
    worst_before, where_before, bad_before = compare({n: results["fastsae"][n] for n in evaluated},
                                                     {n: results["before"][n] for n in evaluated}, BEFORE_RTOL)
    ref, new, old = runs["reference"], runs["fastsae"], runs["before"]
    return {"speedup_eval_phase": ref["eval_phase_s"] / new["eval_phase_s"],
            "speedup_evaluate": ref["evaluate_s"] / new["evaluate_s"], "head_gemm_s": timed["head_s"],
            "max_relative_difference": worst, "at": where, "metrics_agree": not bad, "outside_tolerance": bad,
            "speedup_eval_phase_vs_before": old["eval_phase_s"] / new["eval_phase_s"],
            "before_max_relative_difference": worst_before, "before_at": where_before,
            "before_metrics_agree": not bad_before, "before_outside_tolerance": bad_before,
            "baselines_before_after": {kind: {key: [results[path][kind].get(key) for path in ("before", "fastsae")]
                                              for key in ("fvu", "ce_loss_recovered", "kl_div_with_sae")}
                                       for kind in baselines.KINDS if kind in results["fastsae"]}}


def _table(args, info: dict, timed: dict, summary: dict) -> str:
    runs, n_variants, shape = timed["runs"], timed["n_variants"], timed["shape"]
    lines = [f"# Evaluation phase of the main job, {info['device']} ({info['threads']} threads), {info['date']}", "",
             f"{info['model']} at {info['site']}, {info['windows']} windows × {info['context_size']} tokens "
             f"({info['eval_tokens']:,} kept tokens), batch {args.batch_size}; the SAE, PCA, ICA, neuron and random "
             f"baselines: {n_variants} variants per batch.", "",
             "| path | eval phase (s) | evaluate (s) | fit baselines (s) | baseline activations (s) |",
             "|---|---:|---:|---:|---:|"]
    for path in ("before", "reference", "fastsae"):
        r = runs[path]
        lines.append(f"| {path} | {r['eval_phase_s']:.1f} | {r['evaluate_s']:.1f} | {r['fit_baselines_s']:.1f} | "
                     f"{r['baseline_activations_s']:.1f} |")
    bad, bad_before, head_s = summary["outside_tolerance"], summary["before_outside_tolerance"], timed["head_s"]
    lines += ["", f"Speedup: evaluate {summary['speedup_evaluate']:.2f}×, whole eval phase "
              f"{summary['speedup_eval_phase']:.2f}×. The LM head's GEMMs alone ({n_variants} variants × "
              f"≈{timed['scored']:,} positions × vocabulary) take {head_s:.1f} s: "
              f"{100 * head_s / runs['fastsae']['evaluate_s']:.0f}% of fastsae's evaluate.",
              f"Metrics: largest relative difference {summary['max_relative_difference']:.2g} "
              f"({summary['at'] or 'every metric bitwise equal'}); "
              + ("all within" if not bad else f"{len(bad)} outside") + f" rtol {RTOL:g} + atol {ATOL:g}.", "",
              f"Against before (the straightforward forwards, the baselines fitted on the store's rows as stored, "
              f"the ICA baseline by {BEFORE_ICA}'s FastICA): whole eval phase "
              f"{summary['speedup_eval_phase_vs_before']:.2f}×. "
              f"The model's and the SAE's metrics: largest relative difference "
              f"{summary['before_max_relative_difference']:.2g} "
              f"({summary['before_at'] or 'every metric bitwise equal'}); "
              + ("all within" if not bad_before else f"{len(bad_before)} outside")
              + f" rtol {BEFORE_RTOL:g} + atol {ATOL:g} (MKL against oneDNN). "
              "The baselines were fitted anew (on full-precision activations, FastICA's iterations in float32 on "
              "a CPU), so theirs move:", "",
              "| baseline | FVU before | FVU after | CE loss recovered before | after |", "|---|---:|---:|---:|---:|"]
    for kind, pairs in summary["baselines_before_after"].items():
        (fvu0, fvu1), (ce0, ce1) = pairs["fvu"], pairs["ce_loss_recovered"]
        lines.append(f"| {kind} | {fvu0:.4f} | {fvu1:.4f} | {ce0:.4f} | {ce1:.4f} |")
    if args.random_model:
        lines += ["", f"The model is randomly initialised with {args.random_model}'s architecture "
                  f"({shape['num_hidden_layers']} layers, d_model {shape['hidden_size']}, vocabulary "
                  f"{shape['vocab_size']:,}) and the SAE is random: the timings are representative, the metric "
                  f"values mean nothing; the ICA fit runs all 400 iterations here, fewer on the real model's "
                  f"activations."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    timed = _time_paths(args, device)
    meta, shape = timed["meta"], timed["shape"]
    summary = _summary(timed)
    model_name = meta["model"] if not args.random_model else f"{args.random_model}, randomly initialised"
    info = run_environment(device, model=model_name, site=meta["site"], sae=str(args.sae or "random"),
                           eval_tokens=timed["results"]["fastsae"]["model"]["tokens"], windows=meta["eval_windows"],
                           context_size=meta["context_size"], batch_size=args.batch_size,
                           variants=timed["n_variants"], head_rows=HEAD_ROWS, rtol=RTOL, atol=ATOL,
                           fit_tokens=meta["baseline_fit_tokens"], before_ica=BEFORE_ICA,
                           random_model=args.random_model and {"layers": shape["num_hidden_layers"],
                                                               "d_model": shape["hidden_size"],
                                                               "vocab": shape["vocab_size"]})
    kind = "eval-speed-random" if args.random_model else "eval-speed"
    save_report(args.out, f"{kind}-{info['device'].replace(' ', '_')}-{info['date']}",
                {"meta": info, "runs": timed["runs"], "summary": summary}, _table(args, info, timed, summary))
    return 0 if summary["metrics_agree"] and summary["before_metrics_agree"] else 1

if __name__ == "__main__":
    raise SystemExit(main())
