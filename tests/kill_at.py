"""Run Python code and SIGKILL it just before its n-th commit step: a kill at a chosen, repeatable moment.

    python tests/kill_at.py N -m fastsae train ...     (a module, as python -m)
    python tests/kill_at.py N -c "code"

Commit steps are the renames that publish a write (os.replace, os.rename, and fastsae.io's atomic
directory exchange); everything written before the n-th one is on disk, the n-th never happens.
A process that makes fewer than N commits runs to the end. It prints the count on stderr at exit.
"""

import atexit
import os
import runpy
import signal
import sys

target = int(sys.argv[1])
count = 0


def _counted(real):
    def call(*args, **kwargs):
        global count
        count += 1
        if count == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    return call


os.replace, os.rename = _counted(os.replace), _counted(os.rename)
import fastsae.io  # noqa: E402

if hasattr(fastsae.io, "_exchange"):  # (absent from versions before the directory swap)
    fastsae.io._exchange = _counted(fastsae.io._exchange)
atexit.register(lambda: print(f"kill_at: {count} commits", file=sys.stderr))

mode, rest = sys.argv[2], sys.argv[3:]
if mode == "-m":
    sys.argv = [rest[0], *rest[1:]]
    runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c"]
    exec(compile(rest[0], "<kill_at>", "exec"), {"__name__": "__main__"})
