"""Table definitions: the impressions table's DDL, partitioning, sort order, writer properties."""

from __future__ import annotations

from reqdedup.config import Settings
from reqdedup.contract import SORT_KEYS
from reqdedup.schema import IMPRESSIONS_SCHEMA

IMPRESSIONS = "impressions"

# Writer properties chosen by measurement (`reqdedup bench storage --sweep`, see README):
# zstd; a tiny dictionary budget so the history list falls back to plain encoding, whose
# repeated runs zstd folds far better than dictionary indices; 8 MiB pages so a page
# spans many identical user blocks.
COMPRESSION_PROPERTIES = {
    "write.parquet.compression-codec": "zstd",
    "write.parquet.dict-size-bytes": "1024",
    "write.parquet.page-size-bytes": str(8 * 1024 * 1024),
    "write.parquet.page-row-limit": "1000000",
}

# Alternatives measured by the sweep; the chosen one is COMPRESSION_PROPERTIES.
PROPERTY_CANDIDATES = {
    "iceberg_defaults": {"write.parquet.compression-codec": "zstd"},
    "dict_off": {"write.parquet.compression-codec": "zstd", "write.parquet.dict-size-bytes": "1024"},
    "dict_off_8mib_pages": COMPRESSION_PROPERTIES,
}

_SPARK_TYPES = {
    "int64": "BIGINT",
    "int32": "INT",
    
    "float": "FLOAT",
    "date32[day]": "DATE",
    "timestamp[us, tz=UTC]": "TIMESTAMP",
    "list<item: int32>": "ARRAY<INT>",
    "list<item: float>": "ARRAY<FLOAT>",
}


def spark_columns_ddl(schema=IMPRESSIONS_SCHEMA) -> str:
    cols = []
    for f in schema:
        sql_type = _SPARK_TYPES[str(f.type)]
        cols.append(f"{f.name} {sql_type}{'' if f.nullable else ' NOT NULL'}")
    return ",\n  ".join(cols)


def create_impressions_sql(settings: Settings, name: str = IMPRESSIONS, properties: dict | None = None,
                           sorted_table: bool = True) -> list[str]:
    """DDL for the impressions table: partitioned by date and bucket(user_id), declared sort order."""
    props = dict(properties or COMPRESSION_PROPERTIES)
    props.setdefault("format-version", "2")
    if not sorted_table:
        # Raw-log order baseline: rows kept in arrival order within each partition.
        props["write.distribution-mode"] = "none"
        props["write.spark.fanout.enabled"] = "true"
    prop_sql = ", ".join(f"'{k}'='{v}'" for k, v in sorted(props.items()))
    table = settings.spark_table(name)
    stmts = [
        f"CREATE TABLE IF NOT EXISTS {table} (\n  {spark_columns_ddl()}\n) USING iceberg\n"
        f"PARTITIONED BY (event_date, bucket({settings.buckets}, user_id))\n"
        f"TBLPROPERTIES ({prop_sql})"
    ]
    if sorted_table:
        stmts.append(f"ALTER TABLE {table} WRITE ORDERED BY {', '.join(SORT_KEYS)}")
    return stmts
