"""Integration tests: sorting-ingest into a fresh catalog with local Spark, read back both ways."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from reqdedup.data.generator import GeneratorConfig, generate_table, write_landing
from reqdedup.errors import InputError
from reqdedup.lake.catalog import load_table
from reqdedup.lake.ingest import ingest_date, publish_date
from reqdedup.lake.read import read_request_batches
from reqdedup.schema import IMPRESSIONS_SCHEMA

pytestmark = pytest.mark.slow

DAY1, DAY2 = "2026-03-01", "2026-03-02"
SMALL = dict(users=40, requests=90, candidates=8, history=16, items=500, seed=7)


@pytest.fixture(scope="module")
def ingested(settings, spark):
    first = {}
    for day in (DAY1, DAY2):
        write_landing(GeneratorConfig(date=day, **SMALL), out_dir=settings.landing_dir)
        first[day] = ingest_date(day, settings)
        publish_date(day, settings)
    return first


def _table_rows(settings, day):
    table = load_table("impressions", settings)
    return table.scan(row_filter=f"event_date = '{day}'").to_arrow()


def test_ingest_writes_every_landed_row_sorted_in_each_file(settings, ingested):
    landed = generate_table(GeneratorConfig(date=DAY1, **SMALL))
    assert ingested[DAY1]["rows"] == landed.num_rows
    got = _table_rows(settings, DAY1)
    key = ["request_id", "item_id"]
    assert sorted(zip(*[got.column(k).to_pylist() for k in key])) == sorted(
        zip(*[landed.column(k).to_pylist() for k in key])
    )
    table = load_table("impressions", settings)
    for task in table.scan().plan_files():
        keys = pq.read_table(task.file.file_path.removeprefix("file://"), columns=["user_id", "request_id"])
        pairs = list(zip(keys.column(0).to_pylist(), keys.column(1).to_pylist()))
        assert pairs == sorted(pairs), f"{task.file.file_path} is not sorted by (user_id, request_id)"


def test_table_declares_partitioning_sort_order_and_properties(settings, ingested):
    table = load_table("impressions", settings)
    spec = str(table.spec())
    assert "event_date: identity" in spec and f"bucket[{settings.buckets}]" in spec
    schema = table.schema()
    sort_cols = [schema.find_column_name(f.source_id) for f in table.sort_order().fields]
    assert sort_cols == ["user_id", "request_id"]
    assert table.properties["write.parquet.compression-codec"] == "zstd"


def test_rerun_same_date_replaces_it_without_duplicates(settings, spark, ingested):
    table = load_table("impressions", settings)
    snapshots_before = len(table.metadata.snapshots)
    day2_before = _table_rows(settings, DAY2)
    again = ingest_date(DAY1, settings)
    assert again["rows"] == ingested[DAY1]["rows"]
    publish_date(DAY1, settings)
    got = _table_rows(settings, DAY1)
    assert got.num_rows == ingested[DAY1]["rows"]
    pairs = list(zip(got.column("request_id").to_pylist(), got.column("item_id").to_pylist()))
    assert len(pairs) == len(set(pairs)), "duplicated rows after a rerun"
    # One atomic commit; the other date untouched.
    assert len(load_table("impressions", settings).metadata.snapshots) == snapshots_before + 1
    assert _table_rows(settings, DAY2).sort_by("request_id").equals(day2_before.sort_by("request_id"))
    count = spark.sql(f"SELECT count(*) FROM {settings.spark_table('impressions')} WHERE event_date = DATE'{DAY1}'")
    assert count.collect()[0][0] == ingested[DAY1]["rows"]


def test_staged_date_is_invisible_on_main_until_published(settings, spark, ingested):
    day = "2026-03-05"
    write_landing(GeneratorConfig(date=day, **SMALL), out_dir=settings.landing_dir)
    main_before = load_table("impressions", settings).current_snapshot().snapshot_id
    staged = ingest_date(day, settings)
    assert staged["branch"] == "stage_20260305" and not staged["published"]
    table = load_table("impressions", settings)
    assert table.current_snapshot().snapshot_id == main_before
    assert _table_rows(settings, day).num_rows == 0
    on_branch = table.scan(row_filter=f"event_date = '{day}'", snapshot_id=table.refs()["stage_20260305"].snapshot_id)
    assert on_branch.to_arrow().num_rows == staged["rows"]
    assert publish_date(day, settings)["published"]
    assert _table_rows(settings, day).num_rows == staged["rows"]
    assert "stage_20260305" not in load_table("impressions", settings).refs()
    assert publish_date(day, settings).get("already")  # idempotent
    with pytest.raises(InputError, match="nothing staged"):
        publish_date("2031-02-02", settings)


def test_spark_and_pyiceberg_read_the_same_rows_in_the_same_order(settings, spark, ingested):
    batches = list(read_request_batches(DAY1, DAY2, batch_rows=50, settings=settings))
    via_iceberg = pa.Table.from_batches(batches)
    df = spark.sql(
        f"SELECT event_date, {settings.catalog_name}.system.bucket({settings.buckets}, user_id) AS b, "
        f"user_id, request_id FROM {settings.spark_table('impressions')} "
        f"WHERE event_date BETWEEN DATE'{DAY1}' AND DATE'{DAY2}' ORDER BY event_date, b, user_id, request_id"
    )
    spark_rows = df.collect()
    assert len(spark_rows) == via_iceberg.num_rows == ingested[DAY1]["rows"] + ingested[DAY2]["rows"]
    # Same request order (rows inside one request have no defined order).
    def runs(ids):
        out = []
        for i in ids:
            if not out or out[-1] != i:
                out.append(i)
        return out

    assert runs(via_iceberg.column("request_id").to_pylist()) == runs([r.request_id for r in spark_rows])


def test_read_batches_keep_requests_whole_and_respect_buckets_and_projection(settings, ingested):
    from pyiceberg.transforms import BucketTransform
    from pyiceberg.types import LongType

    bucket_of = BucketTransform(settings.buckets).transform(LongType())
    batches = list(read_request_batches(DAY1, buckets=[1, 3], columns=["user_id", "label"], batch_rows=20,
                                        settings=settings))
    assert batches, "buckets 1 and 3 hold no rows at this seed"
    seen = set()
    for b in batches:
        assert b.schema.names == ["request_id", "user_id", "label"]
        ids = set(b.column("request_id").to_pylist())
        assert not ids & seen
        seen |= ids
        assert {bucket_of(u) for u in b.column("user_id").to_pylist()} <= {1, 3}
    expected = _table_rows(settings, DAY1)
    in_buckets = [bucket_of(u) in (1, 3) for u in expected.column("user_id").to_pylist()]
    assert sum(b.num_rows for b in batches) == sum(in_buckets)
    with pytest.raises(InputError, match="out of range"):
        list(read_request_batches(DAY1, buckets=[settings.buckets], settings=settings))


# ---- bad input: each leaves the table at its previous snapshot ---------------------------
def _landing_with(settings, day, table: pa.Table | None = None, raw: bytes | None = None):
    folder = settings.landing_path(day)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    path = folder / "part-00000.parquet"
    if raw is not None:
        path.write_bytes(raw)
    else:
        pq.write_table(table, path)
    return path


def _good(day):
    return generate_table(GeneratorConfig(date=day, **SMALL))


BAD_DAY = "2026-03-09"


def _nullable(table: pa.Table) -> pa.Table:
    return table.cast(pa.schema([f.with_nullable(True) for f in table.schema]))


@pytest.mark.parametrize(
    "case,make,message",
    [
        ("missing column", lambda t: t.drop_columns(["user_history"]), "missing column 'user_history'"),
        ("mistyped column", lambda t: t.set_column(t.schema.get_field_index("user_id"), "user_id",
                                                   pc.cast(t.column("user_id"), pa.string())),
         "column 'user_id' has type string, expected int64"),
        ("null keys", lambda t: _nullable(t).set_column(1, pa.field("user_id", pa.int64()),
                                                         pa.array([None] * 3 + t.column("user_id").to_pylist()[3:], pa.int64())),
         "3 null user_id"),
        ("no rows", lambda t: t.slice(0, 0), "hold no rows"),
        ("NaN dense feature", lambda t: t.set_column(
            t.schema.get_field_index("user_dense"), t.schema.field("user_dense"),
            pa.array([[float("nan")] + v[1:] if i == 0 else v for i, v in enumerate(t.column("user_dense").to_pylist())],
                     pa.list_(pa.float32()))), "column 'user_dense': check finite (no NaN or inf)"),
        ("segment outside the vocabulary", lambda t: t.set_column(
            t.schema.get_field_index("user_segment"), t.schema.field("user_segment"),
            pa.array([99] + t.column("user_segment").to_pylist()[1:], pa.int32())), "column 'user_segment': check in [0, 16)"),
        ("null outside the keys", lambda t: _nullable(t).replace_schema_metadata(t.schema.metadata).set_column(
            t.schema.get_field_index("label"), pa.field("label", pa.int32()),
            pa.array([None] + t.column("label").to_pylist()[1:], pa.int32())), "column 'label': check not null"),
        ("wrong date", lambda t: t.set_column(t.schema.get_field_index("event_date"), t.schema.field("event_date"),
                                              pc.add(t.column("event_date").cast(pa.int32()), 1).cast(pa.int32()).cast(pa.date32())),
         "do not match the landing date"),
    ],
)
def test_bad_landing_file_is_refused_and_table_unchanged(settings, ingested, case, make, message):
    before = load_table("impressions", settings).current_snapshot().snapshot_id
    path = _landing_with(settings, BAD_DAY, make(_good(BAD_DAY)))
    with pytest.raises(InputError) as err:
        ingest_date(BAD_DAY, settings)
    assert message in str(err.value)
    if case != "no rows":
        assert str(path) in str(err.value)
    assert load_table("impressions", settings).current_snapshot().snapshot_id == before


def test_corrupt_parquet_exits_nonzero_naming_the_file(settings, ingested, test_home):
    before = load_table("impressions", settings).current_snapshot().snapshot_id
    path = _landing_with(settings, BAD_DAY, raw=b"PAR1 this is not parquet PAR1")
    proc = subprocess.run([sys.executable, "-m", "reqdedup.cli", "ingest", "--date", BAD_DAY],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr and "not a readable Parquet file" in proc.stderr
    assert load_table("impressions", settings).current_snapshot().snapshot_id == before


def test_missing_landing_folder_is_a_clear_error(settings):
    with pytest.raises(InputError, match="no landing folder"):
        ingest_date("2031-01-01", settings)
    with pytest.raises(InputError, match="YYYY-MM-DD"):
        ingest_date("yesterday", settings)


def test_landing_schema_is_the_contract():
    # The generator's output is exactly the contract the ingest checks against.
    assert _good(DAY1).schema.equals(IMPRESSIONS_SCHEMA)


def test_storage_benchmark_writes_json_and_plot(settings, spark, tmp_path):
    from reqdedup.bench.storage import run_storage_bench

    out = tmp_path / "storage.json"
    result = run_storage_bench(requests=30, candidates=12, history=40, seed=1, json_path=out, settings=settings)
    import json

    saved = json.loads(out.read_text())
    for key in ("rows", "candidates_per_request", "bytes_iid", "bytes_sorted", "table_ratio",
                "user_columns_ratio", "item_columns_ratio", "per_column", "bytes_raw_log",
                "bytes_iid_same_properties", "table_ratio_same_properties", "user_columns_ratio_same_properties"):
        assert key in saved, key
    assert saved["rows"] == 30 * 12
    per_column = saved["per_column"]
    assert set(per_column) == {f.name for f in IMPRESSIONS_SCHEMA}
    assert sum(c["iid"] for c in per_column.values()) <= saved["bytes_iid"]
    assert saved["table_ratio"] == round(saved["bytes_iid"] / saved["bytes_sorted"], 2)
    # Same rows in every variant; sorting must shrink the user block even at this size.
    assert saved["user_columns_ratio_same_properties"] > 1.0
    assert (settings.reports_dir / "storage_bench.png").stat().st_size > 0
    assert result["plot"].endswith("storage_bench.png")


_SHARED_CATALOG_SCRIPT = r"""
import pyarrow as pa
from reqdedup.config import get_settings
from reqdedup.lake.catalog import get_catalog
from reqdedup.lake.spark import get_spark

settings = get_settings()
get_catalog(settings).create_namespace_if_not_exists(settings.namespace)  # tables exist before the JVM
spark = get_spark(settings, app_name="shared-catalog-test")
name = settings.spark_table("shared_t")
spark.sql(f"CREATE TABLE {name} (a int) USING iceberg")
spark.sql(f"INSERT INTO {name} VALUES (1)")
for value in (2, 3):
    # another writer commits (pyiceberg, as the publish and backfill steps do) ...
    get_catalog(settings).load_table(settings.table("shared_t")).append(pa.table({"a": pa.array([10 * value], pa.int32())}))
    # ... and the long-lived Spark session must see it and still commit after it
    spark.sql(f"INSERT INTO {name} VALUES ({value})")
rows = sorted(r.a for r in spark.sql(f"SELECT a FROM {name}").collect())
assert rows == [1, 2, 3, 20, 30], rows
print("SHARED-CATALOG-OK")
"""


@pytest.mark.slow
def test_long_lived_spark_session_and_pyiceberg_share_the_sqlite_catalog(tmp_path):
    """A Spark JVM started on an existing SQLite catalog neither reads a stale catalog nor
    fails its commits (SQLITE_BUSY_SNAPSHOT) after another writer committed (a fresh JVM:
    the session fixture's may have opened its catalog earlier)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("REQDEDUP_") or k == "REQDEDUP_JARS_DIR"}
    env["REQDEDUP_HOME"] = str(tmp_path / "home")
    proc = subprocess.run([sys.executable, "-c", _SHARED_CATALOG_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "SHARED-CATALOG-OK" in proc.stdout, proc.stderr[-4000:]
