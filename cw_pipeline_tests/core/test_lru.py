"""The one bounded LRU cache (core/lru.py): feature maps of the search, thumbnails of the page."""

from __future__ import annotations

import threading

import pytest

from cw_pipeline.core.lru import ByteLRU


def test_bytes_values_are_counted_once_and_dropped_least_recent_first() -> None:
    cache: ByteLRU[str, bytes] = ByteLRU(10, len)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    cache.put("a", b"12")  # replaced: counted once (the page's old thumbnail cache added it twice)
    assert cache.nbytes == 6 and len(cache) == 2
    assert cache.get("b") == b"1234"  # b is now the most recent
    cache.put("c", b"123456")  # 12 > 10: drops a, the least recently used
    assert cache.get("a") is None and cache.nbytes == 10
    cache.put("d", b"x" * 11)  # larger than the whole cache: not kept, nothing dropped
    assert cache.get("d") is None and cache.nbytes == 10 and len(cache) == 2
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        ByteLRU(-1, len)


def test_threads_sharing_it_keep_its_count_exact() -> None:
    cache: ByteLRU[int, bytes] = ByteLRU(1000, len)

    def work(k: int) -> None:
        for i in range(2000):
            cache.put((k * 7 + i) % 50, b"x" * (i % 30))
            cache.get(i % 50)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.nbytes == sum(len(cache.get(k) or b"") for k in range(50)) <= 1000
