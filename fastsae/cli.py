"""`fastsae` on the command line: the registry of commands (one module each in fastsae/commands/) and the
one handler every command runs under.

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
import importlib
import re
import sys
import tempfile
import traceback

from . import commands

# The registry: one module per command in fastsae/commands/, in the order `fastsae --help` lists them. Each
# module's register(subparsers) adds its parser, its flags and func (the handler, which calls one library
# function); flag_names, where set, maps a flag to the settings it feeds, so that an error naming the setting is
# reported against the flag.
COMMANDS = ("run", "demo", "harvest", "train", "eval", "features", "browse", "autointerp", "compare", "connect",
            "patch", "circuit", "steer", "plan", "corpus")


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


def _register(sub) -> None:
    """Every command in COMMANDS, in that order (`fastsae --help` lists them so), with --debug after the command
    too (SUPPRESS keeps the top level's value when it is not given there)."""
    for name in COMMANDS:
        importlib.import_module(f"{commands.__name__}.{name}").register(sub)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="print the full traceback of an error")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="fastsae", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    _register(parser.add_subparsers(dest="command", required=True))
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0), or a usage error already printed on one line (2)
        return stop.code if isinstance(stop.code, int) else 2
    return _handle(args, argv)


if __name__ == "__main__":
    sys.exit(main())
