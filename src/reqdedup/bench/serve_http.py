"""`reqdedup bench serve-http`: a bounded load run over HTTP, on loopback, against MLflow's
own scoring server (`mlflow models serve`) of a registered model.

The in-process serving benchmark (`reqdedup.bench.serve`, torch only) times the scorer; this
one times what a client sees: JSON parsing, MLflow's schema enforcement, the pyfunc, the
response. It

1. starts ``mlflow models serve -m <model-uri> --env-manager local --host 127.0.0.1``
   (`reqdedup.serve.pyfunc.serve_command`), waits for ``/ping`` (or uses ``--url`` of a server
   that runs already), and sends ``--warmup`` calls;
2. runs an open-loop load for ``--seconds`` at ``--rate`` calls per second: call i is due at
   ``start + i / rate`` whatever the earlier calls did, at most ``--concurrency`` in flight
   (a call that finds every slot busy starts late; the JSON counts them), each call one
   ``dataframe_records`` payload of ``--requests-per-call`` synthetic requests with
   ``--candidates`` candidates and ``--history`` history ids (valid ids below ``--items``);
   ``--oversize-every N`` makes every N-th call exceed the serving limit on candidates per
   request, to measure refusals under load;
3. writes JSON: latency p50/p99/mean/max (ms) of the successful calls, calls by HTTP status
   and the connection errors, the achieved rate, and the server's RSS (the whole process
   tree: `mlflow` and its uvicorn workers) after the warm-up and at the end.

Bounded: ``--seconds`` is at most 3,600 and every call has a ``--timeout``; the server is
stopped (its process group) when the run ends, also on errors.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

from reqdedup.bench.proctree import descendants
from reqdedup.contract import ITEM_DENSE_DIM, NUM_CATEGORIES, NUM_COUNTRIES, NUM_SEGMENTS, USER_DENSE_DIM

MAX_SECONDS = 3600


def percentile(values: list[float], q: float) -> float | None:
    """q-th percentile (0..100), linear interpolation between closest ranks; None when empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def synthetic_records(count: int, candidates: int, history: int, items: int, seed: int) -> list[dict]:
    """`count` valid request-level records (the pyfunc's input columns), ids below `items`."""
    rng = random.Random(seed)
    out = []
    for r in range(count):
        out.append({
            "request_id": f"http-bench-{seed}-{r}",
            "user_history": [rng.randrange(items) for _ in range(history)],
            "user_dense": [round(rng.gauss(0, 1), 4) for _ in range(USER_DENSE_DIM)],
            "user_segment": rng.randrange(NUM_SEGMENTS),
            "user_country": rng.randrange(NUM_COUNTRIES),
            "candidate_item_id": [rng.randrange(items) for _ in range(candidates)],
            "candidate_item_category": [rng.randrange(NUM_CATEGORIES) for _ in range(candidates)],
            "candidate_item_dense": [[round(rng.gauss(0, 1), 4) for _ in range(ITEM_DENSE_DIM)]
                                     for _ in range(candidates)],
        })
    return out


# ---- RSS of a process tree (Linux /proc) --------------------------------------------------
def tree_rss_bytes(pid: int) -> int:
    """Resident set size of `pid` and all its descendants, in bytes (0 when gone)."""
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


# ---- the load ----------------------------------------------------------------------------
class _Client(threading.local):
    """One keep-alive HTTP connection per worker thread."""

    def __init__(self):
        self.conn = None


def _post(local: _Client, host: str, port: int, body: bytes, timeout: float) -> int:
    for attempt in (0, 1):  # one reconnect when the server closed the kept-alive connection
        if local.conn is None:
            local.conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            local.conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
            resp = local.conn.getresponse()
            resp.read()
            return resp.status
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            local.conn.close()
            local.conn = None
            if attempt:
                raise
    raise AssertionError("unreachable")


def run_load(url: str, payloads: list[bytes], *, seconds: float, rate: float, concurrency: int,
             timeout: float, oversize: bytes | None = None, oversize_every: int = 0) -> dict:
    """Open-loop load: call i due at start + i / rate for `seconds`; returns the figures."""
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"--seconds must be in (0, {MAX_SECONDS}], got {seconds}")
    if rate <= 0 or concurrency < 1:
        raise ValueError("--rate must be > 0 and --concurrency >= 1")
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    local = _Client()
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: Counter = Counter()
    errors: Counter = Counter()
    late = 0
    slots = threading.Semaphore(concurrency)

    def one(body: bytes) -> None:
        t0 = time.perf_counter()
        try:
            status = _post(local, host, port, body, timeout)
        except (OSError, http.client.HTTPException) as e:
            with lock:
                errors[type(e).__name__] += 1
            return
        finally:
            slots.release()
        dt = (time.perf_counter() - t0) * 1000.0
        with lock:
            statuses[str(status)] += 1
            if status == 200:
                latencies.append(dt)

    n_calls = int(seconds * rate)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for i in range(n_calls):
            due = start + i / rate
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            if not slots.acquire(blocking=False):
                late += 1
                slots.acquire()
            body = oversize if oversize is not None and oversize_every and (i + 1) % oversize_every == 0 \
                else payloads[i % len(payloads)]
            pool.submit(one, body)
    elapsed = time.perf_counter() - start
    ok = statuses.get("200", 0)
    return {
        "calls": n_calls, "ok": ok, "elapsed_s": round(elapsed, 3),
        "target_rate": rate, "achieved_rate": round(n_calls / elapsed, 3) if elapsed else None,
        "ok_rate": round(ok / elapsed, 3) if elapsed else None,
        "late_starts": late,
        "latency_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                       "mean": sum(latencies) / len(latencies) if latencies else None,
                       "max": max(latencies) if latencies else None, "n": len(latencies)},
        "by_status": dict(sorted(statuses.items())),
        "errors_by_status": {k: v for k, v in sorted(statuses.items()) if k != "200"},
        "connection_errors": dict(errors),
    }


# ---- the server --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout_s: float, log: Path | None) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"mlflow models serve exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {url} is not healthy after {timeout_s}s")
        time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the group: uvicorn workers included
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reqdedup bench serve-http", description=__doc__.splitlines()[0])
    p.add_argument("--model-uri", default=None, help="default: models:/<registered_model>@<alias>")
    p.add_argument("--alias", default="champion")
    p.add_argument("--url", default=None, help="a server that runs already (http://127.0.0.1:PORT): none is started")
    p.add_argument("--port", type=int, default=None, help="port of the started server (default: a free one)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--rate", type=float, default=20.0, help="calls per second (open loop)")
    p.add_argument("--concurrency", type=int, default=8, help="calls in flight at most")
    p.add_argument("--requests-per-call", type=int, default=1)
    p.add_argument("--candidates", type=int, default=50)
    p.add_argument("--history", type=int, default=64)
    p.add_argument("--items", type=int, default=100, help="ids are drawn below this (<= the model's catalog)")
    p.add_argument("--payloads", type=int, default=16, help="distinct payloads, cycled")
    p.add_argument("--oversize-every", type=int, default=0,
                   help="every N-th call exceeds serve_max_candidates_per_request (0 = never)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--device", default="cpu", help="REQDEDUP_SERVE_DEVICE of the started server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True, help="where to write the result JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from reqdedup.config import get_settings
    from reqdedup.errors import InputError

    settings = get_settings()
    if not 0 < a.seconds <= MAX_SECONDS:
        raise InputError(f"--seconds must be in (0, {MAX_SECONDS}], got {a.seconds}")
    if a.rate <= 0 or a.concurrency < 1 or a.requests_per_call < 1 or a.payloads < 1:
        raise InputError("--rate must be > 0; --concurrency, --requests-per-call and --payloads >= 1")
    if a.url and urlparse(a.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise InputError(f"--url {a.url}: the benchmark runs on loopback only")
    payloads = [json.dumps({"dataframe_records": synthetic_records(a.requests_per_call, a.candidates, a.history,
                                                                   a.items, a.seed + i)}).encode()
                for i in range(a.payloads)]
    oversize = None
    if a.oversize_every:
        oversize = json.dumps({"dataframe_records": synthetic_records(
            1, settings.serve_max_candidates_per_request + 1, a.history, a.items, a.seed - 1)}).encode()
    proc, log, cmd = None, None, None
    uri = a.model_uri or f"models:/{settings.registered_model}@{a.alias}"
    if a.url:
        url = a.url.rstrip("/")
    else:
        from reqdedup.serve.pyfunc import DEVICE_ENV, serve_command

        port = a.port or _free_port()
        argv_, env = serve_command(uri, host="127.0.0.1", port=port, workers=a.workers, settings=settings)
        env[DEVICE_ENV] = a.device
        cmd = argv_
        log = Path(a.json).with_suffix(".server.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as fh:
            proc = subprocess.Popen(argv_, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, a.startup_timeout, log)
        warm = run_load(url, payloads, seconds=max(a.warmup, 1) / 1.0, rate=1.0, concurrency=1, timeout=a.timeout) \
            if a.warmup else None
        rss_start = tree_rss_bytes(proc.pid) if proc else None
        result = run_load(url, payloads, seconds=a.seconds, rate=a.rate, concurrency=a.concurrency,
                          timeout=a.timeout, oversize=oversize, oversize_every=a.oversize_every)
        rss_end = tree_rss_bytes(proc.pid) if proc else None
    finally:
        if proc is not None:
            stop(proc)
    out = {
        "benchmark": "serve-http",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_uri": uri if proc is not None else None,
        "url": url, "server_command": cmd,
        "config": {k: v for k, v in vars(a).items() if k != "json"},
        "limits": {"serve_max_requests_per_call": settings.serve_max_requests_per_call,
                   "serve_max_candidates_per_request": settings.serve_max_candidates_per_request,
                   "serve_max_history": settings.serve_max_history},
        "warmup": {"calls": warm["calls"], "by_status": warm["by_status"]} if warm else None,
        **result,
        "rss_bytes": {"start": rss_start, "end": rss_end,
                      "growth": (rss_end - rss_start) if rss_start is not None and rss_end is not None else None},
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("calls", "ok", "achieved_rate", "latency_ms", "errors_by_status",
                                          "connection_errors", "rss_bytes")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
