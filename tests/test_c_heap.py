"""segworkers.c_heap: a process that runs a model keeps the memory its batches free, instead of
faulting it in again from the kernel for every batch."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A batch's pattern, in a fresh process: several blocks of a few MiB allocated, written, freed,
# again and again; the page faults of each round after the first are counted.
ROUNDS = """
import json, resource, sys
import numpy as np
from segworkers.c_heap import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [np.ones(size << 20, np.uint8) for size in (4, 3, 5, 1, 7, 4, 4, 4)]
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults[1:]}))
"""
PAGES_PER_ROUND = (32 << 20) // os.sysconf("SC_PAGE_SIZE")


def rounds(mode: str, **environment: str) -> dict:
    done = subprocess.run([sys.executable, "-c", ROUNDS, mode], cwd=REPO, capture_output=True, text=True, check=True,
                          env={**os.environ, **environment})
    return json.loads(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc thresholds are glibc's")
def test_freed_blocks_are_reused_without_page_faults():
    default = rounds("default")
    if min(default["faults"]) < PAGES_PER_ROUND // 8:
        pytest.skip(f"this glibc keeps the blocks by default ({default['faults']} faults a round)")
    kept = rounds("keep")
    assert kept["kept"]
    # Each round writes 8,192 pages (4 KiB): by default a fifth or more of them fault again.
    assert max(kept["faults"]) < PAGES_PER_ROUND // 50, (kept, default)


def test_a_users_own_malloc_settings_are_left_alone():
    assert rounds("keep", MALLOC_TRIM_THRESHOLD_="131072")["kept"] is False
    assert rounds("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")["kept"] is False
