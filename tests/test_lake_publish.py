"""Write-audit-publish under retries (issue 13 items 1 and 2): a retried ingest on a new
table, and a publish tied to the audited snapshot (refused if the branch moved past it, a
no-op success when retried after it succeeded). Each test uses its own table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reqdedup.data.generator import GeneratorConfig, write_landing
from reqdedup.errors import InputError
from reqdedup.lake.catalog import load_table
from reqdedup.lake.ingest import ingest_date, publish_date

pytestmark = pytest.mark.slow

SMALL = dict(users=20, requests=40, candidates=6, history=8, items=300, seed=3)


def _land(settings, day, seed=3):
    write_landing(GeneratorConfig(date=day, **{**SMALL, "seed": seed}), out_dir=settings.landing_dir)


def _main_rows(settings, table, day):
    return load_table(table, settings).scan(row_filter=f"event_date = '{day}'").to_arrow().num_rows


def test_retried_ingest_on_a_new_table_before_any_publish(settings, spark):
    """Airflow's retry of the first day's ingest (and a re-ingest after a failed validation):
    main has no snapshot yet, and Iceberg's CREATE OR REPLACE BRANCH refused that."""
    table, day = "retry_new_table", "2026-04-01"
    _land(settings, day)
    first = ingest_date(day, settings, table=table)
    assert load_table(table, settings).current_snapshot() is None  # nothing published yet
    again = ingest_date(day, settings, table=table)
    assert again["rows"] == first["rows"]
    assert again["snapshot_id"] != first["snapshot_id"]
    ice = load_table(table, settings)
    on_branch = ice.scan(snapshot_id=ice.refs()[again["branch"]].snapshot_id).to_arrow()
    assert on_branch.num_rows == first["rows"]  # the date replaced, not appended twice
    published = publish_date(day, settings, table, snapshot_id=again["snapshot_id"])
    assert published["published"] and not published["already"]
    assert load_table(table, settings).current_snapshot().snapshot_id == again["snapshot_id"]
    assert _main_rows(settings, table, day) == first["rows"]


def test_validate_reports_the_audited_snapshot_and_publish_moves_main_to_exactly_it(settings, spark, test_home):
    from reqdedup.quality.runner import validate_date

    table, day = "publish_by_snapshot", "2026-04-02"
    _land(settings, day)
    staged = ingest_date(day, settings, table=table)
    audit = validate_date(day, settings, table=table, publish=False)
    branch_head = load_table(table, settings).refs()[staged["branch"]].snapshot_id
    assert audit["snapshot_id"] == staged["snapshot_id"] == branch_head
    assert audit["published"] is False and load_table(table, settings).current_snapshot() is None

    # The branch moves past the audited snapshot (a re-ingest after the audit): refused.
    _land(settings, day, seed=4)
    moved = ingest_date(day, settings, table=table)
    with pytest.raises(InputError, match="moved past the audited snapshot"):
        publish_date(day, settings, table, snapshot_id=audit["snapshot_id"])
    assert load_table(table, settings).current_snapshot() is None

    # Audit the new snapshot, publish it: main is exactly it, the branch is gone.
    audit = validate_date(day, settings, table=table, publish=False)
    assert audit["snapshot_id"] == moved["snapshot_id"]
    done = publish_date(day, settings, table, snapshot_id=audit["snapshot_id"])
    assert done["status"] == "published" and done["snapshot_id"] == moved["snapshot_id"]
    ice = load_table(table, settings)
    assert ice.current_snapshot().snapshot_id == moved["snapshot_id"]
    assert staged["branch"] not in ice.refs()
    metadata_before = ice.metadata_location

    # A retry after the publish succeeded: a no-op success at the same snapshot, through the CLI too.
    again = publish_date(day, settings, table, snapshot_id=audit["snapshot_id"])
    assert again["already"] and again["status"] == "already published"
    assert again["snapshot_id"] == moved["snapshot_id"]
    proc = subprocess.run([sys.executable, "-m", "reqdedup.cli", "publish", "--date", day,
                           "--snapshot-id", str(audit["snapshot_id"]), "--table", table],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "already published"
    assert load_table(table, settings).metadata_location == metadata_before  # nothing committed
    # The superseded snapshot was never published and nothing is staged: a clear refusal (exit 2).
    proc = subprocess.run([sys.executable, "-m", "reqdedup.cli", "publish", "--date", day,
                           "--snapshot-id", str(staged["snapshot_id"]), "--table", table],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "nothing is staged" in proc.stderr, proc.stderr


def test_publish_commit_requires_the_branch_still_at_the_snapshot(settings, spark, monkeypatch):
    """The branch moves between publish's read and its commit (a concurrent re-ingest):
    the catalog commit fails as a whole (retryable), main does not move."""
    import reqdedup.lake.catalog as catalog

    table, day = "publish_race", "2026-04-03"
    _land(settings, day)
    first = ingest_date(day, settings, table=table)
    stale = load_table(table, settings)  # what publish reads, before the branch moves
    ingest_date(day, settings, table=table)
    monkeypatch.setattr(catalog, "load_table", lambda name, s=None: stale)
    with pytest.raises(RuntimeError, match="lost a race"):
        publish_date(day, settings, table, snapshot_id=first["snapshot_id"])
    monkeypatch.undo()
    assert load_table(table, settings).current_snapshot() is None


def test_publish_refuses_when_main_moved_since_staging(settings, spark):
    table, day1, day2 = "publish_main_moved", "2026-04-04", "2026-04-05"
    for d in (day1, day2):
        _land(settings, d)
    one = ingest_date(day1, settings, table=table)
    two = ingest_date(day2, settings, table=table)  # staged from the same (empty) main
    publish_date(day1, settings, table, snapshot_id=one["snapshot_id"])
    with pytest.raises(InputError, match="main of .* moved since it was staged"):
        publish_date(day2, settings, table, snapshot_id=two["snapshot_id"])
    with pytest.raises(InputError, match="nothing staged"):
        publish_date("2031-02-02", settings, table)
