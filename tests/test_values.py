"""Bad values are refused before Spark writes anything (fast: pyarrow only, no Spark): NaN/inf
in dense features, ids outside the vocabularies or the item catalog, nulls in any
non-nullable column. Each error names the file, the date, the column and the check."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from reqdedup import contract
from reqdedup.data.generator import GeneratorConfig, generate_table
from reqdedup.errors import InputError
from reqdedup.lake.ingest import check_landing_file

DAY = "2026-02-03"
CFG = GeneratorConfig(users=20, requests=30, candidates=5, history=6, items=200, seed=2, date=DAY)


@pytest.fixture(scope="module")
def good() -> pa.Table:
    return generate_table(CFG)


def _with(table: pa.Table, name: str, values: pa.Array, nullable: bool = False) -> pa.Table:
    i = table.schema.get_field_index(name)
    field = table.schema.field(i).with_nullable(True) if nullable else table.schema.field(i)
    out = table.set_column(i, field, values)
    return out.replace_schema_metadata(table.schema.metadata)


def _set_first(col: pa.ChunkedArray, value) -> pa.Array:
    v = col.to_pylist()
    v[0] = value
    return pa.array(v, type=col.type)


def _set_in_list(col: pa.ChunkedArray, row: int, value) -> pa.Array:
    v = col.to_pylist()
    v[row] = [value] + v[row][1:]
    return pa.array(v, type=col.type)


def _first_nonempty(table, name):
    return next(i for i, h in enumerate(table.column(name).to_pylist()) if h)


CASES = [
    ("user_dense", lambda t: _with(t, "user_dense", _set_in_list(t.column("user_dense"), 0, float("nan"))),
     "finite"),
    ("item_dense", lambda t: _with(t, "item_dense", _set_in_list(t.column("item_dense"), 4, float("inf"))),
     "finite"),
    ("user_segment", lambda t: _with(t, "user_segment", _set_first(t.column("user_segment"), contract.NUM_SEGMENTS)),
     f"in [0, {contract.NUM_SEGMENTS})"),
    ("user_country", lambda t: _with(t, "user_country", _set_first(t.column("user_country"), -1)),
     f"in [0, {contract.NUM_COUNTRIES})"),
    ("item_category", lambda t: _with(t, "item_category", _set_first(t.column("item_category"), contract.NUM_CATEGORIES)),
     f"in [0, {contract.NUM_CATEGORIES})"),
    ("item_id", lambda t: _with(t, "item_id", _set_first(t.column("item_id"), CFG.items)), f"in [0, {CFG.items})"),
    ("user_history", lambda t: _with(t, "user_history", _set_in_list(t.column("user_history"),
                                                                     _first_nonempty(t, "user_history"), CFG.items)),
     f"in [0, {CFG.items})"),
    ("user_segment", lambda t: _with(t, "user_segment", _set_first(t.column("user_segment"), None), nullable=True),
     "not null"),
    ("position", lambda t: _with(t, "position", _set_first(t.column("position"), None), nullable=True), "not null"),
    ("user_history", lambda t: _with(t, "user_history", _set_in_list(t.column("user_history"),
                                                                     _first_nonempty(t, "user_history"), None)),
     "no null inside the list"),
]


@pytest.mark.parametrize("column,make,check", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_bad_value_is_refused_naming_file_date_column_and_check(tmp_path, good, column, make, check):
    path = tmp_path / "part-00000.parquet"
    pq.write_table(make(good), path)
    with pytest.raises(InputError) as err:
        check_landing_file(path, dt.date.fromisoformat(DAY))
    msg = str(err.value)
    assert str(path) in msg and DAY in msg and f"column {column!r}" in msg and check in msg, msg


def test_good_file_passes_and_carries_its_catalog_size(tmp_path, good):
    path = tmp_path / "part-00000.parquet"
    pq.write_table(good, path)
    assert check_landing_file(path, dt.date.fromisoformat(DAY)) == good.num_rows
    assert contract.items_from_metadata(pq.read_schema(path).metadata) == CFG.items


def test_file_without_catalog_size_needs_items(tmp_path, good):
    path = tmp_path / "part-00000.parquet"
    pq.write_table(good.replace_schema_metadata(None), path)
    with pytest.raises(InputError, match="no item catalog size.*--items"):
        check_landing_file(path, dt.date.fromisoformat(DAY))
    assert check_landing_file(path, dt.date.fromisoformat(DAY), items=CFG.items) == good.num_rows
    smaller = int(pc.max(good.column("item_id")).as_py())  # the largest id is then out of range
    with pytest.raises(InputError, match="column 'item_id'"):
        check_landing_file(path, dt.date.fromisoformat(DAY), items=smaller)
