"""The loader benchmark's memory sampler counts every descendant, whichever thread forked it."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time

from reqdedup.bench.loader import PeakRss, _rss_bytes
from reqdedup.bench.proctree import descendants


def _hold(mb: int, seconds: float) -> None:
    block = bytearray(os.urandom(1)) * (mb << 20)  # touched pages: counted in PSS
    time.sleep(seconds)
    del block


def test_a_child_forked_by_another_thread_is_counted():
    base = _rss_bytes(os.getpid())
    procs = []

    def fork_from_this_thread():  # and stay alive while the child runs, as the packing thread does
        p = mp.get_context("fork").Process(target=_hold, args=(200, 1.5))
        p.start()
        procs.append(p)
        p.join()

    with PeakRss() as rss:
        t = threading.Thread(target=fork_from_this_thread)
        t.start()
        time.sleep(0.8)
        assert procs and procs[0].pid in descendants(os.getpid())
        t.join()
    assert rss.peak - base > 150 << 20, (rss.peak, base)
