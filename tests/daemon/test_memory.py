"""daemon.memory: freed heap pages go back to the OS after a step (glibc)."""
import platform

import pytest

from daemon.memory import release_freed_memory


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_pages_freed_in_the_middle_of_the_heap_are_returned():
    # 64 KiB blocks sit on the heap (below the mmap threshold). Every second one is kept, so the freed ones
    # lie between blocks in use: they cannot merge into the heap's top, where glibc trims by itself, whatever
    # holes earlier work left in the heap
    blocks = [bytearray(64 * 1024) for _ in range(6000)]
    keep = blocks[1::2]
    big = blocks[0::2]
    del blocks
    held = rss_mb()
    big.clear()
    freed = rss_mb()
    assert freed > held - 50                       # freed, but still resident
    assert release_freed_memory() is True
    assert rss_mb() < freed - 100                  # ~190 MB were freed: most of it is handed back
    del keep
