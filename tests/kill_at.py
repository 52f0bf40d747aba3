"""Run Python code and SIGKILL it just before its n-th commit step: a kill at a chosen, repeatable moment.

    python tests/kill_at.py N -m fastsae train ...     (a module, as python -m)
    python tests/kill_at.py N -c "code"
    torchrun --nproc-per-node 2 tests/kill_at.py N -m fastsae train ...   (every rank counts its own)

Commit steps are the renames that publish a write (os.replace, os.rename, and fastsae.io's atomic
directory exchange); everything written before the n-th one is on disk, the n-th never happens.
A process that makes fewer than N commits runs to the end. It prints the count on stderr at exit.

Two settings in the environment, for the ranks of a torchrun job:
    KILL_AT_RANK=R       only the process whose RANK is R dies (the others count and run on), so that one
                         rank fails and its peers see it
    KILL_AT_CALL=M:Q     count the calls of the function Q of module M instead of the commits, e.g.
                         fastsae.train.sharded:ShardedSAE.forward (N=5: killed as the 5th step's forward
                         begins, mid-step, with its peers inside that step's collectives)
"""

import atexit
import importlib
import os
import runpy
import signal
import sys

target = int(sys.argv[1])
count = 0
# a rank other than KILL_AT_RANK counts but never dies (RANK is unset outside torchrun: rank 0's part)
armed = os.environ.get("KILL_AT_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0")


def _counted(real):
    def call(*args, **kwargs):
        global count
        count += 1
        if count == target and armed:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    return call


def _count_calls(spec: str) -> None:
    """Wrap the function spec names ("package.module:Class.method"), wherever it is looked up from."""
    module, _, qualname = spec.partition(":")
    owner = importlib.import_module(module)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, name, _counted(getattr(owner, name)))


if os.environ.get("KILL_AT_CALL"):
    _count_calls(os.environ["KILL_AT_CALL"])
    what = os.environ["KILL_AT_CALL"] + " calls"
else:
    os.replace, os.rename = _counted(os.replace), _counted(os.rename)
    import fastsae.io

    if hasattr(fastsae.io, "_exchange"):  # (absent from versions before the directory swap)
        fastsae.io._exchange = _counted(fastsae.io._exchange)
    what = "commits"
atexit.register(lambda: print(f"kill_at: {count} {what}", file=sys.stderr))

mode, rest = sys.argv[2], sys.argv[3:]
if mode == "-m":
    sys.argv = [rest[0], *rest[1:]]
    runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c"]
    exec(compile(rest[0], "<kill_at>", "exec"), {"__name__": "__main__"})
