"""Loader: orders, sharding, whole requests, dedup of the user block, bad input."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from reqdedup.data.generator import GeneratorConfig, generate_table
from reqdedup.errors import InputError
from reqdedup.train.loader import RequestLoader, arrow_to_request_batch, global_batch_indices


@pytest.fixture(scope="module")
def sorted_rows():
    rows = generate_table(GeneratorConfig(users=60, requests=200, candidates=10, history=24, items=400, seed=3,
                                          date="2026-02-01"))
    return rows.sort_by([("user_id", "ascending"), ("request_id", "ascending")])


def _request_sets(loader, epoch=0):
    return [set(b.user_ids.tolist()) for b in loader.epoch(epoch)]


@pytest.mark.parametrize("order", ["sorted", "block_shuffled"])
def test_request_orders_keep_requests_whole(sorted_rows, order):
    ids = sorted_rows.column("request_id").to_numpy()
    batches = global_batch_indices(ids, order, batch_rows=64, seed=0, epoch=0)
    seen = set()
    for idx in batches:
        reqs = set(ids[idx].tolist())
        assert not reqs & seen
        seen |= reqs
        # rows of each request in the batch are all there
        for r in reqs:
            assert (ids[idx] == r).sum() == (ids == r).sum()
    assert sum(len(i) for i in batches) == len(ids)


def test_iid_covers_every_row_once_and_mixes_users(sorted_rows):
    ids = sorted_rows.column("request_id").to_numpy()
    iid = global_batch_indices(ids, "iid", batch_rows=64, seed=0, epoch=0)
    assert sorted(np.concatenate(iid).tolist()) == list(range(len(ids)))
    users = sorted_rows.column("user_id").to_numpy()
    srt = global_batch_indices(ids, "sorted", batch_rows=64, seed=0, epoch=0)
    uniq = lambda bs: np.mean([len(np.unique(users[b])) for b in bs[:-1]])
    assert uniq(iid) > 3 * uniq(srt), (uniq(iid), uniq(srt))


def test_epochs_reshuffle_but_a_seed_repeats(sorted_rows):
    ids = sorted_rows.column("request_id").to_numpy()
    a = global_batch_indices(ids, "block_shuffled", 64, seed=1, epoch=0)
    b = global_batch_indices(ids, "block_shuffled", 64, seed=1, epoch=1)
    c = global_batch_indices(ids, "block_shuffled", 64, seed=1, epoch=0)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(np.array_equal(x, y) for x, y in zip(a, c))


def test_shards_are_disjoint_and_equal_length(sorted_rows):
    loaders = [RequestLoader(sorted_rows, order="sorted", batch_rows=64, seq_len=16, rank=r, world_size=2)
               for r in range(2)]
    assert loaders[0].steps_per_epoch() == loaders[1].steps_per_epoch() > 0
    shard_rows = [set(np.concatenate(l._rank_batches(0)).tolist()) for l in loaders]
    assert not shard_rows[0] & shard_rows[1]
    rows = [sum(b.num_rows for b in l.epoch(0)) for l in loaders]
    assert rows == [len(s) for s in shard_rows]
    stats = loaders[0].batch_stats()
    assert all(s.unique_users <= s.requests for s in stats)


def test_batch_dedups_user_block(sorted_rows):
    rows = sorted_rows.slice(0, 50)
    batch = arrow_to_request_batch(rows, seq_len=16)
    n_req = len(set(rows.column("request_id").to_pylist()))
    assert batch.num_requests == n_req and batch.num_rows == 50
    # history holds the most recent ids, shifted by one
    first = rows.column("user_history")[0].as_py()
    expect = [i + 1 for i in first[-16:]]
    assert batch.history[batch.row_request[0], : len(expect)].tolist() == expect
    assert torch.equal(batch.label, torch.tensor(rows.column("label").to_pylist(), dtype=torch.float32))


def test_rows_disagreeing_on_user_features_are_refused(sorted_rows):
    rows = sorted_rows.slice(0, 20).to_pylist()
    rows[1]["user_history"] = rows[1]["user_history"][:-1] + [rows[1]["user_history"][-1] + 1]
    bad = pa.Table.from_pylist(rows, schema=sorted_rows.schema)
    with pytest.raises(ValueError, match=str(rows[1]["request_id"])):
        arrow_to_request_batch(bad, seq_len=64)


def test_empty_shard_and_bad_settings_are_clear_errors(sorted_rows):
    tiny = sorted_rows.slice(0, 10)
    with pytest.raises(InputError, match="empty shard"):
        RequestLoader(tiny, order="sorted", batch_rows=64, seq_len=8, rank=1, world_size=2)
    with pytest.raises(InputError, match="unknown order"):
        RequestLoader(sorted_rows, order="random", batch_rows=64, seq_len=8)
