"""`fastsae` on the command line.

Every subcommand runs under one handler (`main`): an error the user can fix (a bad flag value, a missing or
damaged file, a directory another run holds, a diverged run, a full disk: "no space left on device writing
PATH") prints one line, `fastsae <command>: <message>`, naming the flag where the message names the setting
it feeds, and exits 2, as argparse's own usage errors do; anything else is a bug: one line saying where the
full traceback was written, exit 1. `--debug` prints the traceback instead. Ctrl-C prints one line and
exits 130 (128 + SIGINT, what shells expect).
"""

from __future__ import annotations

import argparse
import errno
import re
import sys
import tempfile
import traceback

# The names the library gives the values a flag sets (config fields, function arguments): an error naming
# one of them is reported against the flag, e.g. "fastsae train: --steps: ScheduleConfig.total_steps must be
# an int >= 1 or None, got -1".
TRAIN_FLAGS = {
    "--data": ("DataConfig.source",), "--site": ("DataConfig.site", "site"), "--model": ("DataConfig.model", "model"),
    "--corpus": ("DataConfig.corpus",), "--tokens": ("DataConfig.tokens",),
    "--context-size": ("DataConfig.context_size",), "--batch-size": ("DataConfig.batch_size",),
    "--d-sae": ("SAEConfig.d_sae",), "--k": ("SAEConfig.k",), "--l1": ("SAEConfig.l1_coefficient",),
    "--dtype": ("SAEConfig.dtype",), "--lr": ("OptimizerConfig.lr",), "--steps": ("ScheduleConfig.total_steps",),
    "--checkpoint-every": ("CheckpointConfig.every",), "--resample-every": ("DeadLatentConfig.resample_every",),
    "--auxk": ("DeadLatentConfig.auxk_coefficient",), "--shard-latents": ("shard_latents",),
    "--config": ("run settings",),
}
HARVEST_FLAGS = {"--model": ("model",), "--sites": ("site", "sites"), "--corpus": ("corpus",), "--tokens": ("tokens",),
                 "--context-size": ("context_size",), "--batch-size": ("batch_size",), "--resume": ("resume",)}
EVAL_FLAGS = {"--model": ("model",), "--site": ("site",), "--corpus": ("corpus",), "--tokens": ("tokens",),
              "--context-size": ("context_size",), "--fit-tokens": ("fit_tokens",), "--batch-size": ("batch_size",)}
RUN_FLAGS = {"--model": ("model",), "--site": ("site",), "--corpus": ("corpus",), "--tokens": ("tokens",),
             "--d-sae": ("SAEConfig.d_sae", "d_sae"), "--k": ("SAEConfig.k", "k"),
             "--steps": ("ScheduleConfig.total_steps", "steps"), "--lr": ("OptimizerConfig.lr", "lr"),
             "--batch-size": ("DataConfig.batch_size", "batch_size"), "--eval-tokens": ("eval_tokens",),
             "--effects": ("effects",)}


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (`fastsae train: argument --steps: invalid int value: 'x'`,
    exit 2); subcommand parsers are of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user can fix from the command line: bad values and types, files (missing, unreadable, damaged:
    CorruptFileError is a ValueError), a directory another writer holds, a run that diverged, an optional
    package not installed (`pip install 'fastsae[models]'`)."""
    from .io import DirectoryLockedError

    return ValueError, TypeError, OSError, FloatingPointError, DirectoryLockedError, ImportError


# A full disk, a quota, a file too large, a read-only filesystem: errors only a writer meets (EIO is not one:
# a read may meet it too), which the user can fix.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or "(no message)"


def _name_the_flag(message: str, flags: dict[str, tuple[str, ...]]) -> str:
    """message with the flag whose setting it names first put in front, unless it names a flag already."""
    if re.search(r"(?<![\w-])--[a-z]", message):
        return message
    found = []
    for flag, names in flags.items():
        for name in names:  # a whole name, not part of a path or of a longer name
            hit = re.search(rf"(?<![\w./-]){re.escape(name)}(?![\w/])", message)
            if hit:
                found.append((hit.start(), flag))
    return f"{min(found)[1]}: {message}" if found else message


def _handle(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the subcommand; every error ends here as one line on stderr (see the module docstring)."""
    command = f"fastsae {args.command}"
    debug = getattr(args, "debug", False)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as stop:  # a subcommand's own exit: a message (one line, exit 2) or a status
        if isinstance(stop.code, str):
            print(f"{command}: {_one_line(stop.code)}", file=sys.stderr)
            return 2
        raise
    except BaseException as err:  # noqa: BLE001 - the one top-level handler
        if debug:
            traceback.print_exc()
        err = _disk_failure(err)
        if isinstance(err, _user_errors()):
            message = _one_line(str(err))
            if not _blames_no_flag(err):
                message = _name_the_flag(message, getattr(args, "flag_names", {}))
            print(f"{command}: {message}", file=sys.stderr)
            return 2
        where = "printed above" if debug else f"in {_write_traceback(args.command, argv)}; --debug prints it"
        print(f"{command}: unexpected error {type(err).__name__}: {_one_line(str(err))} (a bug: the full traceback "
              f"is {where})", file=sys.stderr)
        return 1


def _disk_failure(err: BaseException) -> BaseException:
    """A full disk or an I/O error that reached here unnamed (a SafetensorError wrapping one, a bare OSError
    from a writer outside fastsae.io) as the WriteFailedError the library's own writers raise: "no space left
    on device writing PATH" (PATH where the error knows it), never "unexpected error SafetensorError"."""
    from .io import WriteFailedError, write_failure

    if isinstance(err, WriteFailedError):
        return err
    if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
        return WriteFailedError(err.errno, err.filename)
    if not isinstance(err, OSError) and type(err).__name__ == "SafetensorError":
        return write_failure(err, None) or err
    return err


def _blames_no_flag(err: BaseException) -> bool:
    """A diverged run, a full disk: no one flag is to blame, and a path in the message is not a setting."""
    from .io import WriteFailedError

    return isinstance(err, (FloatingPointError, WriteFailedError))


def _write_traceback(command: str, argv: list[str]) -> str:
    with tempfile.NamedTemporaryFile("w", prefix=f"fastsae-{command}-", suffix=".txt", delete=False) as f:
        f.write(f"fastsae {' '.join(argv)}\n\n{traceback.format_exc()}")
    return f.name


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_report, run_recovery

    report = run_recovery(args.out)
    print(format_report(report))
    failed = [name for name, r in report["runs"].items() if r["mmcs"] < 0.9]
    print(f"\nSAEs and report.json written to {args.out}/")
    if failed:
        print(f"recovery FAILED (MMCS < 0.9) for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _train(args: argparse.Namespace) -> int:
    from .pipeline import settings_from, train_run

    def given(values: dict) -> dict:
        return {k: v for k, v in values.items() if v is not None}

    settings = settings_from(
        args.config,
        sae=given({"d_sae": args.d_sae, "activation": args.activation, "k": args.k, "l1_coefficient": args.l1,
                   "dtype": args.dtype}),
        train=given({"lr": args.lr, "total_steps": args.steps, "checkpoint_every": args.checkpoint_every,
                     "resample_every": args.resample_every, "auxk_coefficient": args.auxk, "seed": args.seed,
                     "b_dec_init": args.b_dec_init}),
        data=given({"source": args.data, "batch_size": args.batch_size, "seed": args.seed, "site": args.site,
                    "normalize": args.normalize, "model": args.model, "corpus": args.corpus, "tokens": args.tokens,
                    "context_size": args.context_size}))
    train_run(args.out, settings, resume=args.resume, progress=not args.no_progress, shard_latents=args.shard_latents,
              total_steps=args.steps)  # --resume --steps N: the run's new length
    return 0


def _harvest(args: argparse.Namespace) -> int:
    from .pipeline import harvest_run

    harvest_run(args.model, args.sites, args.out, corpus=args.corpus, tokens=args.tokens,
                context_size=args.context_size, text_field=args.text_field, seed=args.seed,
                batch_size=args.batch_size, dtype=args.dtype, model_dtype=args.model_dtype, device=args.device,
                resume=args.resume, progress=not args.no_progress)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from .evaluation.eval_run import run_eval

    run_eval(args.sae, args.out, model=args.model, site=args.site, corpus=args.corpus, tokens=args.tokens,
             context_size=args.context_size, baselines=() if args.baselines == ["none"] else tuple(args.baselines),
             fit_tokens=args.fit_tokens, batch_size=args.batch_size,
             device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), progress=not args.no_progress)
    return 0


def _run(args: argparse.Namespace) -> int:
    """The main job: harvest, train, evaluate; each step resumes where an interrupted run stopped."""
    from .pipeline import main_job

    main_job(args.out, model=args.model, site=args.site, corpus=args.corpus, tokens=args.tokens, d_sae=args.d_sae,
             k=args.k, steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_tokens=args.eval_tokens,
             baselines=() if args.baselines == ["none"] else tuple(args.baselines), fit_tokens=args.fit_tokens,
             device=args.device, effects=args.effects, progress=not args.no_progress)
    return 0


def _register_commands(sub) -> None:
    """Subcommands that live in fastsae/commands/, one module each (see its docstring)."""
    import importlib
    import pkgutil

    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="fastsae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    rn = sub.add_parser("run", help="the main job: harvest Gemma 3 270M on the built-in corpus, train an SAE, "
                                    "evaluate it (resumable)")
    rn.add_argument("--model", default="gemma-3-270m")
    rn.add_argument("--site", default="resid_post.6")
    rn.add_argument("--corpus", default="english:train",
                    help="built-in english (classics + modern prose; :train holds out every tenth document)")
    rn.add_argument("--tokens", type=int, default=262_144, help="tokens to harvest (default 262144)")
    rn.add_argument("--d-sae", type=int, default=4096)
    rn.add_argument("--k", type=int, default=32)
    rn.add_argument("--steps", type=int, default=1000)
    rn.add_argument("--batch-size", type=int, default=1024)
    rn.add_argument("--lr", type=float, default=1e-3)
    rn.add_argument("--eval-tokens", type=int, default=4096)
    rn.add_argument("--baselines", nargs="+", default=["pca", "ica", "neurons", "random"],
                    choices=("pca", "ica", "neurons", "random", "none"), help="compared in the evaluation")
    rn.add_argument("--fit-tokens", type=int, default=32_768, help="activations the baselines are fitted on")
    rn.add_argument("--effects", type=int, default=16, help="features whose ablation and attribution are measured")
    rn.add_argument("--device", help="default: cuda when available, else cpu")
    rn.add_argument("--out", default="runs/gemma")
    rn.add_argument("--no-progress", action="store_true")
    rn.set_defaults(func=_run, flag_names=RUN_FLAGS)

    demo = sub.add_parser("demo", help="ground-truth recovery on a toy dictionary (synthetic data, ~1.5 min)")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.set_defaults(func=_demo)

    hv = sub.add_parser("harvest", help="run a model over a corpus and store its activations at sites")
    hv.add_argument("--model", default="gemma-3-270m",
                    help="'gemma-3-270m', 'minilm-l6', a local model directory or a cached hub id")
    hv.add_argument("--sites", nargs="+", default=["resid_post.6"], help="e.g. resid_post.6 mlp_hidden.3")
    hv.add_argument("--corpus", default="english-classics",
                    help="'english-classics' (built in), a .txt/.jsonl file, a directory of .txt, a saved dataset")
    hv.add_argument("--text-field", default="text", help="the text field of JSONL records / dataset columns")
    hv.add_argument("--tokens", type=int, default=262_144, help="token budget (before BOS/EOS/pad are dropped)")
    hv.add_argument("--context-size", type=int, default=128)
    hv.add_argument("--out", default="runs/store", help="store directory (default: runs/store)")
    hv.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                    help="storage dtype of the activations")
    hv.add_argument("--model-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    hv.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    hv.add_argument("--device", help="default: cuda when available, else cpu")
    hv.add_argument("--seed", type=int, default=0, help="window shuffle seed")
    hv.add_argument("--resume", action="store_true", help="continue an interrupted harvest in --out")
    hv.add_argument("--no-progress", action="store_true")
    hv.set_defaults(func=_harvest, flag_names=HARVEST_FLAGS)

    tr = sub.add_parser("train", help="train an SAE on activations (an .npy/.safetensors array, or the toy)")
    tr.add_argument("--data", help="'toy' (default), an activation store directory (fastsae harvest), "
                                   "'stream' (straight from --model, no store), or an (N, d_in) .npy or "
                                   ".safetensors array")
    tr.add_argument("--site", help="the store's site to train on (needed when it holds several), or the "
                                   "model's with --data stream")
    tr.add_argument("--model", help="--data stream: the model to run ('gemma-3-270m', a directory)")
    tr.add_argument("--corpus", help="--data stream: the corpus (default english-classics)")
    tr.add_argument("--tokens", type=int, help="--data stream: token budget of the corpus windows")
    tr.add_argument("--context-size", type=int, help="--data stream: window length (default 128)")
    tr.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                    help="scale store activations to mean norm sqrt(d) while training, folded into the saved SAE "
                         "(default: on for stores)")
    tr.add_argument("--config", help='JSON file {"sae": {...}, "train": {...}, "data": {...}} ("train" by flat '
                                     'names, or nested by concern with "format_version": 2, as in a run.json); '
                                     'flags override it')
    tr.add_argument("--out", default="runs/train", help="run directory (default: runs/train)")
    tr.add_argument("--resume", action="store_true", help="continue from the run directory's newest checkpoint, "
                                                          "with its run.json (--steps still sets the run's length)")
    tr.add_argument("--d-sae", type=int)
    tr.add_argument("--activation", choices=("relu", "topk", "batchtopk", "jumprelu"))
    tr.add_argument("--k", type=int)
    tr.add_argument("--l1", type=float, help="L1 coefficient (relu/jumprelu)")
    tr.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    tr.add_argument("--lr", type=float)
    tr.add_argument("--steps", type=int)
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--checkpoint-every", type=int)
    tr.add_argument("--resample-every", type=int)
    tr.add_argument("--auxk", type=float, help="AuxK coefficient (topk/batchtopk; Gao et al. use 1/32)")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--b-dec-init", choices=("zeros", "mean"),
                    help="'mean': start b_dec at the first batch's mean (residual streams have a large offset)")
    tr.add_argument("--no-progress", action="store_true")
    tr.add_argument("--shard-latents", "--latent-shards", type=int, nargs="?", const=0, metavar="N",
                    help="under torchrun: split the latents over every rank (or over N ranks, the others being data "
                         "replicas); without it, torchrun trains data parallel")
    tr.set_defaults(func=_train, flag_names=TRAIN_FLAGS)
    ev = sub.add_parser("eval", help="metrics.json and plots for trained SAEs (a sweep) against baselines")
    ev.add_argument("--sae", nargs="+", required=True, help="SAE directories, or sweep directories holding them")
    ev.add_argument("--model", help="default: the model recorded with the SAE")
    ev.add_argument("--site", help="default: the site recorded with the SAE")
    ev.add_argument("--corpus", help="default: the corpus of the SAE's activation store, else english-classics")
    ev.add_argument("--tokens", type=int, default=16_384, help="held-out eval tokens (default 16384)")
    ev.add_argument("--context-size", type=int, help="default: the store's, else 128")
    ev.add_argument("--baselines", nargs="+", default=["pca", "ica", "neurons", "random"],
                    choices=("pca", "ica", "neurons", "random", "none"))
    ev.add_argument("--fit-tokens", type=int, default=32_768, help="activations the baselines are fitted on")
    ev.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    ev.add_argument("--device", help="default: cuda when available, else cpu")
    ev.add_argument("--out", default="runs/eval", help="report directory (default: runs/eval)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_eval, flag_names=EVAL_FLAGS)
    _register_commands(sub)
    for command in sub.choices.values():  # --debug after the subcommand too; SUPPRESS keeps the top level's
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="print the full traceback of an error")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0), or a usage error already printed on one line (2)
        return stop.code if isinstance(stop.code, int) else 2
    return _handle(args, argv)


if __name__ == "__main__":
    sys.exit(main())
