"""daemon.memory: freed heap pages go back to the OS after a step (glibc)."""
import platform

import pytest

from daemon.memory import release_freed_memory


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_pages_freed_in_the_middle_of_the_heap_are_returned():
    # 64 KiB blocks sit on the heap (below the mmap threshold); a small block after each keeps the heap's top
    # in use, so glibc's own trimming at the top cannot give their pages back when they are freed
    big, keep = [], []
    for _ in range(3000):
        big.append(bytearray(64 * 1024))
        keep.append(bytearray(1024))              # above pymalloc's 512 bytes: from malloc too
    held = rss_mb()
    big.clear()
    freed = rss_mb()
    assert freed > held - 50                       # freed, but still resident
    assert release_freed_memory() is True
    assert rss_mb() < freed - 100                  # ~190 MB were freed: most of it is handed back
    del keep
