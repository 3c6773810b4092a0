"""The C heap of a process that runs a model: freed memory kept for the next tile.

Every batch of tiles allocates and frees the same few megabytes (the batch, each layer's
activations, the probabilities). glibc's malloc serves blocks above its mmap threshold with
mmap and returns freed memory at the heap's top to the kernel once more than its trim
threshold is free, so each batch faults its memory in again, page by page: on the 2-core
machine a third of a CPU model's time went to the kernel (page faults and zeroing pages).
Its dynamic threshold only rises after such blocks have been freed, so how fast the same model
ran depended on what the process had done before.

Fixing both thresholds keeps blocks up to 32 MiB in the heap and the freed heap memory for
reuse. Either alone is slower than glibc's default (fixing one turns off the dynamic
adjustment of the other): measured on 96 images of 512², the segment stage took 161 ms an
image by default, 337 with the trim threshold alone, 200 with the mmap threshold alone, and
110 with both; the model alone ran 75 tiles/s by default, 100-145 with both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

# mallopt's parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest dynamic mmap threshold on 64-bit machines (4 Mi * sizeof(long)): blocks
# above it (a whole 4096² image's probabilities) are still mapped and unmapped whole.
MMAP_THRESHOLD = 32 << 20
# Free memory at the heap's top kept for reuse: at most one block's working set in practice.
TRIM_THRESHOLD = 1 << 30
# A user's own malloc settings are theirs: environment variables glibc reads at start-up.
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")

_kept = False


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds in this process (once; every thread's arena).
    False where nothing was changed: not glibc, or the user set malloc up themselves
    (MALLOC_*_THRESHOLD_, GLIBC_TUNABLES, or another allocator through LD_PRELOAD)."""
    global _kept
    if _kept:
        return True
    if platform.libc_ver()[0] != "glibc" or any(os.environ.get(name) for name in USER_SETTINGS) \
            or "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _kept = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError) as exc:  # no libc to load, or one without mallopt
        logger.debug("malloc thresholds left as they are: %s", exc)
        return False
    return _kept
