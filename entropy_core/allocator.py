"""glibc's malloc kept from returning large blocks to the kernel, for runs on CPU.

Why: glibc serves a block above its mmap threshold (128 KiB at first, raised up to 32 MiB by the
blocks it has freed) with a fresh mmap and unmaps it on free; a block below it comes from the heap,
whose top is trimmed back to the kernel once it holds more than twice that much. A teacher-forcing
pass allocates and frees megabyte-sized activations and float64 log-softmax temporaries thousands of
times, so whether each one is page-faulted and zeroed afresh depends on what the process freed
before: the float64 head of `scoring.token_logprobs_entropy` ran at 18 ns per element one time and
4.4 the next on the 2-core CPU (V = 8192 or 151 936), and the one-sequence-at-a-time θ pass of
benchmarks/bench_stages.py at anywhere from 4.3 to 7.1 s. With both thresholds fixed high, freed blocks
stay in the heap for the next pass: the float64 head runs at 3.6-4.6 ns per element every time.

The price: memory the process freed stays counted in its resident size, up to its peak. That is why
only entry points call this, and only for runs on CPU (a GPU run's host memory peaks while loading
the checkpoint, and should go back afterwards).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3    # mallopt parameter numbers (glibc malloc.h)
BLOCK_LIMIT = 256 << 20                          # bytes: larger blocks are still mmapped and unmapped on free

log = logging.getLogger(__name__)


def keep_freed_memory(limit: int = BLOCK_LIMIT) -> bool:
    """Serve blocks up to `limit` bytes from the heap and never trim it (glibc only; elsewhere a no-op).

    Returns: True when glibc accepted both settings.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version                  # only glibc has it, and only glibc has these parameters
    except (OSError, TypeError, AttributeError):
        log.debug("not glibc (%s): malloc left as it is", name)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, limit) == 1 and mallopt(_M_TRIM_THRESHOLD, 2 * limit) == 1
    if not ok:
        log.warning("glibc refused mallopt(M_MMAP_THRESHOLD=%d): CPU passes may spend time in page faults", limit)
    return ok


__all__ = ["keep_freed_memory", "BLOCK_LIMIT"]
