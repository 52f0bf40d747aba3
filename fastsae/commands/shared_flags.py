"""The flags several commands share, each defined once (its name, type and usual help), and the values the
commands derive from them: the device (`--device` left out: cuda when available), the baselines (`none`: no
baseline) and the progress bar (`--no-progress`).

A command passes what differs for it (a default, a help line that says where the default comes from); the
rest is the same in every command that takes the flag.
"""

from __future__ import annotations

import argparse

GEMMA = "gemma-3-270m"
AUTO_DEVICE = "default: cuda when available, else cpu"
EVAL_BASELINES = ("pca", "ica", "neurons", "random")


def add_model(p: argparse.ArgumentParser, default: str | None = GEMMA, help: str | None = None) -> None:
    p.add_argument("--model", default=default, help=help)


def add_site(p: argparse.ArgumentParser, default: str | None = None, help: str | None = None,
             nargs: str | None = None) -> None:
    p.add_argument("--site", default=default, help=help, nargs=nargs)


def add_corpus(p: argparse.ArgumentParser, default: str | None = None, help: str | None = None) -> None:
    p.add_argument("--corpus", default=default, help=help)


def add_tokens(p: argparse.ArgumentParser, default: int | None = None, help: str | None = None) -> None:
    p.add_argument("--tokens", type=int, default=default, help=help)


def add_context_size(p: argparse.ArgumentParser, default: int | None = None, help: str | None = None) -> None:
    p.add_argument("--context-size", type=int, default=default, help=help)


def add_batch_size(p: argparse.ArgumentParser, default: int | None = None, help: str | None = None) -> None:
    p.add_argument("--batch-size", type=int, default=default, help=help)


def add_seed(p: argparse.ArgumentParser, default: int | None = 0, help: str | None = None) -> None:
    p.add_argument("--seed", type=int, default=default, help=help)


def add_baselines(p: argparse.ArgumentParser, default=EVAL_BASELINES, choices=(*EVAL_BASELINES, "none"),
                  help: str | None = None) -> None:
    """--baselines NAME…; 'none' for no baseline (see `baselines`)."""
    p.add_argument("--baselines", nargs="+", default=list(default), choices=choices, help=help)


def add_fit_tokens(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fit-tokens", type=int, default=32_768, help="activations the baselines are fitted on")


def add_device(p: argparse.ArgumentParser, default: str | None = None, help: str | None = None) -> None:
    """--device; left out (default None), the command picks cuda when available (see `device`)."""
    p.add_argument("--device", default=default, help=help or (AUTO_DEVICE if default is None else None))


def add_out(p: argparse.ArgumentParser, default: str | None, what: str = "output directory",
            default_text: str | None = None) -> None:
    """--out DIR, with its help saying what the directory holds and its default."""
    p.add_argument("--out", default=default, help=f"{what} (default: {default_text or default})")


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def device(args: argparse.Namespace) -> str:
    """--device, or cuda when available, else cpu."""
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def baselines(args: argparse.Namespace) -> tuple[str, ...]:
    """--baselines as a tuple; `none` is the empty one."""
    return () if args.baselines == ["none"] else tuple(args.baselines)


def progress(args: argparse.Namespace) -> bool:
    return not args.no_progress
