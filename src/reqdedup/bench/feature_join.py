"""Reader throughput with and without feature columns (the per-partition side-table merge).

``python -m reqdedup.bench.feature_join --requests 20000 --json out.json`` writes synthetic
request-sorted impressions (one partition, four files) and two side tables keyed like
``features_item_ctr_7d`` (user, request, item) and ``features_user_requests_7d`` (user),
then times ``RequestReader.batches`` in one process (workers 0), plain and with the three
feature columns, each ``--repeats`` times (the first pass also warms the page cache).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ITEM_KEYS = ("user_id", "request_id", "item_id")
COLUMNS = ("user_requests_7d", "item_ctr_7d", "item_impressions_7d")


def _write(folder: Path, table: pa.Table, parts: int, row_group_size: int = 65536) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    edges = np.linspace(0, table.num_rows, parts + 1).astype(int)
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        pq.write_table(table.slice(int(a), int(b - a)), folder / f"part-{i:03d}.parquet", row_group_size=row_group_size)
    return [str(p) for p in sorted(folder.glob("*.parquet"))]


def run(requests: int = 20000, candidates: int = 20, users: int = 4000, repeats: int = 2, seed: int = 1,
        workdir: str | None = None) -> dict:
    from reqdedup.data.generator import GeneratorConfig, generate_table
    from reqdedup.train.reader import FeatureSource, ReaderSpec, RequestReader, plan_files

    root = Path(workdir or tempfile.mkdtemp(prefix="reqdedup-feature-join-"))
    rows = generate_table(GeneratorConfig(date="2026-03-01", users=users, requests=requests, candidates=candidates,
                                          history=32, items=5000, seed=seed))
    rows = rows.sort_by([("user_id", "ascending"), ("request_id", "ascending")])
    r, i = rows.column("request_id").to_numpy(), rows.column("item_id").to_numpy()
    item_side = pa.table({"user_id": rows.column("user_id"), "request_id": rows.column("request_id"),
                          "item_id": rows.column("item_id"), "item_ctr_7d": pa.array((i % 97) / 97.0),
                          "item_impressions_7d": pa.array(((r * 31 + i) % 1000).astype(np.int64))})
    side_users = np.unique(rows.column("user_id").to_numpy())
    user_side = pa.table({"user_id": side_users, "user_requests_7d": side_users * 3 + 1})
    plain = plan_files(_write(root / "imp", rows, 4))
    sources = (FeatureSource("features_item_ctr_7d", ITEM_KEYS, ("item_ctr_7d", "item_impressions_7d"),
                             tuple(_write(root / "item", item_side, 2))),
               FeatureSource("features_user_requests_7d", ("user_id",), ("user_requests_7d",),
                             tuple(_write(root / "user", user_side, 1))))
    joined = [replace(u, features=sources) for u in plain]
    out: dict = {"rows": rows.num_rows, "feature_columns": list(COLUMNS), "plain_rows_per_s": [],
                 "features_rows_per_s": []}
    for _ in range(repeats):
        for name, units, cols in (("plain", plain, ()), ("features", joined, COLUMNS)):
            spec = ReaderSpec(seq_len=32, batch_rows=min(4096, rows.num_rows // 2), workers=0, order="table",
                              feature_columns=cols)
            t = time.perf_counter()
            n = sum(b.num_rows for b in RequestReader(units, spec).batches(0))
            out[f"{name}_rows_per_s"].append(round(n / (time.perf_counter() - t)))
            out[f"{name}_rows_read"] = n
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--users", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    result = run(a.requests, a.candidates, a.users, a.repeats)
    text = json.dumps(result, indent=2)
    if a.json:
        Path(a.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
