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


def test_loader_variant_repeats_report_their_medians():
    from reqdedup.bench.loader import median_of_repeats

    samples = [{"variant": "new", "requests_per_s": r, "rows_per_s": 10 * r, "peak_rss_gb": m, "epochs": [i]}
               for i, (r, m) in enumerate([(100.0, 0.9), (300.0, 0.7), (200.0, 0.8)])]
    out = median_of_repeats(samples)
    assert (out["requests_per_s"], out["rows_per_s"], out["peak_rss_gb"]) == (200.0, 2000.0, 0.8)
    assert out["variant"] == "new" and [r["peak_rss_gb"] for r in out["repeats"]] == [0.9, 0.7, 0.8]
