"""The data contract: one pure-Python module (reqdedup.contract) that every other module reads,
with no copies of its values left elsewhere."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reqdedup import contract
from reqdedup.errors import InputError

REPO = Path(__file__).resolve().parents[1]

# What a copy of a contract value looks like in code (definitions, not uses).
COPIES = {
    "request-id stride": r"10\s*\*\*\s*8\b",
    "dense dimension": r"^\s*(USER|ITEM)_DENSE_DIM\s*=\s*\d",
    "vocabulary size": r"^\s*N(UM)?_(SEGMENTS|COUNTRIES|CATEGORIES)\s*=\s*\d",
    "config name": r"^\s*(BASELINE|CANDIDATE)\s*=\s*[\"']",
    "sort keys": r"ORDERED BY user_id, request_id|SORT_KEYS\s*=\s*\(",
    "date pattern": r"DATE_PATTERN\s*=\s*r?[\"']",
    "date parser": r"date\.fromisoformat\(",
}


def _sources():
    for root in (REPO / "src" / "reqdedup", REPO / "dags"):
        for path in root.rglob("*.py"):
            if path.name != "contract.py":
                yield path


@pytest.mark.parametrize("what", sorted(COPIES))
def test_no_copies_of_the_contract(what):
    pattern = re.compile(COPIES[what], re.M)
    found = [f"{p.relative_to(REPO)}:{src[:m.start()].count(chr(10)) + 1}"
             for p in _sources() for src in [p.read_text()] for m in pattern.finditer(src)]
    assert not found, f"{what} spelled outside reqdedup.contract: {found}"


def test_contract_is_pure_python():
    code = ("import sys, reqdedup.contract; "
            "heavy = [m for m in ('pyarrow', 'numpy', 'torch', 'pandas', 'mlflow', 'pyspark') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_parse_date():
    assert contract.parse_date("2026-02-28") == dt.date(2026, 2, 28)
    assert contract.parse_date(dt.date(2026, 1, 1)) == dt.date(2026, 1, 1)
    assert contract.parse_date(dt.datetime(2026, 1, 1, 5)) == dt.date(2026, 1, 1)
    with pytest.raises(InputError, match="--date 'yesterday' is not a date of the form YYYY-MM-DD"):
        contract.parse_date("yesterday", "--date")
    with pytest.raises(InputError, match="not a calendar date"):
        contract.parse_date("2026-02-30")


def test_catalog_size_metadata_round_trip():
    from reqdedup.schema import IMPRESSIONS_SCHEMA, landing_schema

    schema = landing_schema(1234)
    assert schema.equals(IMPRESSIONS_SCHEMA) and contract.items_from_metadata(schema.metadata) == 1234
    assert contract.items_from_metadata(IMPRESSIONS_SCHEMA.metadata) is None
    with pytest.raises(InputError, match="reqdedup.items"):
        contract.items_from_metadata({contract.ITEMS_METADATA_KEY: b"zero"})
    with pytest.raises(InputError):
        landing_schema(0)
