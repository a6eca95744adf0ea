"""`reqdedup validate`: GX suites on a staged date, publish on success, quarantine on failure.

One good date goes through the CLI (validate -> published on main). One bad date, staged on
a separate table, carries one corruption per expectation, each on its own request, written
straight onto the staging branch (bypassing ingest's landing checks, as anything that lands
on a branch must be caught); it is validated once and each expectation has its own test.
"""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from reqdedup import cli
from reqdedup.contract import NUM_CATEGORIES
from reqdedup.data.generator import GeneratorConfig, write_landing
from reqdedup.errors import InputError
from reqdedup.lake.catalog import load_table
from reqdedup.lake.ingest import ingest_date, staging_branch
from reqdedup.quality.runner import ValidationFailed, validate_date
from reqdedup.quality.suites import file_order

pytestmark = pytest.mark.slow

GOOD_DAY, BAD_DAY = "2026-04-10", "2026-04-11"
BAD_TABLE = "impressions_audit_cases"
SMALL = dict(users=40, requests=90, candidates=8, history=16, items=500, seed=7)


def _rows_on_main(settings, table, day):
    return load_table(table, settings).scan(row_filter=f"event_date = '{day}'").to_arrow().num_rows


def test_good_date_passes_every_expectation_and_is_published(settings, spark, capsys):
    write_landing(GeneratorConfig(date=GOOD_DAY, **SMALL), out_dir=settings.landing_dir)
    staged = ingest_date(GOOD_DAY, settings)
    assert _rows_on_main(settings, "impressions", GOOD_DAY) == 0
    assert cli.main(["validate", "--date", GOOD_DAY]) == 0
    summary = json.loads(capsys.readouterr().out)
    failed = [e for e in summary["expectations"] if not e["success"]]
    assert not failed, failed
    checks = {e["check"] for e in summary["expectations"]}
    assert {"schema", "not_null_user_id", "request_item_unique", "one_user_per_request",
            "user_block_identical", "sorted_within_files", "label_rate", "row_count_matches_landing",
            "position_below_candidates", "user_dense_length_min", "item_dense_length_max"} <= checks
    assert summary["published"] and summary["rows_landed"] == staged["rows"]
    assert _rows_on_main(settings, "impressions", GOOD_DAY) == staged["rows"]
    assert staging_branch(GOOD_DAY) not in load_table("impressions", settings).refs()
    assert (settings.reports_dir / "data_docs" / "index.html").is_file()
    assert list((settings.reports_dir / "data_docs" / "validations").rglob("*.html"))


def test_validate_without_a_staged_date_is_a_clear_error(settings, capsys):
    assert cli.main(["validate", "--date", "2026-04-19"]) == 2
    err = capsys.readouterr().err
    assert "nothing staged for 2026-04-19" in err and "reqdedup ingest --date 2026-04-19" in err
    with pytest.raises(InputError, match="label rate bounds"):
        validate_date("2026-04-19", settings, label_rate_min=0.6, label_rate_max=0.1)


# ---- one staged date with one corruption per expectation ---------------------------------
def _set(table: pa.Table, name: str, values) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


@pytest.fixture(scope="module")
def bad(settings, spark):
    write_landing(GeneratorConfig(date=BAD_DAY, **SMALL), out_dir=settings.landing_dir)
    ingest_date(BAD_DAY, settings, table=BAD_TABLE)
    full = settings.spark_table(BAD_TABLE)
    branch = staging_branch(BAD_DAY)
    # Producers drift: a nullable user id and an extra column reach the branch.
    spark.sql(f"ALTER TABLE {full} ALTER COLUMN user_id DROP NOT NULL")
    spark.sql(f"ALTER TABLE {full} ADD COLUMN debug_flag INT")
    ice = load_table(BAD_TABLE, settings)
    staged = ice.scan(row_filter=f"event_date = '{BAD_DAY}'",
                      snapshot_id=ice.refs()[branch].snapshot_id).to_arrow()
    staged = staged.sort_by([("user_id", "ascending"), ("request_id", "ascending"), ("item_id", "ascending")])
    # Requests of distinct users, so each corruption is attributable to one check.
    first_request_of_user = {}
    for u, r in zip(staged.column("user_id").to_pylist(), staged.column("request_id").to_pylist()):
        first_request_of_user.setdefault(u, r)
    users = sorted(first_request_of_user)
    pick = dict(zip(["history", "dup", "null_user", "label", "two_users", "dense", "position", "lost",
                     "nan", "category", "item"],
                    [first_request_of_user[u] for u in users[:11]]))
    other_user = users[11]
    rid = staged.column("request_id").to_pylist()
    first_row = {r: rid.index(r) for r in pick.values()}

    cols = {n: staged.column(n).to_pylist() for n in staged.column_names}
    h = first_row[pick["history"]]
    cols["user_history"][h] = cols["user_history"][h] + [499]  # one row sees a newer history
    cols["user_id"][first_row[pick["null_user"]]] = None
    cols["label"][first_row[pick["label"]]] = 2
    cols["user_id"][first_row[pick["two_users"]]] = other_user
    cols["user_dense"][first_row[pick["dense"]]] = cols["user_dense"][first_row[pick["dense"]]][:-1]
    cols["position"][first_row[pick["position"]]] = SMALL["candidates"]
    cols["item_dense"][first_row[pick["nan"]]] = [float("nan")] + cols["item_dense"][first_row[pick["nan"]]][1:]
    cols["item_category"][first_row[pick["category"]]] = NUM_CATEGORIES
    cols["item_id"][first_row[pick["item"]]] = SMALL["items"]
    table = pa.table({n: pa.array(v, staged.schema.field(n).type) for n, v in cols.items()}, schema=staged.schema)
    dup = table.slice(first_row[pick["dup"]], 1)  # a replayed candidate row
    table = pa.concat_tables([table, dup])
    table = table.filter(pc.not_equal(table.column("request_id"), pick["lost"]))  # a request lost
    # Sorted like the writer would, except one user bucket written backwards.
    from pyiceberg.transforms import BucketTransform
    from pyiceberg.types import LongType

    bucket_of = BucketTransform(settings.buckets).transform(LongType())
    table = table.sort_by([("user_id", "ascending"), ("request_id", "ascending")])
    buckets = [bucket_of(u) if u is not None else -1 for u in table.column("user_id").to_pylist()]
    unsorted_bucket = max(set(buckets) - {-1}, key=buckets.count)
    in_b = pa.array([b == unsorted_bucket for b in buckets])
    reversed_part = table.filter(in_b)
    reversed_part = reversed_part.take(pa.array(range(reversed_part.num_rows - 1, -1, -1)))
    table = pa.concat_tables([table.filter(pc.invert(in_b)), reversed_part])
    # Written with Spark in exactly this row order (no writer sort, fanout per partition):
    # pyiceberg cannot commit while the test session's Spark JVM holds the SQLite catalog.
    from pyspark.sql import functions as F

    spark.sql(f"ALTER TABLE {full} WRITE UNORDERED")
    spark.sql(f"ALTER TABLE {full} SET TBLPROPERTIES ('write.distribution-mode'='none', "
              "'write.spark.fanout.enabled'='true')")
    df = spark.createDataFrame(table.to_pylist(), schema=spark.table(full).schema).coalesce(1)
    (df.writeTo(f"{full}.branch_{branch}").option("check-nullability", "false")
     .overwrite(F.col("event_date") == F.lit(dt.date.fromisoformat(BAD_DAY))))
    ice = load_table(BAD_TABLE, settings)
    unsorted_files = []
    for task in ice.scan(row_filter=f"event_date = '{BAD_DAY}'", snapshot_id=ice.refs()[branch].snapshot_id).plan_files():
        if task.file.partition[1] == unsorted_bucket:
            unsorted_files.append(task.file.file_path)
    assert unsorted_files and file_order(unsorted_files[0].removeprefix("file://"))["unsorted_pairs"] > 0

    with pytest.raises(ValidationFailed) as err:
        validate_date(BAD_DAY, settings, table=BAD_TABLE, label_rate_max=0.01)
    summary = err.value.summary
    print(str(err.value))
    return {"summary": summary, "message": str(err.value), "pick": pick, "unsorted_files": unsorted_files,
            "rows_written": table.num_rows, "by_check": {e["check"]: e for e in summary["expectations"]}}


@pytest.mark.parametrize("check,key", [
    ("user_block_identical", "history"),
    ("request_item_unique", "dup"),
    ("not_null_user_id", "null_user"),
    ("label_binary", "label"),
    ("one_user_per_request", "two_users"),
    ("user_dense_length_min", "dense"),
    ("position_below_candidates", "position"),
    ("dense_finite", "nan"),
    ("vocabulary_item_category", "category"),
    ("item_id_in_catalog", "item"),
])
def test_each_corruption_is_caught_with_its_request_as_sample_key(bad, check, key):
    entry = bad["by_check"][check]
    assert not entry["success"], entry
    request_id = bad["pick"][key]
    assert request_id in [k.get("request_id") for k in entry["sample_keys"]], entry
    # The report names the check, its sample keys and what to do.
    block = bad["message"].split(f"  - {check} [", 1)[1].split("\n  - ", 1)[0]
    assert str(request_id) in block and "what to do:" in block


def test_unsorted_file_is_named(bad):
    entry = bad["by_check"]["sorted_within_files"]
    assert not entry["success"]
    assert {k["file"] for k in entry["sample_keys"]} == set(bad["unsorted_files"])
    assert "before (user_id=" in entry["sample_keys"][0]["first_unsorted_key"]


def test_row_count_mismatch_names_the_lost_request(bad):
    entry = bad["by_check"]["row_count_matches_landing"]
    assert not entry["success"]
    landed = bad["summary"]["rows_landed"]
    assert entry["observed_value"] == {"table": bad["rows_written"], "landed": landed}
    # the row whose item_id was set past the catalog changed its (request_id, item_id) key too
    assert {k["request_id"] for k in entry["sample_keys"]["missing_from_table"]} == {bad["pick"]["lost"],
                                                                                    bad["pick"]["item"]}
    assert {k["request_id"] for k in entry["sample_keys"]["not_in_landing"]} == {bad["pick"]["dup"],
                                                                                bad["pick"]["item"]}


def test_schema_drift_and_label_rate_bounds(bad):
    schema = bad["by_check"]["schema"]
    assert not schema["success"] and "debug_flag" in [k.get("column") for k in schema["sample_keys"]]
    assert not bad["by_check"]["columns_in_order"]["success"]
    rate = bad["by_check"]["label_rate"]
    assert not rate["success"] and 0.01 < rate["observed_value"] < 0.5
    # Checks that the corruptions do not touch still pass.
    for ok in ("not_null_request_id", "non_negative_item_id", "item_dense_length_min"):
        assert bad["by_check"][ok]["success"], ok


def test_failed_date_is_quarantined_on_its_branch(settings, spark, bad):
    assert bad["summary"]["published"] is False
    assert "stays quarantined on branch stage_20260411" in bad["message"]
    ice = load_table(BAD_TABLE, settings)
    assert _rows_on_main(settings, BAD_TABLE, BAD_DAY) == 0  # training never sees it
    branch = staging_branch(BAD_DAY)
    assert branch in ice.refs()  # kept for inspection
    on_branch = spark.read.option("branch", branch).table(settings.spark_table(BAD_TABLE)) \
        .where(f"event_date = DATE'{BAD_DAY}'").count()
    assert on_branch == bad["rows_written"]
    report = json.loads(open(bad["summary"]["report"]).read())
    assert report["success"] is False and set(report["failed"]) == set(bad["summary"]["failed"])
