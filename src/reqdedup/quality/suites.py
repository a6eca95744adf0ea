"""Great Expectations suites for one ingested date of the impressions table.

Four batches, each validated by its own suite, none of them collected into one pandas frame:

* ``schema``   one row per column (name, actual Spark type, expected type): pandas, tiny.
* ``rows``     the staged rows themselves, a Spark DataFrame: keys not null, id ranges,
               label values, (request_id, item_id) unique, label rate, row count = landed.
* ``requests`` a Spark aggregate, one row per request: users per request, distinct hashes of
               the user block (history + user features) per request, candidates vs the
               largest position, list lengths.
* ``files``    one row per data file, computed from each file's own row order (pyarrow,
               key columns only, streamed per row group): adjacent (user_id, request_id)
               pairs out of order.

Every expectation carries ``meta={"check": <name>, "hint": <what to do>}``; the runner
reports failures by that name, with sample keys taken from GX's unexpected index lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from reqdedup import contract
from reqdedup.schema import IMPRESSIONS_SCHEMA, ITEM_DENSE_DIM, USER_COLUMNS, USER_DENSE_DIM

DEFAULT_LABEL_RATE_BOUNDS = (0.005, 0.5)
# Every non-nullable column of the contract (not only the keys).
KEYS_NOT_NULL = tuple(f.name for f in IMPRESSIONS_SCHEMA if not f.nullable)
NON_NEGATIVE_IDS = ("request_id", "user_id", "item_id")

# Spark SQL simple strings of the contract's Arrow types.
_ARROW_TO_SPARK = {
    "int64": "bigint",
    "int32": "int",
    "date32[day]": "date",
    "timestamp[us, tz=UTC]": "timestamp",
    "list<item: int32>": "array<int>",
    "list<item: float>": "array<float>",
}

# Index columns GX reports for unexpected rows of each batch (the "sample keys").
INDEX_COLUMNS = {
    "schema": ["column"],
    "rows": ["request_id", "item_id"],
    "requests": ["request_id", "user_ids"],
    "files": ["file", "first_unsorted_row", "first_unsorted_key"],
}


@dataclass(frozen=True)
class SuiteParams:
    date: str
    rows_landed: int | None
    label_rate_min: float = DEFAULT_LABEL_RATE_BOUNDS[0]
    label_rate_max: float = DEFAULT_LABEL_RATE_BOUNDS[1]
    items: int | None = None  # the item catalog size (landing files' metadata); None: unknown -> refused


def expected_spark_types() -> dict[str, str]:
    return {f.name: _ARROW_TO_SPARK[str(f.type)] for f in IMPRESSIONS_SCHEMA}


def _meta(check: str, hint: str) -> dict:
    return {"check": check, "hint": hint}


def schema_expectations(params: SuiteParams) -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnPairValuesToBeEqual(
            column_A="actual_type", column_B="expected_type",
            description="Every contract column is present with its Spark type, and no extra column.",
            meta=_meta("schema", "the table's schema drifted from reqdedup.schema.IMPRESSIONS_SCHEMA: "
                                 "fix the producer or migrate the contract"),
        ),
    ]


def rows_expectations(params: SuiteParams) -> list:
    import great_expectations.expectations as gxe

    out = [
        gxe.ExpectTableColumnsToMatchOrderedList(
            column_list=[f.name for f in IMPRESSIONS_SCHEMA],
            description="Columns in contract order.",
            meta=_meta("columns_in_order", "the staged rows do not have the contract's columns"),
        )
    ]
    for col in KEYS_NOT_NULL:
        out.append(gxe.ExpectColumnValuesToNotBeNull(
            column=col, description=f"{col} is never null.",
            meta=_meta(f"not_null_{col}", f"rows with a null {col} cannot be keyed or trained on: "
                                          "drop or repair them at the source and re-ingest"),
        ))
    for col in NON_NEGATIVE_IDS:
        out.append(gxe.ExpectColumnValuesToBeBetween(
            column=col, min_value=0, description=f"{col} >= 0.",
            meta=_meta(f"non_negative_{col}", f"negative {col} values: the id mapping of the producer is broken"),
        ))
    for col, size in contract.VOCABULARIES.items():
        out.append(gxe.ExpectColumnValuesToBeBetween(
            column=col, min_value=0, max_value=size - 1, description=f"{col} in [0, {size}) (reqdedup.contract).",
            meta=_meta(f"vocabulary_{col}", f"{col} outside its vocabulary [0, {size}): the model's embedding "
                                            f"table has {size} rows; fix the producer's mapping"),
        ))
    # -1 can never hold: a date whose catalog size is unknown fails loudly instead of passing.
    top = params.items - 1 if params.items is not None else -1
    out.append(gxe.ExpectColumnValuesToBeBetween(
        column="item_id", min_value=0, max_value=top, description=f"item_id below the catalog size ({params.items}).",
        meta=_meta("item_id_in_catalog", "item ids at or above the catalog size (landing files' schema metadata "
                                         "reqdedup.items): the model's item table is that big"),
    ))
    out += [
        gxe.ExpectColumnValuesToBeInSet(
            column="label", value_set=[0, 1], description="label is 0 or 1.",
            meta=_meta("label_binary", "labels must be 0/1 engagement flags"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="position", min_value=0, description="position >= 0 (the upper bound is checked per request).",
            meta=_meta("position_non_negative", "negative ranking positions"),
        ),
        gxe.ExpectCompoundColumnsToBeUnique(
            column_list=["request_id", "item_id"],
            description="One row per (request, candidate item).",
            meta=_meta("request_item_unique", "duplicate candidate rows (a replayed log file?): "
                                              "dedupe the landing files and re-ingest"),
        ),
        gxe.ExpectColumnMeanToBeBetween(
            column="label", min_value=params.label_rate_min, max_value=params.label_rate_max,
            description=f"Label rate within [{params.label_rate_min}, {params.label_rate_max}].",
            meta=_meta("label_rate", "the engagement rate is outside the configured bounds "
                                     "(--label-rate-min/--label-rate-max): a logging outage or a label bug"),
        ),
    ]
    # -1 can never match: a date whose landing files are gone fails loudly instead of passing.
    landed = params.rows_landed if params.rows_landed is not None else -1
    out.append(gxe.ExpectTableRowCountToEqual(
        value=landed, description="The staged date holds exactly the rows that landed.",
        meta=_meta("row_count_matches_landing", "rows were lost or added between landing and the table: "
                                                "re-run `reqdedup ingest` for the date"),
    ))
    return out


def requests_expectations(params: SuiteParams) -> list:
    import great_expectations.expectations as gxe

    def exactly(col, value, check, desc, hint):
        return gxe.ExpectColumnValuesToBeBetween(column=col, min_value=value, max_value=value,
                                                 description=desc, meta=_meta(check, hint))

    return [
        exactly("n_users", 1, "one_user_per_request", "Every request belongs to exactly one user.",
                "a request_id is shared by several users (or has a null user): request ids must be unique per user"),
        exactly("n_user_blocks", 1, "user_block_identical",
                "Every row of a request carries identical user features and history "
                "(the invariant request-level dedup relies on).",
                "rows of one request disagree on user_history/user_dense/user_segment/user_country: "
                "the joiner that attaches user features must snapshot them once per request"),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="n_rows", column_B="max_position",
            description="position < K, the request's number of candidates.",
            meta=_meta("position_below_candidates", "a position is not below the number of candidates of its request"),
        ),
        exactly("nonfinite_dense", 0, "dense_finite", "No NaN or infinite value in user_dense or item_dense.",
                "NaN/inf dense features reach the loss and the metrics (a NaN recall compares false): "
                "fix the producer's feature computation"),
        gxe.ExpectColumnValuesToBeBetween(
            column="history_min", min_value=0, description="History ids >= 0.",
            meta=_meta("history_ids_non_negative", "negative item ids in user_history"),
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="history_max", max_value=(params.items - 1 if params.items is not None else -1),
            description=f"History ids below the catalog size ({params.items}).",
            meta=_meta("history_ids_in_catalog", "item ids in user_history at or above the catalog size"),
        ),
        exactly("user_dense_len_min", USER_DENSE_DIM, "user_dense_length_min",
                f"user_dense has {USER_DENSE_DIM} values on every row.",
                f"user_dense vectors must have {USER_DENSE_DIM} values (reqdedup.schema.USER_DENSE_DIM)"),
        exactly("user_dense_len_max", USER_DENSE_DIM, "user_dense_length_max",
                f"user_dense has {USER_DENSE_DIM} values on every row.",
                f"user_dense vectors must have {USER_DENSE_DIM} values (reqdedup.schema.USER_DENSE_DIM)"),
        exactly("item_dense_len_min", ITEM_DENSE_DIM, "item_dense_length_min",
                f"item_dense has {ITEM_DENSE_DIM} values on every row.",
                f"item_dense vectors must have {ITEM_DENSE_DIM} values (reqdedup.schema.ITEM_DENSE_DIM)"),
        exactly("item_dense_len_max", ITEM_DENSE_DIM, "item_dense_length_max",
                f"item_dense has {ITEM_DENSE_DIM} values on every row.",
                f"item_dense vectors must have {ITEM_DENSE_DIM} values (reqdedup.schema.ITEM_DENSE_DIM)"),
    ]


def files_expectations(params: SuiteParams) -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeBetween(
            column="unsorted_pairs", min_value=0, max_value=0,
            description="Rows are sorted by (user_id, request_id) within each data file.",
            meta=_meta("sorted_within_files", "a data file is not in (user_id, request_id) order, so user blocks "
                                              "do not compress and readers cannot cut whole requests: rewrite "
                                              "the date with `reqdedup ingest` (the writer sorts)"),
        ),
    ]


SUITES = {
    "schema": schema_expectations,
    "rows": rows_expectations,
    "requests": requests_expectations,
    "files": files_expectations,
}


# ---- the batches -------------------------------------------------------------------------
def schema_frame(spark_schema):
    """One row per column of the union of actual and expected columns."""
    import pandas as pd

    expected = expected_spark_types()
    actual = {f.name: f.dataType.simpleString() for f in spark_schema.fields}
    names = list(expected) + [n for n in actual if n not in expected]
    return pd.DataFrame({
        "column": names,
        "actual_type": [actual.get(n, "<missing>") for n in names],
        "expected_type": [expected.get(n, "<not in contract>") for n in names],
    })


def _nonfinite(column: str):
    """Spark: the number of NaN/inf values in an array<float> column, per row."""
    from pyspark.sql import functions as F

    return F.size(F.filter(column, lambda x: F.isnan(x) | (F.abs(x) == F.lit(float("inf")))))


def requests_frame(rows_df):
    """Spark aggregate, one row per request: what the request-level invariants need."""
    from pyspark.sql import functions as F

    user_block = F.xxhash64(*[F.col(c) for c in USER_COLUMNS])
    return rows_df.groupBy("request_id").agg(
        F.count(F.lit(1)).alias("n_rows"),
        F.countDistinct("user_id").alias("n_users"),
        F.array_sort(F.collect_set("user_id")).alias("user_ids"),
        F.countDistinct(user_block).alias("n_user_blocks"),
        F.max("position").alias("max_position"),
        F.sum(_nonfinite("user_dense") + _nonfinite("item_dense")).alias("nonfinite_dense"),
        F.min(F.array_min("user_history")).alias("history_min"),
        F.max(F.array_max("user_history")).alias("history_max"),
        F.min(F.size("user_dense")).alias("user_dense_len_min"),
        F.max(F.size("user_dense")).alias("user_dense_len_max"),
        F.min(F.size("item_dense")).alias("item_dense_len_min"),
        F.max(F.size("item_dense")).alias("item_dense_len_max"),
    )


def file_order(source, batch_rows: int = 65536) -> dict:
    """Sortedness of one Parquet data file (path or open file) in its own row order.

    Reads the key columns only, one batch at a time: memory is bounded by batch_rows.
    """
    import numpy as np
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(source)
    unsorted = 0
    first_row = -1
    first_key = ""
    prev = None
    offset = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=list(contract.SORT_KEYS)):
        u = batch.column(0).to_numpy(zero_copy_only=False)
        r = batch.column(1).to_numpy(zero_copy_only=False)
        if prev is not None:
            u = np.concatenate([[prev[0]], u])
            r = np.concatenate([[prev[1]], r])
        # pair i -> i+1 is out of order when (u, r)[i+1] < (u, r)[i]
        bad = (u[1:] < u[:-1]) | ((u[1:] == u[:-1]) & (r[1:] < r[:-1]))
        n_bad = int(bad.sum())
        if n_bad and first_row < 0:
            i = int(np.argmax(bad))
            row = offset + i + (0 if prev is not None else 1)
            first_row = row
            first_key = f"(user_id={u[i]}, request_id={r[i]}) before (user_id={u[i + 1]}, request_id={r[i + 1]})"
        unsorted += n_bad
        if len(u):
            prev = (u[-1], r[-1])
        offset += batch.num_rows
    return {"file": str(source), "rows": offset, "unsorted_pairs": unsorted,
            "first_unsorted_row": first_row, "first_unsorted_key": first_key}


def files_frame(paths: list[str], opener=None):
    """One row per data file; ``opener(path)`` opens a file of the table's FileIO."""
    import pandas as pd

    cols = ["file", "rows", "unsorted_pairs", "first_unsorted_row", "first_unsorted_key"]
    out = []
    for path in paths:
        if opener is None:
            rec = file_order(path)
        else:
            with opener(path) as fh:
                rec = file_order(fh)
        rec["file"] = path
        out.append(rec)
    return pd.DataFrame(out, columns=cols)
