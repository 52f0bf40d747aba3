"""`fastsae train`: train an SAE on activations, from a store, a model streamed, an array or the toy
(fastsae.pipeline.train_run, with the settings of a config file and the flags on top)."""

from __future__ import annotations

import argparse

from . import shared_flags as flags

# The config fields the flags set: an error naming one is reported against the flag (fastsae.cli's handler),
# e.g. "fastsae train: --steps: ScheduleConfig.total_steps must be an int >= 1 or None, got -1".
FLAG_NAMES = {
    "--data": ("DataConfig.source",), "--site": ("DataConfig.site", "site"), "--model": ("DataConfig.model", "model"),
    "--corpus": ("DataConfig.corpus",), "--tokens": ("DataConfig.tokens",),
    "--context-size": ("DataConfig.context_size",), "--batch-size": ("DataConfig.batch_size",),
    "--d-sae": ("SAEConfig.d_sae",), "--k": ("SAEConfig.k",), "--l1": ("SAEConfig.l1_coefficient",),
    "--dtype": ("SAEConfig.dtype",), "--lr": ("OptimizerConfig.lr",), "--steps": ("ScheduleConfig.total_steps",),
    "--checkpoint-every": ("CheckpointConfig.every",), "--resample-every": ("DeadLatentConfig.resample_every",),
    "--auxk": ("DeadLatentConfig.auxk_coefficient",), "--shard-latents": ("shard_latents",),
    "--dead-window": ("DeadLatentConfig.window_tokens",),
    "--config": ("run settings",), "--kind": ("SAEConfig.kind",),  # --in-site is --site: errors name --site
    "--out-site": ("DataConfig.target_site", "target_site"), "--jumprelu-sparsity": ("SAEConfig.jumprelu_sparsity",),
    "--matryoshka-widths": ("SAEConfig.matryoshka_widths",), "--jumprelu-threshold": ("SAEConfig.jumprelu_threshold",),
    "--jumprelu-bandwidth": ("SAEConfig.jumprelu_bandwidth",), "--sites": ("DataConfig.sites", "sites"),
}
FLAG_NAMES.update({"--kl": ("TrainConfig.kl_coefficient",), "--resample": ("DeadLatentConfig.preset",),
                   "--no-b-dec": ("TrainConfig.b_dec_init",)})


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train an SAE on activations (an .npy/.safetensors array, or the toy)")
    p.add_argument("--data", help="'toy' (default), an activation store directory (fastsae harvest), "
                                  "'stream' (straight from --model, no store), or an (N, d_in) .npy or "
                                  ".safetensors array")
    flags.add_site(p, help="the store's site to train on (needed when it holds several), or the model's with "
                           "--data stream")
    flags.add_model(p, default=None, help="--data stream: the model to run ('gemma-3-270m', a directory)")
    flags.add_corpus(p, help="--data stream: the corpus (default english-classics)")
    flags.add_tokens(p, help="token budget: of the corpus windows (--data stream), or the first whole shards of a "
                             "store holding at least this many vectors (default: all)")
    flags.add_context_size(p, help="--data stream: window length (default 128)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="scale store activations to mean norm sqrt(d) while training, folded into the saved SAE "
                        "(default: on for stores)")
    p.add_argument("--config", help='JSON file {"sae": {...}, "train": {...}, "data": {...}} ("train" by flat '
                                    'names, or nested by concern with "format_version": 2, as in a run.json); '
                                    'flags override it')
    flags.add_out(p, "runs/train", "run directory")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's newest checkpoint, "
                                                         "with its run.json (--steps still sets the run's length)")
    p.add_argument("--d-sae", type=int)
    p.add_argument("--activation", choices=("relu", "topk", "batchtopk", "jumprelu"))
    p.add_argument("--k", type=int)
    p.add_argument("--kind", choices=("sae", "transcoder", "skip_transcoder", "crosscoder"),
                   help="'transcoder': read --in-site, predict --out-site (e.g. mlp_in.6 -> mlp_out.6, from one "
                        "store); 'skip_transcoder' adds a learned linear map in -> out; 'crosscoder': one dictionary "
                        "over --sites (default: sae)")
    p.add_argument("--sites", nargs="+", metavar="SITE",
                   help="a crosscoder's sites in the store, in order (e.g. resid_post.3 resid_post.6 resid_post.9), "
                        "each normalised apart")
    p.add_argument("--in-site", help="a transcoder's input site in the store (the same as --site)")
    p.add_argument("--out-site", help="a transcoder's output site in the store, harvested with the input site")
    p.add_argument("--jumprelu-sparsity", choices=("step", "tanh", "quadratic", "l1"),
                   help="jumprelu's sparsity term (default step; l1 keeps θ frozen)")
    p.add_argument("--jumprelu-threshold", type=float, metavar="THETA",
                   help="jumprelu's initial θ, every latent (default 1e-3), in the units of the normalised inputs")
    p.add_argument("--jumprelu-bandwidth", type=float, metavar="EPS",
                   help="width of the rectangle kernel of θ's straight-through gradient (default 1e-3)")
    p.add_argument("--matryoshka-widths", type=int, nargs="+", metavar="M",
                   help="a Matryoshka SAE's nested prefix widths (d_sae appended when missing)")
    p.add_argument("--l1", type=float, help="L1 coefficient (relu/jumprelu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--lr", type=float)
    p.add_argument("--steps", type=int)
    flags.add_batch_size(p)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--resample-every", type=int)
    _add_preset_flags(p)
    p.add_argument("--auxk", type=float, help="AuxK coefficient (topk/batchtopk; Gao et al. use 1/32)")
    p.add_argument("--dead-window", type=int, metavar="TOKENS",
                   help="a latent is dead (for AuxK and resampling) when silent on the last TOKENS rows (default "
                        "1,000,000: give a run shorter than that a quarter of its tokens, or AuxK never starts)")
    flags.add_seed(p, default=None)
    p.add_argument("--b-dec-init", choices=("zeros", "mean"),
                   help="'mean': start b_dec at the first batch's mean (residual streams have a large offset)")
    flags.add_progress(p)
    p.add_argument("--shard-latents", "--latent-shards", type=int, nargs="?", const=0, metavar="N",
                   help="under torchrun: split the latents over every rank (or over N ranks, the others being data "
                        "replicas); without it, torchrun trains data parallel")
    p.set_defaults(func=_train, flag_names=FLAG_NAMES)


def _add_preset_flags(p: argparse.ArgumentParser) -> None:
    """--resample, --tied, --no-b-dec and --kl: the seeds' training variants (docs/guides/training.md)."""
    p.add_argument("--resample", choices=("anthropic",),
                   help="'anthropic': Towards Monosemanticity's resampling schedule (resample at 25k/50k/75k/100k "
                        "steps, dead = silent for 12.5k steps), taken as a 125k-step run and scaled to --steps "
                        "(rounded down): resample at 20/40/60/80%% of the run, dead window 10%% of the run (times "
                        "--batch-size rows), none in the last 20%%")
    p.add_argument("--tied", action="store_true", help="W_enc = W_dec^T (implies --no-normalize: a tied SAE "
                                                       "cannot fold the input scale)")
    p.add_argument("--no-b-dec", action="store_true",
                   help="no decoder bias: b_dec stays 0 and untrained, not subtracted from the input (with --tied: "
                        "Cunningham et al. 2023's SAE)")
    p.add_argument("--kl", type=float, metavar="COEF",
                   help="KL + reconstruction: loss += COEF * KL(clean || spliced), the model's next-token "
                        "distribution with x_hat spliced in at the site; trains on token windows (a store's recorded "
                        "corpus windows and its model, or --data stream's), BOS/pad positions left clean and "
                        "uncounted")


def _given(values: dict) -> dict:
    """The flags given: a flag left out keeps the config file's value (or the default)."""
    return {k: v for k, v in values.items() if v is not None}


def _train(args: argparse.Namespace) -> int:
    from ..pipeline import settings_from, train_run

    if args.in_site and args.site and args.in_site != args.site:
        raise ValueError(f"--in-site: it names the same setting as --site; got {args.in_site!r} and {args.site!r}")
    site = args.in_site or args.site
    if args.sites and (args.kind not in (None, "crosscoder") or site):
        raise ValueError("--sites: a crosscoder (--kind crosscoder) reads --sites, two or more, instead of --site; "
                         f"got --kind {args.kind}, --sites {args.sites}, --site {site}")
    if args.activation == "jumprelu" and args.jumprelu_sparsity is None and not args.config:
        # SAEConfig.from_dict reads a jumprelu config without the field as "l1" (θ frozen: files written before θ
        # trained); flags are not such a file, and get SAEConfig's own default
        args.jumprelu_sparsity = "step"
    transcoder = args.kind in ("transcoder", "skip_transcoder")  # b_dec is the output's bias, not the input's centre
    if transcoder and not args.out_site:
        if args.data not in (None, "toy"):
            raise ValueError(f"--out-site: a {args.kind} predicts another site of the store than --in-site; name it")
        args.out_site = "toy:y"  # the toy's pairs: a second true dictionary over the same codes (fastsae.toy)
    settings = settings_from(  # the config file's settings, the flags given on top
        args.config,
        sae=_given({"d_sae": args.d_sae, "activation": args.activation, "k": args.k, "l1_coefficient": args.l1,
                    "dtype": args.dtype, "kind": args.kind, "jumprelu_sparsity": args.jumprelu_sparsity,
                    "matryoshka_widths": args.matryoshka_widths, "jumprelu_threshold": args.jumprelu_threshold,
                    "jumprelu_bandwidth": args.jumprelu_bandwidth,
                    "n_sites": len(args.sites) if args.sites else None,
                    "apply_b_dec_to_input": False if transcoder or args.no_b_dec else None,
                    "tied": True if args.tied else None}),
        train=_given({"lr": args.lr, "total_steps": args.steps, "checkpoint_every": args.checkpoint_every,
                      "resample_every": args.resample_every, "auxk_coefficient": args.auxk,
                      "dead_window_tokens": args.dead_window, "seed": args.seed,
                      "b_dec_init": args.b_dec_init, "kl_coefficient": args.kl}),
        data=_given({"source": args.data, "batch_size": args.batch_size, "seed": args.seed, "site": site,
                     "normalize": args.normalize, "model": args.model, "corpus": args.corpus, "tokens": args.tokens,
                     "context_size": args.context_size, "target_site": args.out_site, "sites": args.sites}))
    _presets(args, settings)
    train_run(args.out, settings, resume=args.resume, progress=flags.progress(args),
              shard_latents=args.shard_latents, total_steps=args.steps)  # --resume --steps N: the run's new length
    return 0


def _presets(args: argparse.Namespace, settings) -> None:
    """--resample, --tied and --no-b-dec, on the settings of the config file and the other flags."""
    import dataclasses

    from ..train.train_config import DeadLatentConfig

    if args.resample:
        if args.resample_every is not None:
            raise ValueError("--resample: give --resample or --resample-every, not both")
        dead = DeadLatentConfig.preset(args.resample, steps=settings.train.schedule.total_steps,
                                       batch_size=settings.data.batch_size)
        settings.train = settings.train.replace(resample_every=None, resample_at=dead.resample_at,
                                                dead_window_tokens=dead.window_tokens)
    if args.no_b_dec:
        if args.b_dec_init not in (None, "none"):
            raise ValueError(f"--no-b-dec: b_dec stays 0, so --b-dec-init {args.b_dec_init} does not apply")
        settings.train = settings.train.replace(b_dec_init="none")
    if args.tied:
        if args.normalize:
            raise ValueError("--tied: a tied SAE cannot fold the input scale (W_enc = W_dec^T); drop --normalize")
        settings.data = dataclasses.replace(settings.data, normalize=False)
