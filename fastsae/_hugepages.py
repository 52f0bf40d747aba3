"""Transparent huge pages for PyTorch's CPU tensors of 2 MB or more, unless the user chose otherwise.

A training step allocates fresh gradients and activations of tens of MB. With 4 kB pages every first
touch of them is a page fault: a fresh 50 MB gradient took 16.9 ms to allocate and fill with 4 kB pages
against 4.6 ms with 2 MB pages (1.7 ms to refill a kept one; 2 CPU cores, bench/cpu_parts.py). PyTorch reads
THP_MEM_ALLOC_ENABLE once, at its first large allocation, so `fastsae/__init__.py` imports this before
anything imports torch. It is left alone when the user has set it (THP_MEM_ALLOC_ENABLE=0 turns it off) and
where the kernel has THP off or absent.
"""

import os

_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"  # e.g. "always [madvise] never"


def enable() -> None:
    if "THP_MEM_ALLOC_ENABLE" in os.environ:
        return
    try:
        with open(_SETTING) as f:
            mode = f.read()
    except OSError:  # not Linux, or a kernel without THP
        return
    if "[never]" not in mode:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"


enable()
