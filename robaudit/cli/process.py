"""Process-wide settings the command line makes for itself (never the library: they would reach
into an API user's process).

* numpy's BLAS on one thread: set in ``robaudit/cli/__init__.py`` before numpy is imported.
* :func:`retain_freed_memory`: the C allocator keeps freed memory for the next arrays.
* :func:`serve_large_blocks_from_heap`: blocks above 32 MiB too (the console script's process only).
"""

from __future__ import annotations

import ctypes
from functools import cache

#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4


@cache
def retain_freed_memory() -> None:
    """Let the C allocator keep freed memory for the next allocations of this process (glibc's
    ``mallopt``; nothing elsewhere, once per process).

    The tight pass allocates and frees arrays of a few to tens of MiB per layer and chunk. By
    default glibc gives every freed block above 128 KiB back to the kernel, and the next array of
    the same size is made of fresh pages, each one zeroed by the kernel on first touch: on the deep
    networks of ``benchmarks/bench_trained.py`` that was 0.5–1 s of system time per process
    (docs/method.md §4.4). Blocks up to 32 MiB (glibc's largest threshold) now come from the heap,
    and up to 512 MiB of freed heap is kept for reuse (one chunk's share of the default
    ``ROBAUDIT_TIGHT_MEMORY_MB``; the peak of the deep networks did not grow). No number changes.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # not glibc (macOS, Windows): the allocator's defaults stay
        return
    mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
    mallopt(_M_TRIM_THRESHOLD, 512 * 2**20)
    mallopt(_M_TOP_PAD, 64 * 2**20)


@cache
def serve_large_blocks_from_heap() -> None:
    """Let glibc serve blocks above 32 MiB from the heap too (``M_MMAP_MAX`` 0; where the heap cannot grow
    glibc still maps), in the console script's own process only (``robaudit.cli.run``; not when
    ``robaudit.cli.main`` runs inside another program, whose allocations it would reach).

    glibc's mapping threshold cannot be raised past 32 MiB, and above it every array is mapped afresh and its
    pages zeroed by the kernel on first touch: EfficientNet-B0's 76 rows of a 32×32×96 plane are 60 MiB, and a
    `bound` process took 16,000 more page faults and about 0.8 s more system time, with a higher peak
    (docs/method.md §4.4). Freed blocks then stay in the heap for the next ones. No number changes.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # not glibc: the allocator's defaults stay
        return
    mallopt(_M_MMAP_MAX, 0)
