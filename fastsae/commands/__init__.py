"""The commands of `fastsae`, one module per command, listed in `fastsae.cli.COMMANDS`.

Each module defines `register(subparsers)`, which adds its parser with its flags and sets `func` to its handler;
the handler parses the flags into arguments and calls one library function (a subpackage's `run_<verb>`, a
pipeline step), importing it lazily so that `fastsae --help` stays fast. Flags several commands share are
defined once, in `shared_flags.py`.
"""
