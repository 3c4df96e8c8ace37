"""Keep freed memory in the process instead of handing it back to the OS at once.

glibc serves every allocation above its mmap threshold (at most 32 MiB, adjusted as the
process runs) with a fresh mmap and returns it with munmap when freed. Analyses on a CPU
allocate and free activations of that size many times a second (a reference batch through a
ViT, every greedy step), and each fresh mapping is zeroed by the kernel page by page, which
can take most of a run's time; reusing large blocks from the heap gives identical results in
less time (bench/README.md, "Memory allocator"). The price is memory: freed blocks stay in
the process, so the peak resident size grows (measured there too).
``MEMKERN_KEEP_FREED_MEMORY=0`` keeps glibc's defaults where memory is tighter than time.

Only the CLI calls this: a notebook that imports memkern keeps its own allocator settings.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ONE_GIB = 1 << 30


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB; True when glibc took both.

    A no-op returning False where the C library is not glibc (macOS, musl) or where
    ``MEMKERN_KEEP_FREED_MEMORY=0`` asks for glibc's defaults."""
    if os.environ.get("MEMKERN_KEEP_FREED_MEMORY", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, _ONE_GIB) and mallopt(_M_TRIM_THRESHOLD, _ONE_GIB))
