"""keep_freed_memory: freed activations are reused from the heap, not unmapped and faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

PROBE = r"""
import ctypes, resource, sys, torch
from toolkit.core.environment import keep_freed_memory

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
mapped = libc.mallinfo2().hblks
x = torch.randn(64, 12, 28, 28)  # one fine4 activation, 2.4 MB: mapped on its own by glibc's default
mapped = libc.mallinfo2().hblks - mapped
heap = libc.mallinfo2().arena
for _ in range(5):
    (x * 2).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):  # 400 allocations of 590 pages each
    y = x * 2
    z = y + 1
    del y, z
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(kept, mapped, heap, libc.mallinfo2().arena, faults)
"""


def _probe(mode: str) -> list[str]:
    return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout.split()


def test_training_sized_blocks_come_from_the_heap_and_stay_there():
    kept, mapped, heap, heap_after, faults = _probe("keep")
    assert kept == "True"
    assert mapped == "0"  # the 2.4 MB block is in the heap, not a mapping of its own
    assert int(heap_after) >= int(heap)  # freed blocks are not handed back to the kernel
    assert int(faults) < 400 * 590 / 20, faults  # each page is faulted in about once, not once per allocation
    _, mapped_default, _, _, _ = _probe("default")
    assert mapped_default == "1"  # glibc's default: the block is a fresh mapping, faulted in page by page
