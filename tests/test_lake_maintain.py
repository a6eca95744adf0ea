"""`reqdedup maintain` (issue 13 item 8): Iceberg's Spark procedures clean the lake, and
main reads the same rows in the same order afterwards. One table of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reqdedup.data.generator import GeneratorConfig, write_landing
from reqdedup.errors import InputError
from reqdedup.lake.catalog import load_table
from reqdedup.lake.ingest import ingest_date
from reqdedup.lake.maintain import drop_stale_branches, maintain
from reqdedup.lake.projection import projection_path
from reqdedup.lake.read import read_request_batches

TABLE = "maint_impressions"
DAY1, DAY2, DAY3 = "2026-05-01", "2026-05-02", "2026-05-03"
SMALL = dict(users=30, requests=60, candidates=6, history=8, items=300)


def _local(path: str) -> Path:
    return Path(path.removeprefix("file://").removeprefix("file:"))


def _files(settings, snapshot_id: int, day: str | None = None) -> set[str]:
    scan = load_table(TABLE, settings).scan(snapshot_id=snapshot_id,
                                            **({"row_filter": f"event_date = '{day}'"} if day else {}))
    return {t.file.file_path for t in scan.plan_files()}


def _read_main(settings) -> pa.Table:
    return pa.Table.from_batches(list(read_request_batches(DAY1, DAY2, batch_rows=64, table_name=TABLE,
                                                           settings=settings)))


def _request_order(rows: pa.Table) -> list:
    """Requests in read order, each with its set of candidates (no order inside a request)."""
    out: list = []
    for r, i in zip(rows.column("request_id").to_pylist(), rows.column("item_id").to_pylist()):
        if not out or out[-1][0] != r:
            out.append((r, set()))
        out[-1][1].add(i)
    return out


@pytest.mark.slow
def test_maintain_deletes_expired_files_and_keeps_main_rows_and_order(settings, spark):
    for day in (DAY1, DAY2, DAY3):
        write_landing(GeneratorConfig(date=day, seed=11, **SMALL), out_dir=settings.landing_dir)
    ingest_date(DAY1, settings, table=TABLE, publish=True, projections=True)
    ingest_date(DAY2, settings, table=TABLE, publish=True, projections=True)
    first_day1 = _files(settings, load_table(TABLE, settings).current_snapshot().snapshot_id, DAY1)
    again = ingest_date(DAY1, settings, table=TABLE, publish=True, projections=True)  # supersedes day 1's files
    quarantined = ingest_date(DAY3, settings, table=TABLE, projections=True)  # staged, never published
    staged_day3 = _files(settings, quarantined["snapshot_id"], DAY3)
    main_files = _files(settings, again["snapshot_id"])
    assert first_day1 and staged_day3 and not first_day1 & main_files
    assert all(_local(p).exists() for p in first_day1 | staged_day3)
    assert all(projection_path(settings, p).exists() for p in first_day1 | staged_day3 | main_files)
    before = _read_main(settings)

    # An orphan (a failed write's leftover) two days old, and a fresh one that must stay.
    data_dir = _local(next(iter(main_files))).parent
    old_orphan, new_orphan = data_dir / "orphan-old.parquet", data_dir / "orphan-new.parquet"
    for p in (old_orphan, new_orphan):
        pq.write_table(pa.table({"x": [1]}), p)
    two_days_ago = time.time() - 2 * 86400
    os.utime(old_orphan, (two_days_ago, two_days_ago))

    # A branch younger than the limit is kept.
    kept = drop_stale_branches(TABLE, 1, settings)
    assert kept["dropped"] == [] and [b["branch"] for b in kept["kept"]] == [quarantined["branch"]]

    result = maintain(tables=[TABLE], settings=settings, branch_max_age_days=0, older_than_days=0, retain_last=1,
                      orphan_older_than_days=1, rewrite_all=True)
    assert result["steps"] == ["branches", "rewrite", "expire", "orphans"]
    assert [b["branch"] for b in result["branches"][0]["dropped"]] == [quarantined["branch"]]
    rewrite = result["rewrite"][0]
    assert rewrite["sort_order"] == ["user_id", "request_id"] and rewrite["rewritten_data_files_count"] > 0
    ice = load_table(TABLE, settings)
    assert len(ice.metadata.snapshots) == 1 and result["expire"][0]["snapshots_left"] == 1
    assert quarantined["branch"] not in ice.refs()

    # The files of the expired snapshots (superseded day 1, the dropped branch's day 3,
    # main's pre-rewrite files) are gone from disk; the old orphan too, the fresh one not.
    for path in first_day1 | staged_day3 | main_files:
        assert not _local(path).exists(), path
        assert not projection_path(settings, path).exists(), path  # nor their request-level projections
    assert result["request_projections"]["removed"] == len(first_day1 | staged_day3 | main_files)
    current = _files(settings, ice.current_snapshot().snapshot_id)
    assert rewrite["request_projections"]["written"] == len(current)  # the rewritten files got theirs
    assert all(projection_path(settings, p).exists() for p in current)
    assert [Path(p).name for p in result["orphans"][0]["orphan_files"]] == [old_orphan.name]
    assert not old_orphan.exists() and new_orphan.exists()
    new_orphan.unlink()

    # main reads the same rows in the same request order, and each rewritten file is sorted.
    after = _read_main(settings)
    assert after.num_rows == before.num_rows
    assert _request_order(after) == _request_order(before)
    for path in _files(settings, ice.current_snapshot().snapshot_id):
        keys = pq.read_table(_local(path), columns=["user_id", "request_id"])
        pairs = list(zip(keys.column(0).to_pylist(), keys.column(1).to_pylist()))
        assert pairs == sorted(pairs), path

    # Idempotent: a second run changes nothing on main.
    snapshot = ice.current_snapshot().snapshot_id
    again = maintain(["branches", "expire", "orphans"], tables=[TABLE], settings=settings, branch_max_age_days=0,
                     older_than_days=0, retain_last=1, orphan_older_than_days=1)
    assert again["expire"][0]["expired_snapshot_ids"] == [] and again["orphans"][0]["orphan_files"] == []
    assert load_table(TABLE, settings).current_snapshot().snapshot_id == snapshot


def test_maintain_refuses_bad_parameters_before_touching_a_table(settings):
    with pytest.raises(InputError, match="orphan_older_than_days"):
        maintain(["orphans"], settings=settings, orphan_older_than_days=0.5)
    with pytest.raises(InputError, match="retain_last"):
        maintain(["expire"], settings=settings, retain_last=0)
    with pytest.raises(InputError, match="unknown step"):
        maintain(["vacuum"], settings=settings)
    with pytest.raises(InputError, match="no table .*no_such_table"):
        maintain(["branches"], tables=["no_such_table"], settings=settings)


def test_maintain_cli_exits_2_on_bad_input():
    proc = subprocess.run([sys.executable, "-m", "reqdedup.cli", "maintain", "orphans", "--orphan-older-than-days",
                           "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "orphan_older_than_days" in proc.stderr, proc.stderr


@pytest.mark.parametrize("steps", [[], ["all"], ["expire", "orphans"], ["vacuum"]])
def test_maintain_cli_steps_default_to_all_and_check_parameters_first(steps, capsys):
    from reqdedup.cli import main

    assert main(["maintain", *steps, "--orphan-older-than-days", "0", "--retain-last", "0"]) == 2
    err = capsys.readouterr().err
    assert "reqdedup maintain: error:" in err and ("retain_last" in err or "orphan_older_than_days" in err
                                                   or "unknown step(s) ['vacuum']" in err)


@pytest.mark.slow
def test_lake_maintenance_dag_runs_through_the_server(standalone, settings, spark):
    """The weekly DAG, triggered through the session's Airflow server on one table of its own:
    its four tasks succeed and the files of the superseded snapshot are gone from disk."""
    table, day = "dag_maint_impressions", "2026-05-10"
    write_landing(GeneratorConfig(date=day, seed=12, **SMALL), out_dir=settings.landing_dir)
    first = ingest_date(day, settings, table=table, publish=True)
    superseded = {t.file.file_path for t in load_table(table, settings).scan(snapshot_id=first["snapshot_id"]).plan_files()}
    ingest_date(day, settings, table=table, publish=True)
    rows = load_table(table, settings).scan().to_arrow().num_rows

    standalone.wait_for_dag("lake_maintenance")
    conf = {"tables": [table], "branch_max_age_days": 0, "expire_older_than_days": 0, "retain_last": 1,
            "rewrite_all": True}
    r = standalone.trigger("lake_maintenance", conf)
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    run = standalone.wait_for_run("lake_maintenance", run_id, timeout=1800)
    states = standalone.task_states("lake_maintenance", run_id)
    assert run["state"] == "success" and set(states.values()) == {"success"}, (
        states, "\n".join(standalone.task_log("lake_maintenance", run_id, t)[-3000:]
                          for t, s in states.items() if s != "success"))
    ice = load_table(table, settings)
    assert len(ice.metadata.snapshots) == 1 and ice.scan().to_arrow().num_rows == rows
    for path in superseded:
        assert not _local(path).exists(), path
