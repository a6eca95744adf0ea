"""The request-log schema: one row per (request, candidate item).

This is the contract between the generator, the importer, the ingest job, the quality
suites and the training loader. User columns are identical on every row of a request: that
repetition is what request-sorted storage compresses and request-level dedup removes.
"""

from __future__ import annotations

import pyarrow as pa

from reqdedup.contract import ITEM_DENSE_DIM, SORT_KEYS, USER_DENSE_DIM, items_metadata

__all__ = ["IMPRESSIONS_SCHEMA", "ITEM_DENSE_DIM", "KEY_COLUMNS", "SORT_KEYS", "USER_DENSE_DIM", "landing_schema"]

# Keys and request context.
KEY_COLUMNS = ("request_id", "user_id")
# User block: the same on every candidate row of a request.
USER_COLUMNS = ("user_history", "user_dense", "user_segment", "user_country")
# Item block and outcome: differ per candidate.
ITEM_COLUMNS = ("item_id", "item_category", "item_dense", "position")
LABEL_COLUMN = "label"

IMPRESSIONS_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("request_ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("event_date", pa.date32(), nullable=False),
        pa.field("user_history", pa.list_(pa.int32()), nullable=False),
        pa.field("user_dense", pa.list_(pa.float32()), nullable=False),
        pa.field("user_segment", pa.int32(), nullable=False),
        pa.field("user_country", pa.int32(), nullable=False),
        pa.field("item_id", pa.int32(), nullable=False),
        pa.field("item_category", pa.int32(), nullable=False),
        pa.field("item_dense", pa.list_(pa.float32()), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
    ]
)


def landing_schema(items: int) -> pa.Schema:
    """IMPRESSIONS_SCHEMA with the item catalog size as metadata: what the generator and the
    importer write, and what ingest bounds item ids and history ids with."""
    return IMPRESSIONS_SCHEMA.with_metadata(items_metadata(items))
