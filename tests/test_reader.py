"""The request-level reader (reqdedup.train.reader): whole requests, orders, shards, bad input."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from reqdedup.data.generator import GeneratorConfig, generate_table
from reqdedup.errors import InputError
from reqdedup.train.reader import (
    ORDERS,
    ReaderSpec,
    RequestReader,
    decode_unit,
    history_row_hash,
    iceberg_bucket,
    plan_files,
    shard_units,
)

SEQ = 16


@pytest.fixture(scope="module")
def sorted_rows() -> pa.Table:
    rows = generate_table(GeneratorConfig(date="2026-03-01", users=60, requests=240, candidates=12, history=24,
                                          items=400, seed=3))
    return rows.sort_by([("user_id", "ascending"), ("request_id", "ascending")])


def _write(folder, rows: pa.Table, cuts) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    edges = [0, *cuts, rows.num_rows]
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        pq.write_table(rows.slice(a, b - a), folder / f"part-{i:03d}.parquet", row_group_size=97)
    return sorted(folder.glob("*.parquet"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, sorted_rows):
    # Cuts at arbitrary rows: files (and row groups of 97 rows) split requests mid-way.
    n = sorted_rows.num_rows
    path = tmp_path_factory.mktemp("files") / "data"
    _write(path, sorted_rows, [n // 5 + 3, n // 2 + 1, 3 * n // 4 + 7])
    return path


def _all_batches(units, **kw):
    spec = ReaderSpec(seq_len=SEQ, **{"batch_rows": 60, "workers": 0, **kw})
    return list(RequestReader(units, spec).batches(kw.get("epoch", 0))), spec


def test_iceberg_bucket_matches_pyiceberg():
    from pyiceberg.transforms import BucketTransform
    from pyiceberg.types import LongType

    values = np.array([0, 1, -1, 17, 2**40 + 3, -(2**62), 123456789], dtype=np.int64)
    fn = BucketTransform(8).transform(LongType())
    assert iceberg_bucket(values, 8).tolist() == [fn(int(v)) for v in values]


def test_history_hash_tells_lists_apart():
    arr = pa.array([[1, 2, 3], [1, 2, 3], [3, 2, 1], [], [1, 2], [0], []], pa.list_(pa.int32()))
    h = history_row_hash(arr.flatten().to_numpy(), arr.offsets.to_numpy().astype(np.int64))
    assert h[0] == h[1] and h[3] == h[6]
    assert len({int(h[0]), int(h[2]), int(h[3]), int(h[4]), int(h[5])}) == 5


def test_requests_split_across_files_are_stitched(folder, sorted_rows):
    units = plan_files([folder])
    assert sum(u.rows for u in units) == sorted_rows.num_rows
    assert any(u.tail_rows for u in units), "the cuts were meant to split a request"
    seen = []
    for u in units:
        for chunk in decode_unit(u, SEQ):
            seen += chunk.request_id.tolist()
            assert int(chunk.cand_count.sum()) == chunk.num_rows
    ids = sorted_rows.column("request_id").to_numpy()
    expected = ids[np.r_[True, ids[1:] != ids[:-1]]].tolist()
    assert seen == expected  # every request once, whole, in table order


@pytest.mark.parametrize("order", ORDERS)
def test_every_request_whole_in_exactly_one_batch(folder, sorted_rows, order):
    units = plan_files([folder])
    batches, _ = _all_batches(units, order=order, buffer_requests=7, buffer_rows=150)
    counts = torch.cat([b.label.new_tensor([b.num_rows]) for b in batches])
    assert int(counts.sum()) == sorted_rows.num_rows
    # per user, the candidate rows seen equal the table's
    got = sorted(i for b in batches for i in zip(b.user_ids[b.row_request].tolist(), b.item_id.tolist()))
    want = sorted(zip(sorted_rows.column("user_id").to_pylist(), sorted_rows.column("item_id").to_pylist()))
    assert got == want
    if order != "iid":
        per_request = sorted_rows.group_by("request_id").aggregate([("item_id", "count")])
        sizes = sorted(per_request.column("item_id_count").to_pylist())
        assert sorted(c for b in batches for c in torch.bincount(b.row_request).tolist()) == sizes
        assert all(b.num_rows <= 60 for b in batches)


def _fingerprint(batches):
    return [(b.user_ids.tolist(), b.item_id.tolist()) for b in batches]


@pytest.mark.parametrize("order", ["request_shuffle", "iid"])
def test_orders_are_deterministic_and_change_every_epoch(folder, order):
    units = plan_files([folder])
    reader = RequestReader(units, ReaderSpec(order=order, batch_rows=60, seq_len=SEQ, seed=4, workers=0,
                                             buffer_requests=9, buffer_rows=200))
    a, b, c = (_fingerprint(reader.batches(e)) for e in (0, 0, 1))
    assert a == b
    assert a != c
    other_seed = RequestReader(units, ReaderSpec(order=order, batch_rows=60, seq_len=SEQ, seed=5, workers=0,
                                                 buffer_requests=9, buffer_rows=200))
    assert _fingerprint(other_seed.batches(0)) != a


def test_table_order_is_the_same_every_epoch_and_buffer_one_is_table(folder):
    units = plan_files([folder])
    table = RequestReader(units, ReaderSpec(order="table", batch_rows=60, seq_len=SEQ, workers=0))
    one = RequestReader(units, ReaderSpec(order="request_shuffle", buffer_requests=1, batch_rows=60, seq_len=SEQ,
                                          workers=0, seed=9))
    assert _fingerprint(table.batches(0)) == _fingerprint(table.batches(3)) == _fingerprint(one.batches(2))


def test_unbounded_buffer_is_a_full_shuffle(folder, sorted_rows):
    units = plan_files([folder])
    full = list(RequestReader(units, ReaderSpec(order="request_shuffle", buffer_requests=None, batch_rows=60,
                                                seq_len=SEQ, workers=0, seed=1)).batches(0))
    users = sorted_rows.column("user_id").to_numpy()
    # The first batch draws requests from all over the table, not from its first few users.
    first_users = set(full[0].user_ids.tolist())
    position = {u: i for i, u in enumerate(dict.fromkeys(users.tolist()))}
    spread = [position[u] for u in first_users]
    assert max(spread) - min(spread) > len(position) // 2
    small = list(RequestReader(units, ReaderSpec(order="request_shuffle", buffer_requests=3, batch_rows=60,
                                                 seq_len=SEQ, workers=0, seed=1, streams=1)).batches(0))
    spread_small = [position[u] for u in set(small[0].user_ids.tolist())]
    assert max(spread_small) - min(spread_small) < max(spread) - min(spread)


def test_workers_do_not_change_the_batches(folder):
    units = plan_files([folder])
    spec = dict(order="request_shuffle", batch_rows=60, seq_len=SEQ, seed=2, buffer_requests=11, streams=3)
    in_process = _fingerprint(RequestReader(units, ReaderSpec(workers=0, **spec)).batches(1))
    two = _fingerprint(RequestReader(units, ReaderSpec(workers=2, **spec)).batches(1))
    assert in_process == two


def test_ranks_read_disjoint_files_and_take_the_same_steps(folder, sorted_rows):
    units = plan_files([folder])
    shards = shard_units(units, 2)
    paths = [{u.path for u in s} for s in shards]
    assert not paths[0] & paths[1] and paths[0] | paths[1] == {u.path for u in units}
    readers = [RequestReader(units, ReaderSpec(order="request_shuffle", batch_rows=60, seq_len=SEQ, workers=0),
                             rank=r, world_size=2) for r in range(2)]
    steps = {r.steps_per_epoch() for r in readers}
    assert len(steps) == 1
    got = [list(r.epoch(0)) for r in readers]
    assert [len(g) for g in got] == [steps.pop()] * 2
    requests = [set(r for b in g for r in b.request_ids.tolist()) for g in got]
    assert not requests[0] & requests[1]  # a request lives in one rank's files


def test_a_batch_gives_the_model_the_same_loss_as_the_old_path(folder, sorted_rows):
    from reqdedup.train.loader import arrow_to_request_batch
    from reqdedup.train.losses import recommendation_losses
    from reqdedup.train.model import ModelConfig, RecModel

    units = plan_files([folder])
    batch = next(iter(RequestReader(units, ReaderSpec(order="request_shuffle", batch_rows=60, seq_len=SEQ,
                                                      workers=0, seed=3)).batches(0)))
    # The same requests through today's path.
    ids = sorted_rows.column("request_id").to_numpy()
    rows = sorted_rows.take(pa.array(np.flatnonzero(np.isin(ids, batch.request_ids.numpy()))))
    old = arrow_to_request_batch(rows, SEQ)
    assert old.num_rows == batch.num_rows and old.num_requests == batch.num_requests
    torch.manual_seed(0)
    model = RecModel(ModelConfig(items=400, seq_len=SEQ, d_model=16, n_layers=1, n_heads=2, ff_dim=32, emb_dim=8,
                                 user_mlp=(16,), item_mlp=(16,), head_mlp=(16, 8))).train()
    losses = [recommendation_losses(model(b), b, mask_same_user=True)[0] for b in (batch, old)]
    assert torch.allclose(losses[0], losses[1], atol=1e-5)


def test_a_request_whose_rows_disagree_on_user_data_raises(tmp_path, sorted_rows):
    bad = sorted_rows.to_pydict()
    hist = bad["user_history"]
    rid = bad["request_id"]
    row = next(i for i in range(1, len(rid)) if rid[i] == rid[i - 1])
    hist[row] = list(hist[row]) + [7]
    _write(tmp_path / "bad", pa.Table.from_pydict(bad, schema=sorted_rows.schema), [])
    units = plan_files([tmp_path / "bad"])
    with pytest.raises(InputError, match=rf"part-000.parquet: request_id {rid[row]}: .*disagree on the user block"):
        list(decode_unit(units[0], SEQ))


def test_a_file_that_is_not_request_sorted_is_refused(tmp_path, sorted_rows):
    n = sorted_rows.num_rows
    ids = sorted_rows.column("request_id").to_numpy()
    end_first = int(np.flatnonzero(ids != ids[0])[0])
    # the first request again at the end of the file
    shuffled = pa.concat_tables([sorted_rows.slice(end_first), sorted_rows.slice(0, end_first)])
    shuffled = pa.concat_tables([sorted_rows.slice(0, end_first), shuffled.slice(0, n - 2 * end_first),
                                 sorted_rows.slice(0, end_first)])
    _write(tmp_path / "unsorted", shuffled, [])
    with pytest.raises(InputError, match=rf"request_id {ids[0]} reappears after another request"):
        for u in plan_files([tmp_path / "unsorted"]):
            list(decode_unit(u, SEQ))


def test_bad_input_errors_name_the_file_or_key(tmp_path, sorted_rows, settings):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "part-000.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match=r"part-000.parquet: not a readable Parquet file"):
        plan_files([tmp_path / "corrupt"])
    _write(tmp_path / "narrow", sorted_rows.drop_columns(["item_dense"]), [])
    with pytest.raises(InputError, match=r"part-000.parquet: no column\(s\) item_dense"):
        list(decode_unit(plan_files([tmp_path / "narrow"])[0], SEQ))
    with pytest.raises(InputError, match="nothing-here does not exist"):
        plan_files([tmp_path / "nothing-here"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no Parquet files"):
        plan_files([tmp_path / "empty"])
    from reqdedup.train.reader import plan

    with pytest.raises(InputError, match="date range is empty"):
        plan("2026-03-02", "2026-03-01", settings=settings)
    units = plan_files(_write(tmp_path / "ok", sorted_rows, []))
    with pytest.raises(InputError, match=r"12 candidate rows, more than data.batch_rows = 5"):
        list(RequestReader(units, ReaderSpec(batch_rows=5, seq_len=SEQ, workers=0)).batches(0))


@pytest.mark.slow
def test_iceberg_and_landing_paths_give_the_same_batches(settings, spark):
    """The same dates through the Iceberg scan plan and through the landed files: the same
    batches in every order (the landing path sorts with Iceberg's own bucket function)."""
    from reqdedup.data.generator import write_landing
    from reqdedup.lake.ingest import ingest_date
    from reqdedup.train.reader import plan_iceberg, plan_landing

    days = ("2026-03-11", "2026-03-12")
    for day in days:
        write_landing(GeneratorConfig(date=day, users=50, requests=150, candidates=8, history=20, items=300, seed=7),
                      out_dir=settings.landing_dir)
        ingest_date(day, settings, publish=True)
    lake, landing = plan_iceberg(*days, settings=settings), plan_landing(*days, settings=settings)
    assert sum(u.rows for u in lake) == sum(u.rows for u in landing) == 2 * 150 * 8
    # what lets `reqdedup bench loader` reuse an ingested date instead of ingesting it again
    from reqdedup.bench.loader import already_ingested

    assert already_ingested(days[0], settings) and not already_ingested("2026-03-13", settings)
    for order in ORDERS:
        spec = ReaderSpec(order=order, batch_rows=40, seq_len=SEQ, seed=1, workers=0, buffer_requests=13,
                          buffer_rows=100)
        a, b = (list(RequestReader(u, spec).batches(1)) for u in (lake, landing))
        assert [(x.request_ids.tolist(), x.item_id.tolist(), x.label.tolist()) for x in a] == \
               [(x.request_ids.tolist(), x.item_id.tolist(), x.label.tolist()) for x in b], order
    # ingest wrote the request-level projection of every data file: the lake path read through
    # it (above) and decoding every row give the same batches
    assert all(u.requests_path for u in lake)
    for order in ORDERS:
        spec = dict(order=order, batch_rows=40, seq_len=SEQ, seed=2, workers=0, buffer_requests=13, buffer_rows=100)
        narrow, wide = (list(RequestReader(lake, ReaderSpec(use_projection=p, **spec)).batches(0)) for p in (True, False))
        assert len(narrow) == len(wide) > 0
        for a, b in zip(narrow, wide):
            for f in ("request_ids", "user_ids", "history", "history_len", "user_dense", "row_request", "item_id",
                      "item_dense", "label"):
                assert torch.equal(getattr(a, f), getattr(b, f)), (order, f)
    bucket_subset = plan_iceberg(*days, buckets=[1, 3], settings=settings)
    assert {u.partition[1] for u in bucket_subset} <= {1, 3}
    assert [u.partition[1] for u in plan_landing(*days, buckets=[1, 3], settings=settings)] == \
           [u.partition[1] for u in bucket_subset]


def test_landing_projection_gives_the_wide_reads_batches(settings, tmp_path):
    """The landing path writes a request-level projection of the user block beside each
    sorted file; reading through it gives the same batches as decoding every row."""
    from dataclasses import replace as dc_replace

    from reqdedup.data.generator import write_landing
    from reqdedup.train.reader import plan_landing

    local = dc_replace(settings, home=tmp_path, landing_dir=tmp_path / "landing")
    write_landing(GeneratorConfig(date="2026-03-20", users=40, requests=120, candidates=9, history=30, items=300,
                                  seed=2), out_dir=local.landing_dir)
    units = plan_landing("2026-03-20", settings=local)
    assert all(u.requests_path for u in units)
    for order in ORDERS:
        spec = dict(order=order, batch_rows=45, seq_len=SEQ, seed=3, workers=0, buffer_requests=10, buffer_rows=90)
        wide, narrow = (list(RequestReader(units, ReaderSpec(use_projection=p, **spec)).batches(0)) for p in (False, True))
        assert len(wide) == len(narrow)
        for a, b in zip(wide, narrow):
            for f in ("request_ids", "user_ids", "history", "history_len", "user_dense", "row_request", "item_id",
                      "item_dense", "label"):
                assert torch.equal(getattr(a, f), getattr(b, f)), (order, f)
    # A projection that no longer matches its file is refused.
    import pyarrow.parquet as pq2

    proj = pq2.read_table(units[0].requests_path)
    pq2.write_table(proj.slice(1), units[0].requests_path)
    with pytest.raises(InputError, match="does not match"):
        list(decode_unit(units[0], SEQ))


def test_file_projection_gives_the_wide_reads_batches(tmp_path, sorted_rows, settings, monkeypatch):
    """The projection of a data file (what ingest writes beside each Iceberg data file),
    streamed in batches that cut requests mid-way, gives the batches of decoding every row;
    data files gone -> their projections are stale and removed."""
    from dataclasses import replace as dc_replace

    import reqdedup.lake.projection as projection

    # written from many small batches (requests straddle them); read as usual, so both reads
    # cut the same decode chunks (chunk boundaries steer the shuffle buffer's drains)
    monkeypatch.setattr(projection, "DECODE_BATCH_BYTES", 16 << 10)
    local = dc_replace(settings, warehouse_dir=tmp_path / "warehouse")
    n = sorted_rows.num_rows
    files = [_write(tmp_path / f"p{i}", part, []) for i, part in enumerate((sorted_rows.slice(0, n // 2),
                                                                               sorted_rows.slice(n // 2)))]
    units = [u for f in files for u in plan_files(f)]
    written = projection.write_projections([u.path for u in units], local)
    assert written["written"] == 2 and projection.write_projections([u.path for u in units], local)["existing"] == 2
    monkeypatch.undo()
    out = projection.projection_path(local, units[0].path)
    meta = pq.read_metadata(out)
    assert meta.num_rows == len(set(sorted_rows.slice(0, n // 2).column("request_id").to_pylist()))
    with_projection = [dc_replace(u, requests_path=str(projection.projection_path(local, u.path))) for u in units]
    for order in ORDERS:
        spec = dict(order=order, batch_rows=45, seq_len=SEQ, seed=3, workers=0, buffer_requests=10, buffer_rows=90)
        wide = list(RequestReader(units, ReaderSpec(**spec)).batches(0))
        narrow = list(RequestReader(with_projection, ReaderSpec(**spec)).batches(0))
        assert len(wide) == len(narrow) > 0
        for a, b in zip(wide, narrow):
            for f in ("request_ids", "user_ids", "history", "history_len", "user_dense", "row_request", "item_id",
                      "item_dense", "label"):
                assert torch.equal(getattr(a, f), getattr(b, f)), (order, f)
    # a data file deleted (an expired snapshot's): its projection is stale; dry run first
    os.unlink(units[0].path)
    assert projection.remove_stale_projections(local, dry_run=True) == {"removed": 1, "kept": 1, "dry_run": True}
    assert out.exists()
    assert projection.remove_stale_projections(local) == {"removed": 1, "kept": 1, "dry_run": False}
    assert not out.exists() and projection.projection_path(local, units[1].path).exists()


def test_file_projection_refuses_what_it_cannot_trust(tmp_path, sorted_rows, settings):
    """Writing a projection checks every row: rows of a request that disagree on the user
    block, or a request id that reappears, raise naming the file, and nothing is written."""
    from dataclasses import replace as dc_replace

    from reqdedup.lake.projection import projection_path, write_projections

    local = dc_replace(settings, warehouse_dir=tmp_path / "warehouse")
    bad = sorted_rows.to_pydict()
    rid = bad["request_id"]
    row = next(i for i in range(1, len(rid)) if rid[i] == rid[i - 1])
    bad["user_history"][row] = list(bad["user_history"][row]) + [7]
    [disagree] = _write(tmp_path / "disagree", pa.Table.from_pydict(bad, schema=sorted_rows.schema), [])
    with pytest.raises(InputError, match=rf"disagree/part-000.parquet: request_id {rid[row]}: .*disagree"):
        write_projections([str(disagree)], local)
    ids = sorted_rows.column("request_id").to_numpy()
    end_first = int(np.flatnonzero(ids != ids[0])[0])
    [again] = _write(tmp_path / "again", pa.concat_tables([sorted_rows, sorted_rows.slice(0, end_first)]), [])
    with pytest.raises(InputError, match=rf"again/part-000.parquet: request_id {ids[0]} reappears"):
        write_projections([str(again)], local)
    for f in (disagree, again):
        assert not projection_path(local, str(f)).exists()
    assert not any(p.is_file() for p in (tmp_path / "warehouse").rglob("*"))  # no temp file left either


def test_next_epoch_started_ahead_gives_that_epochs_batches(folder):
    units = plan_files([folder])
    spec = dict(order="request_shuffle", batch_rows=60, seq_len=SEQ, seed=3, workers=2, buffer_requests=9)
    reader = RequestReader(units, ReaderSpec(**spec))
    steps = reader.steps_per_epoch()
    first = list(reader.epoch(0, next_epoch=1))
    assert len(first) == steps and 1 in reader._pending  # epoch 1 already decoding
    second = list(reader.epoch(1))
    assert not reader._pending
    fresh = RequestReader(units, ReaderSpec(**spec))
    assert _fingerprint(first) == _fingerprint(list(fresh.epoch(0)))
    assert _fingerprint(second) == _fingerprint(list(fresh.epoch(1)))
    # An epoch started ahead and never consumed is stopped by close().
    list(reader.epoch(2, next_epoch=3))
    reader.close()
    assert not reader._pending


def test_decode_batches_shrink_as_rows_widen(tmp_path, sorted_rows, monkeypatch):
    import pyarrow.parquet as pq

    import reqdedup.lake.projection as reader

    monkeypatch.setattr(reader, "DECODE_BATCH_BYTES", 64 << 10)  # the test table is small
    path = tmp_path / "t.parquet"
    pq.write_table(sorted_rows, path)
    pf = pq.ParquetFile(path)
    narrow = reader.rows_per_decode_batch(pf, ["request_id", "item_id"], 65536)
    wide = reader.rows_per_decode_batch(pf, ["request_id", "item_id", "user_history"], 65536)
    assert narrow > wide >= 256  # the history dominates the bytes per row
    group = pf.metadata.row_group(0)
    size = sum(group.column(i).total_uncompressed_size for i in range(group.num_columns)
               if group.column(i).path_in_schema.split(".")[0] in ("request_id", "item_id", "user_history"))
    assert wide == max(256, min(65536, int((64 << 10) // (size / group.num_rows))))


def test_the_window_gathers_what_concatenating_its_chunks_would(folder):
    from dataclasses import fields

    from reqdedup.train.reader import RequestWindow, concat_chunks, requests_to_batch

    chunks = [c for u in plan_files([folder]) for c in decode_unit(u, SEQ, batch_rows=150)]
    assert len(chunks) > 4
    window = RequestWindow()
    for c in chunks:
        window.add(c)
    merged = concat_chunks(chunks)
    chunk_of = np.repeat(np.arange(len(chunks)), [c.num_requests for c in chunks])
    rng = np.random.default_rng(0)

    def same(batch, req):  # the gathered batch holds req grouped by chunk, req's order within each
        ref = requests_to_batch(merged, req[np.argsort(chunk_of[req], kind="stable")])
        for f in fields(ref):
            a, b = getattr(batch, f.name), getattr(ref, f.name)
            assert (a is None and b is None) or torch.equal(a, b), f.name

    req = rng.permutation(merged.num_requests)[:37]
    same(window.gather(req), req)
    # requests kept for the next drain stay references into their chunks: the same content
    held = rng.permutation(merged.num_requests)[:23]
    window.keep(held)
    assert window.num_requests == 23 and len(window.chunks) == len(set(chunk_of[held].tolist()))
    chunk_of, merged = chunk_of[held], requests_to_batch(merged, held)
    sub = rng.permutation(23)[:11]
    batch = window.gather(sub)
    ref_order = sub[np.argsort(chunk_of[sub], kind="stable")]
    assert batch.request_ids.tolist() == merged.request_ids[ref_order].tolist()
    assert torch.equal(batch.history, merged.history[ref_order])
    assert batch.num_rows == int(torch.isin(merged.row_request, torch.from_numpy(sub)).sum())


def test_a_packed_chunk_is_one_shared_buffer_that_unpacks_to_the_same_chunk(folder):
    from dataclasses import fields, replace

    from reqdedup.train.reader import pack_chunk, unpack_chunk

    chunk = next(decode_unit(plan_files([folder])[0], SEQ))
    with_features = replace(chunk, features=torch.arange(chunk.num_rows * 3, dtype=torch.float32).reshape(-1, 3))
    for c in (chunk, with_features):
        packed = pack_chunk(c)
        assert packed.buffer.is_shared() and packed.buffer.dtype == torch.uint8  # one descriptor to pass
        back = unpack_chunk(packed)
        for f in fields(c):
            a, b = getattr(c, f.name), getattr(back, f.name)
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f.name
