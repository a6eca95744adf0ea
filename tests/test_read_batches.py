"""Unit tests of the request-boundary cutter (no Spark, no catalog)."""

import pyarrow as pa
import pytest

from reqdedup.lake.read import cut_at_request_boundaries


def _batches(request_sizes, chunk):
    ids = [r for r, n in enumerate(request_sizes) for _ in range(n)]
    table = pa.table({"request_id": pa.array(ids, pa.int64()), "row": pa.array(range(len(ids)), pa.int64())})
    return table, table.to_batches(max_chunksize=chunk)


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("batch_rows", [4, 10, 25])
def test_batches_hold_whole_requests_in_order(chunk, batch_rows):
    sizes = [5, 1, 12, 3, 3, 8, 2, 30, 1]
    table, inputs = _batches(sizes, chunk)
    out = list(cut_at_request_boundaries(iter(inputs), batch_rows))
    assert pa.Table.from_batches(out).column("row").to_pylist() == table.column("row").to_pylist()
    seen = set()
    for b in out:
        ids = set(b.column("request_id").to_pylist())
        assert not ids & seen, "a request was split across two batches"
        seen |= ids
        # A batch exceeds batch_rows only when it is one request larger than batch_rows.
        assert b.num_rows <= batch_rows or len(ids) == 1
    assert seen == set(range(len(sizes)))


def test_empty_stream_yields_nothing():
    assert list(cut_at_request_boundaries(iter([]), 8)) == []


def test_landing_source_reads_sorted_whole_requests(tmp_path, monkeypatch):
    """REQDEDUP_READ_SOURCE=landing: raw Parquet, sorted in memory (machines without the catalog)."""
    from reqdedup.config import get_settings
    from reqdedup.data.generator import GeneratorConfig, generate_table, write_landing
    from reqdedup.errors import InputError
    from reqdedup.lake.read import read_request_batches

    monkeypatch.setenv("REQDEDUP_LANDING_DIR", str(tmp_path))
    monkeypatch.setenv("REQDEDUP_READ_SOURCE", "landing")
    cfg = GeneratorConfig(users=20, requests=40, candidates=5, history=8, items=100, seed=2, date="2026-06-01")
    write_landing(cfg, out_dir=tmp_path)
    settings = get_settings()
    batches = list(read_request_batches("2026-06-01", "2026-06-02", columns=["user_id"], batch_rows=30,
                                        settings=settings))
    got = pa.Table.from_batches(batches)
    assert got.num_rows == generate_table(cfg).num_rows
    keys = list(zip(got.column("user_id").to_pylist(), got.column("request_id").to_pylist()))
    assert keys == sorted(keys)
    # a projection without user_id is still sorted by it (the evaluation's fingerprint reads so)
    projected = pa.Table.from_batches(list(read_request_batches(
        "2026-06-01", columns=["item_id", "label"], batch_rows=30, settings=settings)))
    assert projected.column_names == ["request_id", "item_id", "label"]
    assert projected.column("request_id").to_pylist() == got.column("request_id").to_pylist()
    with pytest.raises(InputError, match="bucket subsets"):
        list(read_request_batches("2026-06-01", buckets=[0], settings=settings))


def test_catalog_db_is_in_wal_mode(tmp_path, monkeypatch):
    """WAL: a Spark JVM's open read transaction must not block other processes' commits."""
    import sqlite3

    from reqdedup.config import get_settings
    from reqdedup.lake.catalog import get_catalog

    monkeypatch.setenv("REQDEDUP_CATALOG_DB", str(tmp_path / "catalog.db"))
    monkeypatch.setenv("REQDEDUP_WAREHOUSE_DIR", str(tmp_path / "warehouse"))
    get_catalog(get_settings()).create_namespace_if_not_exists("x")
    assert sqlite3.connect(tmp_path / "catalog.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
