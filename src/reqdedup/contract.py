"""The data contract, in one pure-Python module (standard library only: the DAG files import
it at parse time, the generator, importer, schema, ingest, quality suites, training and
serving read it). Nothing else in the code spells these values.

- dimensions of the dense features, vocabulary sizes of the categorical ids;
- the request-id stride: ``request_id = days_since_epoch * REQUEST_ID_STRIDE + index``;
- the sort keys of the request-sorted storage;
- the names of the evaluation's configs (the baseline and the registered candidate);
- the item catalog size of a landing file (Parquet schema metadata ``reqdedup.items``),
  which bounds ``item_id`` and the ids in ``user_history``;
- the one date parser (``YYYY-MM-DD``, InputError naming what was parsed).
"""

from __future__ import annotations

import datetime as dt
import re

# ---- dimensions and vocabularies -----------------------------------------------------------
USER_DENSE_DIM = 8  # user_dense: 8 float32 per request
ITEM_DENSE_DIM = 4  # item_dense: 4 float32 per candidate
NUM_SEGMENTS = 16  # user_segment in [0, 16)
NUM_COUNTRIES = 64  # user_country in [0, 64)
NUM_CATEGORIES = 64  # item_category in [0, 64)
VOCABULARIES = {"user_segment": NUM_SEGMENTS, "user_country": NUM_COUNTRIES, "item_category": NUM_CATEGORIES}
DENSE_COLUMNS = {"user_dense": USER_DENSE_DIM, "item_dense": ITEM_DENSE_DIM}
# Columns bounded by the item catalog size (item ids; ids in the history list).
ITEM_ID_COLUMNS = ("item_id", "user_history")

# ---- ids and order -------------------------------------------------------------------------
EPOCH = dt.date(1970, 1, 1)
REQUEST_ID_STRIDE = 10**8  # request_id = days_since_epoch * 10**8 + index within the day
SORT_KEYS = ("user_id", "request_id")

# ---- catalog size in the landing files -----------------------------------------------------
ITEMS_METADATA_KEY = b"reqdedup.items"

# ---- names ---------------------------------------------------------------------------------
BASELINE_CONFIG = "iid"  # the evaluation's IID baseline
CANDIDATE_CONFIG = "sorted_fixed"  # request-sorted with the fixes: the config that is registered

DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}$"


def parse_date(value, what: str = "date") -> dt.date:
    """``YYYY-MM-DD`` (a ``datetime.date`` passes through, a datetime gives its date) or
    InputError naming ``what``."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    text = str(value) if value is not None else ""
    if not re.match(DATE_PATTERN, text):
        from reqdedup.errors import InputError

        raise InputError(f"{what} {value!r} is not a date of the form YYYY-MM-DD")
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        from reqdedup.errors import InputError

        raise InputError(f"{what} {value!r} is not a calendar date") from None


def items_metadata(items: int) -> dict[bytes, bytes]:
    """Schema metadata a landing file carries: its item catalog size."""
    if int(items) < 1:
        from reqdedup.errors import InputError

        raise InputError(f"the item catalog size must be >= 1, got {items}")
    return {ITEMS_METADATA_KEY: str(int(items)).encode()}


def items_from_metadata(metadata: dict | None) -> int | None:
    """The item catalog size of a landing file's schema metadata, None when absent."""
    raw = (metadata or {}).get(ITEMS_METADATA_KEY)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        from reqdedup.errors import InputError

        raise InputError(f"schema metadata {ITEMS_METADATA_KEY.decode()} = {raw!r} is not a catalog size >= 1")
    return value
