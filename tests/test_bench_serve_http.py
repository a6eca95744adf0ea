"""`reqdedup bench serve-http`: the open-loop load, its figures and the RSS of a process tree,
against a stand-in HTTP server on loopback (fast). The run against `mlflow models serve` of
a registered model is in tests/test_serve_server.py (slow)."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reqdedup.bench.serve_http import percentile, run_load, synthetic_records, tree_rss_bytes
from reqdedup.cli import main as cli_main

LIMIT = 20


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._reply(200 if self.path == "/ping" else 404, b"\n")

    def do_POST(self):
        data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        too_big = any(len(r["candidate_item_id"]) > LIMIT for r in data["dataframe_records"])
        self._reply(400 if too_big else 200, b'{"predictions": []}')


@pytest.fixture
def stand_in():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)


def test_open_loop_counts_calls_statuses_and_latency(stand_in):
    ok = [json.dumps({"dataframe_records": synthetic_records(1, 5, 4, 100, s)}).encode() for s in range(3)]
    big = json.dumps({"dataframe_records": synthetic_records(1, LIMIT + 1, 4, 100, 9)}).encode()
    out = run_load(stand_in, ok, seconds=1.0, rate=40, concurrency=4, timeout=10, oversize=big, oversize_every=4)
    assert out["calls"] == 40 and out["by_status"] == {"200": 30, "400": 10}
    assert out["errors_by_status"] == {"400": 10} and out["connection_errors"] == {}
    lat = out["latency_ms"]
    assert lat["n"] == 30 and 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert 0.9 <= out["elapsed_s"] < 5


def test_refused_connections_are_counted_not_raised():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run_load(f"http://127.0.0.1:{port}", [b"{}"], seconds=0.5, rate=10, concurrency=2, timeout=2)
    assert out["ok"] == 0 and sum(out["connection_errors"].values()) == out["calls"] == 5


def test_cli_writes_json_against_a_running_server(stand_in, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REQDEDUP_SERVE_MAX_CANDIDATES_PER_REQUEST", str(LIMIT))
    path = tmp_path / "http.json"
    with pytest.raises(SystemExit) as done:  # the bench commands exit with their own status
        cli_main(["bench", "serve-http", "--url", stand_in, "--seconds", "1", "--rate", "20", "--warmup", "1",
                  "--candidates", "5", "--oversize-every", "5", "--json", str(path)])
    assert done.value.code == 0
    out = json.loads(path.read_text())
    assert out["calls"] == 20 and out["errors_by_status"] == {"400": 4}
    assert out["limits"]["serve_max_candidates_per_request"] == LIMIT
    assert cli_main(["bench", "serve-http", "--url", "http://10.1.2.3:5000", "--json", str(path)]) == 2


def test_tree_rss_counts_children():
    import subprocess
    import sys

    alone = tree_rss_bytes(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(30)"])
    try:
        import time

        deadline = time.monotonic() + 20
        while tree_rss_bytes(os.getpid()) < alone + (48 << 20) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tree_rss_bytes(os.getpid()) >= alone + (48 << 20)
    finally:
        child.kill()
        child.wait()
