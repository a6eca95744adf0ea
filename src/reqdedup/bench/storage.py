"""Storage benchmark: the same generated rows in Iceberg, IID order vs request-sorted.

Four tables of the same rows, written by the real ingest path (Spark + Iceberg) with the
same partitioning:
- ``iid``: rows shuffled across the whole date, as a row-level (IID) training table holds
  them, with Iceberg's default writer properties (how such a table is written today);
- ``iid_same_properties``: the same IID order with the sorted table's writer properties,
  so ``*_same_properties`` ratios isolate the effect of the order alone;
- ``raw_log``: the generator's arrival order (chosen properties), where rows of concurrent
  requests interleave but a request's rows stay close in time;
- ``sorted``: request-sorted by (user_id, request_id) with the chosen properties.
Column sizes are the compressed sizes of the column chunks in the data files' Parquet footers.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from reqdedup.config import Settings, get_settings
from reqdedup.lake.tables import COMPRESSION_PROPERTIES, PROPERTY_CANDIDATES
from reqdedup.schema import IMPRESSIONS_SCHEMA, ITEM_COLUMNS, LABEL_COLUMN, USER_COLUMNS

BENCH_DATE = "2026-01-01"
ITEM_SIDE_COLUMNS = (*ITEM_COLUMNS, LABEL_COLUMN)


def column_bytes(table_name: str, settings: Settings) -> tuple[dict[str, int], int, int]:
    """Compressed bytes per top-level column, total file bytes and file count of a table."""
    import pyarrow.parquet as pq

    from reqdedup.lake.catalog import load_table

    table = load_table(table_name, settings)
    per_column = {f.name: 0 for f in IMPRESSIONS_SCHEMA}
    total = files = 0
    for task in table.scan().plan_files():
        path = task.file.file_path.removeprefix("file://")
        files += 1
        total += task.file.file_size_in_bytes
        meta = pq.ParquetFile(path).metadata
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            for c in range(group.num_columns):
                chunk = group.column(c)
                top = chunk.path_in_schema.split(".")[0]
                per_column[top] = per_column.get(top, 0) + chunk.total_compressed_size
    return per_column, total, files


def write_shuffled_landing(src_folder: Path, dst_folder: Path, seed: int) -> None:
    """The same landed rows, shuffled across the date (a seeded permutation)."""
    import numpy as np
    import pyarrow.parquet as pq

    from reqdedup.fsutil import replace_dir_atomically, temp_dir_for

    table = pq.read_table(src_folder)
    order = np.random.default_rng(seed).permutation(table.num_rows)
    tmp = temp_dir_for(dst_folder)
    pq.write_table(table.take(order).select([f.name for f in IMPRESSIONS_SCHEMA]), tmp / "part-00000.parquet")
    replace_dir_atomically(tmp, dst_folder)


def _ratio(a: int, b: int) -> float:
    return round(a / b, 2) if b else float("inf")


def plot_storage(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["per_column"])
    fig, ax = plt.subplots(figsize=(11, 4.8))
    series = [("iid", "IID, Iceberg default properties"), ("iid_same_properties", "IID, chosen properties"),
              ("raw_log", "raw-log order, chosen properties"), ("sorted", "request-sorted, chosen properties")]
    width = 0.2
    for i, (key, label) in enumerate(series):
        xs = [x + (i - 1.5) * width for x in range(len(names))]
        ax.bar(xs, [result["per_column"][n][key] for n in names], width=width, label=label)
    ax.set_yscale("log")
    ax.set_xticks(list(range(len(names))), names, rotation=40, ha="right")
    ax.set_ylabel("compressed bytes (log)")
    ax.set_title(
        f"Iceberg storage, {result['rows']:,} rows, {result['candidates_per_request']} candidates/request: "
        f"IID/sorted: table {result['table_ratio']}x, user columns {result['user_columns_ratio']}x "
        f"(same properties: {result['table_ratio_same_properties']}x, {result['user_columns_ratio_same_properties']}x)",
        fontsize=10,
    )
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def run_storage_bench(*, requests: int, candidates: int, history: int, users: int | None = None,
                      seed: int = 0, json_path: str | Path, sweep: bool = False,
                      settings: Settings | None = None) -> dict:
    from reqdedup.data.generator import GeneratorConfig, write_landing
    from reqdedup.lake.ingest import ingest_date
    from reqdedup.lake.spark import get_spark

    base = settings or get_settings()
    bench_home = base.home / "bench" / "storage"
    settings = dataclasses.replace(base, landing_dir=bench_home / "landing", namespace="bench")
    cfg = GeneratorConfig(users=users or max(1, requests // 4), requests=requests, candidates=candidates,
                          history=history, seed=seed, date=BENCH_DATE)
    generated = write_landing(cfg, out_dir=settings.landing_dir)
    shuffled = dataclasses.replace(settings, landing_dir=bench_home / "landing_iid")
    write_shuffled_landing(settings.landing_path(BENCH_DATE), shuffled.landing_path(BENCH_DATE), seed)

    spark = get_spark(settings, app_name="reqdedup-bench-storage")
    # name -> (landing settings, writer properties, sorted table?)
    variants = {
        "iid": (shuffled, PROPERTY_CANDIDATES["iceberg_defaults"], False),
        "iid_same_properties": (shuffled, COMPRESSION_PROPERTIES, False),
        "raw_log": (settings, COMPRESSION_PROPERTIES, False),
        "sorted": (settings, COMPRESSION_PROPERTIES, True),
    }
    if sweep:
        variants |= {f"sorted_{name}": (settings, props, True) for name, props in PROPERTY_CANDIDATES.items()}
        variants |= {f"iid_{name}": (shuffled, props, False) for name, props in PROPERTY_CANDIDATES.items()}
    measured = {}
    for name, (landing, props, sorted_table) in variants.items():
        spark.sql(f"DROP TABLE IF EXISTS {settings.spark_table('storage_' + name)} PURGE")
        t0 = time.perf_counter()
        ingest = ingest_date(BENCH_DATE, landing, table="storage_" + name, properties=props,
                             sorted_table=sorted_table, publish=True)
        per_column, total, files = column_bytes("storage_" + name, settings)
        measured[name] = {"per_column": per_column, "bytes": total, "files": files, "properties": props,
                          "ingest": ingest, "seconds": round(time.perf_counter() - t0, 2)}

    iid, srt, raw = measured["iid"], measured["sorted"], measured["raw_log"]
    same = measured["iid_same_properties"]
    user_iid = sum(iid["per_column"][c] for c in USER_COLUMNS)
    user_srt = sum(srt["per_column"][c] for c in USER_COLUMNS)
    item_iid = sum(iid["per_column"][c] for c in ITEM_SIDE_COLUMNS)
    item_srt = sum(srt["per_column"][c] for c in ITEM_SIDE_COLUMNS)
    result = {
        "rows": generated["rows"],
        "requests": requests,
        "candidates_per_request": candidates,
        "history_mean": history,
        "users": cfg.users,
        "seed": seed,
        "bytes_landed_parquet": srt["ingest"]["bytes_landed"],
        "bytes_iid": iid["bytes"],
        "bytes_sorted": srt["bytes"],
        "table_ratio": _ratio(iid["bytes"], srt["bytes"]),
        "user_columns": list(USER_COLUMNS),
        "user_columns_bytes_iid": user_iid,
        "user_columns_bytes_sorted": user_srt,
        "user_columns_ratio": _ratio(user_iid, user_srt),
        "item_columns": list(ITEM_SIDE_COLUMNS),
        "item_columns_ratio": _ratio(item_iid, item_srt),
        "per_column": {
            c: {"iid": iid["per_column"][c], "iid_same_properties": same["per_column"][c],
                "raw_log": raw["per_column"][c], "sorted": srt["per_column"][c],
                "ratio": _ratio(iid["per_column"][c], srt["per_column"][c])}
            for c in iid["per_column"]
        },
        "iid_properties": iid["properties"],
        "bytes_iid_same_properties": same["bytes"],
        "table_ratio_same_properties": _ratio(same["bytes"], srt["bytes"]),
        "user_columns_ratio_same_properties": _ratio(sum(same["per_column"][c] for c in USER_COLUMNS), user_srt),
        "bytes_raw_log": raw["bytes"],
        "raw_log_table_ratio": _ratio(raw["bytes"], srt["bytes"]),
        "raw_log_user_columns_ratio": _ratio(sum(raw["per_column"][c] for c in USER_COLUMNS), user_srt),
        "files_iid": iid["files"],
        "files_sorted": srt["files"],
        "properties": COMPRESSION_PROPERTIES,
        "ingest_sorted": {k: srt["ingest"][k] for k in ("rows", "seconds", "rows_per_s", "landed_mb_per_s")},
        "spark_master": settings.spark_master,
    }
    if sweep:
        result["sweep"] = {
            name: {"bytes": m["bytes"], "user_columns_bytes": sum(m["per_column"][c] for c in USER_COLUMNS),
                   "properties": m["properties"]}
            for name, m in measured.items() if name.startswith(("sorted_", "iid_"))
        }
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    png = base.reports_dir / "storage_bench.png"
    plot_storage(result, png)
    result["plot"] = str(png)
    return result
