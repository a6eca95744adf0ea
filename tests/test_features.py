"""Feature side tables: add without rewriting impressions, SPJ join without shuffle,
per-bucket pyiceberg merge, bucket backfills that leave other buckets' files alone."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from reqdedup import cli
from reqdedup.data.generator import GeneratorConfig, write_landing
from reqdedup.errors import InputError
from reqdedup.lake.backfill import backfill_feature, buckets_of_users, resolve_buckets
from reqdedup.lake.catalog import load_table
from reqdedup.lake.features import (
    FEATURES,
    add_feature,
    feature_table,
    get_feature,
    join_features,
    partition_layout,
    read_request_batches_with_features,
)
from reqdedup.lake.ingest import ingest_date, publish_date
from reqdedup.lake.read import read_request_batches

pytestmark = pytest.mark.slow

DAYS = ["2026-04-01", "2026-04-02", "2026-04-03"]
SMALL = dict(users=40, requests=90, candidates=8, history=16, items=500, seed=7)


def ensure_published(settings, day):
    """Ingest and publish a date unless main already has it (shared by the lake test files)."""
    table = None
    try:
        table = load_table("impressions", settings)
    except InputError:
        pass
    if table is not None and table.current_snapshot() is not None:
        if table.scan(row_filter=f"event_date = '{day}'", selected_fields=("request_id",)).to_arrow().num_rows:
            return
    write_landing(GeneratorConfig(date=day, **SMALL), out_dir=settings.landing_dir)
    ingest_date(day, settings)
    publish_date(day, settings)


def _impressions(settings, start, end):
    return load_table("impressions", settings).scan(
        row_filter=f"event_date >= '{start}' and event_date <= '{end}'").to_arrow()


@pytest.fixture(scope="module")
def added(settings, spark):
    for day in DAYS:
        ensure_published(settings, day)
    imp_snapshot = load_table("impressions", settings).current_snapshot().snapshot_id
    ctr = add_feature("item_ctr_7d", DAYS[0], DAYS[2], settings)
    users = add_feature("user_requests_7d", DAYS[0], DAYS[2], settings)
    print("item_ctr_7d add:", ctr)
    print("user_requests_7d add:", users)
    return {"imp_snapshot": imp_snapshot, "item_ctr_7d": ctr, "user_requests_7d": users}


def test_add_writes_side_tables_without_touching_impressions(settings, added):
    imp = load_table("impressions", settings)
    assert imp.current_snapshot().snapshot_id == added["imp_snapshot"]
    for name in FEATURES:
        side = load_table(feature_table(name), settings)
        assert partition_layout(side) == partition_layout(imp) == [("event_date", "identity"),
                                                                   ("user_id", f"bucket[{settings.buckets}]")]
        schema = side.schema()
        assert [schema.find_column_name(f.source_id) for f in side.sort_order().fields][:1] == ["user_id"]
        out = added[name]
        assert out["bytes_written"] > 0 and out["impressions_snapshot_id"] == added["imp_snapshot"]
        # A side table is a fraction of rewriting the impressions of the same dates.
        assert out["bytes_written"] < out["impressions_bytes_same_dates"]
        assert out["written_vs_whole_table"] < 1
    assert added["item_ctr_7d"]["rows"] == _impressions(settings, DAYS[0], DAYS[2]).num_rows


def test_item_ctr_uses_only_previous_days(settings, spark, added):
    imp = _impressions(settings, DAYS[0], DAYS[2]).select(["event_date", "item_id", "label"]).to_pandas()
    side = load_table(feature_table("item_ctr_7d"), settings).scan().to_arrow().to_pandas()
    first = side[side.event_date == dt.date.fromisoformat(DAYS[0])]
    assert (first.item_impressions_7d == 0).all() and first.item_ctr_7d.isna().all()  # no history yet
    day3 = dt.date.fromisoformat(DAYS[2])
    prev = imp[imp.event_date < day3]
    stats = prev.groupby("item_id").label.agg(["count", "sum"])
    prior = prev.label.mean()
    got = side[side.event_date == day3].drop_duplicates("item_id").set_index("item_id")
    for item, row in got.head(40).iterrows():
        n, clicks = (stats.loc[item, "count"], stats.loc[item, "sum"]) if item in stats.index else (0, 0)
        assert row.item_impressions_7d == n
        assert row.item_ctr_7d == pytest.approx((clicks + 20 * prior) / (n + 20))


def test_user_requests_counts_previous_days(settings, added):
    imp = _impressions(settings, DAYS[0], DAYS[2]).select(["event_date", "user_id", "request_id"]).to_pandas()
    side = load_table(feature_table("user_requests_7d"), settings).scan().to_arrow().to_pandas()
    day3 = dt.date.fromisoformat(DAYS[2])
    expected = imp[imp.event_date < day3].groupby("user_id").request_id.nunique()
    got = side[side.event_date == day3].set_index("user_id").user_requests_7d
    assert set(got.index) == set(imp[imp.event_date == day3].user_id)
    for user, value in got.items():
        assert value == expected.get(user, 0)


def test_spark_join_is_storage_partitioned_without_shuffle(settings, spark, added):
    df = join_features(spark, ["item_ctr_7d", "user_requests_7d"], DAYS[1], DAYS[2], settings,
                       columns=["label"])
    plan = df._jdf.queryExecution().executedPlan().toString()
    print(plan)
    assert "SortMergeJoin" in plan
    assert "Exchange" not in plan, plan  # neither shuffle nor broadcast exchange
    assert df.count() == _impressions(settings, DAYS[1], DAYS[2]).num_rows
    assert df.where("item_impressions_7d IS NULL OR user_requests_7d IS NULL").count() == 0


def test_pyiceberg_per_bucket_merge_matches_the_spark_join(settings, spark, added):
    names = ["item_ctr_7d", "user_requests_7d"]
    merged = pa.Table.from_batches(list(read_request_batches_with_features(
        DAYS[2], features=names, buckets=[1, 3], columns=["label"], batch_rows=50, settings=settings)))
    plain = pa.Table.from_batches(list(read_request_batches(DAYS[2], buckets=[1, 3], columns=["user_id", "label"],
                                                            batch_rows=50, settings=settings)))
    assert merged.column("request_id").to_pylist() == plain.column("request_id").to_pylist()
    rows = join_features(spark, names, DAYS[2], settings=settings).select(
        "request_id", "item_id", "item_ctr_7d", "user_requests_7d").collect()
    expected = {(r.request_id, r.item_id): (r.item_ctr_7d, r.user_requests_7d) for r in rows}
    got = zip(merged.column("request_id").to_pylist(), merged.column("item_id").to_pylist(),
              merged.column("item_ctr_7d").to_pylist(), merged.column("user_requests_7d").to_pylist())
    for rid, item, ctr, nreq in got:
        exp_ctr, exp_n = expected[(rid, item)]
        assert nreq == exp_n and ctr == pytest.approx(exp_ctr)


def test_backfill_rewrites_only_the_chosen_buckets(settings, spark, added):
    name = "item_ctr_7d"
    side = load_table(feature_table(name), settings)
    before = {t.file.file_path: tuple(t.file.partition) for t in side.scan().plan_files()}
    values_before = side.scan().to_arrow().sort_by([("request_id", "ascending"), ("item_id", "ascending")])
    snapshots_before = len(side.metadata.snapshots)
    user = next(u for u in _impressions(settings, DAYS[2], DAYS[2]).column("user_id").to_pylist()
                if buckets_of_users([u], settings.buckets)[u] == 3)
    out = backfill_feature(name, DAYS[1], DAYS[2], buckets=[1], users=[user], settings=settings)
    print("backfill:", {k: v for k, v in out.items() if k != "rewritten_files_outside_buckets"})
    assert out["buckets"] == [1, 3] and out["user_buckets"] == {str(user): 3}
    side = load_table(feature_table(name), settings)
    assert len(side.metadata.snapshots) == snapshots_before + 1  # one atomic commit
    after = {t.file.file_path: tuple(t.file.partition) for t in side.scan().plan_files()}
    day_ids = {(dt.date.fromisoformat(d) - dt.date(1970, 1, 1)).days for d in DAYS[1:]}

    def affected(part):
        return part[1] in (1, 3) and part[0] in day_ids

    untouched = {p for p, part in before.items() if not affected(part)}
    assert untouched <= set(after), "a file outside the backfilled buckets changed"
    assert not any(p in after for p, part in before.items() if affected(part)), "a backfilled file survived"
    assert out["other_buckets_untouched"] and not out["rewritten_files_outside_buckets"]
    assert 0 < out["bytes_rewritten"] < out["bytes_table_before"]
    assert out["files_rewritten"] == sum(affected(p) for p in before.values())
    values_after = side.scan().to_arrow().sort_by([("request_id", "ascending"), ("item_id", "ascending")])
    assert values_after.equals(values_before)  # recomputed from the same impressions: same values


def test_unknown_feature_and_out_of_range_buckets_are_clear_errors(settings, capsys, added):
    with pytest.raises(InputError, match="unknown feature 'nope': known features are item_ctr_7d, user_requests_7d"):
        get_feature("nope")
    assert cli.main(["features", "add", "nope", "--date", DAYS[0]]) == 2
    assert "unknown feature 'nope'" in capsys.readouterr().err
    assert cli.main(["features", "backfill", "item_ctr_7d", "--buckets", "1,9", "--date", DAYS[2]]) == 2
    assert "--buckets [9] out of range: the table has buckets 0..7" in capsys.readouterr().err
    with pytest.raises(InputError, match="give --buckets"):
        resolve_buckets(8)
    with pytest.raises(InputError, match="user ids are >= 0"):
        resolve_buckets(8, users=[-1])
    with pytest.raises(InputError, match="no published impressions for 2026-05-20"):
        add_feature("user_requests_7d", "2026-05-20", settings=settings)
    with pytest.raises(InputError, match="is after --end"):
        add_feature("user_requests_7d", DAYS[2], DAYS[0], settings=settings)
    assert cli.main(["features", "add", "item_ctr_7d", "--date", DAYS[0], "--start", DAYS[0]]) == 2
