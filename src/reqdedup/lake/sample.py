"""User-stratified sampling of a date: whole users, so whole requests.

``reqdedup sample --rate R --date D [--cap N] [--seed S] [--strata K]``:

1. requests per user on D (main of the impressions);
2. K activity strata cut at the requests-per-user quantiles (ties merge strata, so heavy
   users always sit in the top one);
3. in every stratum exactly ``round(R * users)`` users, chosen by a seeded hash of the user
   id (deterministic, no collect): each stratum keeps its share of the population;
4. a sampled user with more than ``cap`` requests keeps ``cap`` of them, chosen by a seeded
   hash of the request id; a request is always kept or dropped whole;
5. rows are written to ``<namespace>.impressions_sample`` (same partitioning and sort as
   the impressions, one overwrite commit for the date) with ``sample_stratum`` and an
   inverse-probability ``sample_weight``; or, with ``write=False``, only the user ids are
   returned.
"""

from __future__ import annotations

import time

from reqdedup.config import Settings, get_settings
from reqdedup.contract import SORT_KEYS
from reqdedup.errors import InputError
from reqdedup.lake.tables import COMPRESSION_PROPERTIES, IMPRESSIONS, spark_columns_ddl

SAMPLE_TABLE = "impressions_sample"


def create_sample_sql(settings: Settings) -> list[str]:
    table = settings.spark_table(SAMPLE_TABLE)
    props = dict(COMPRESSION_PROPERTIES, **{"format-version": "2"})
    prop_sql = ", ".join(f"'{k}'='{v}'" for k, v in sorted(props.items()))
    return [
        f"CREATE TABLE IF NOT EXISTS {table} (\n  {spark_columns_ddl()},\n  sample_stratum INT NOT NULL,\n"
        f"  sample_weight DOUBLE NOT NULL\n) USING iceberg\n"
        f"PARTITIONED BY (event_date, bucket({settings.buckets}, user_id))\nTBLPROPERTIES ({prop_sql})",
        f"ALTER TABLE {table} WRITE ORDERED BY {', '.join(SORT_KEYS)}",
    ]


def strata_bounds(counts_df, strata: int) -> list[float]:
    """Distinct requests-per-user quantile cut points; stratum = number of bounds below."""
    if strata <= 1:
        return []
    probs = [i / strata for i in range(1, strata)]
    cuts = counts_df.approxQuantile("requests", probs, 0.001)
    return sorted(set(cuts))


def sample_date(date: str, rate: float, *, cap: int | None = None, seed: int = 0, strata: int = 4,
                settings: Settings | None = None, write: bool = True) -> dict:
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from reqdedup.lake.catalog import load_table
    from reqdedup.lake.ingest import parse_date
    from reqdedup.lake.spark import get_spark

    settings = settings or get_settings()
    day = parse_date(date)
    if not 0.0 < rate <= 1.0:
        raise InputError(f"--rate {rate} must be in (0, 1]")
    if cap is not None and cap < 1:
        raise InputError(f"--cap {cap} must be at least 1 request per user")
    if strata < 1:
        raise InputError(f"--strata {strata} must be at least 1")
    load_table(IMPRESSIONS, settings)
    spark = get_spark(settings)
    started = time.perf_counter()
    imp = spark.table(settings.spark_table(IMPRESSIONS)).where(F.col("event_date") == F.lit(day))
    # localCheckpoint, not cache(): a cached plan over an Iceberg table of the SQLite catalog
    # keeps a read lock that makes the later overwrite commit fail (SQLITE_BUSY).
    per_user = imp.groupBy("user_id").agg(F.countDistinct("request_id").alias("requests")).localCheckpoint()
    try:
        n_users = per_user.count()
        if n_users == 0:
            raise InputError(f"no published impressions for {date} in {settings.table(IMPRESSIONS)}: "
                             "run `reqdedup ingest` and `reqdedup validate` first")
        bounds = strata_bounds(per_user, strata)
        stratum = sum((F.col("requests") > F.lit(b)).cast("int") for b in bounds) if bounds else F.lit(0)
        w = Window.partitionBy("sample_stratum")
        ranked = (per_user.withColumn("sample_stratum", stratum.cast("int"))
                  .withColumn("stratum_users", F.count(F.lit(1)).over(w))
                  .withColumn("rank", F.row_number().over(
                      w.orderBy(F.xxhash64("user_id", F.lit(seed)), "user_id")))
                  .withColumn("take", F.round(F.col("stratum_users") * F.lit(rate)).cast("long")))
        users = ranked.where(F.col("rank") <= F.col("take")).withColumn(
            "user_weight", F.col("stratum_users") / F.col("take")).localCheckpoint()
        per_stratum = {
            r["sample_stratum"]: r.asDict()
            for r in ranked.groupBy("sample_stratum").agg(
                F.count(F.lit(1)).alias("users"), F.sum((F.col("rank") <= F.col("take")).cast("int")).alias("sampled"),
                F.sum("requests").alias("requests"), F.min("requests").alias("min_requests"),
                F.max("requests").alias("max_requests")).collect()
        }
        summary = {
            "date": date, "rate": rate, "cap": cap, "seed": seed, "strata_bounds": bounds,
            "users": n_users,
        }
        if not write:
            ids = sorted(r["user_id"] for r in users.select("user_id").collect())
            summary.update(users_sampled=len(ids), user_ids=ids)
        else:
            rows = imp.join(F.broadcast(users.select("user_id", "sample_stratum", "requests", "user_weight")),
                            "user_id")
            if cap is not None:
                rw = Window.partitionBy("user_id").orderBy(F.xxhash64("request_id", F.lit(seed)), "request_id")
                kept = (rows.select("user_id", "request_id").distinct()
                        .withColumn("request_rank", F.row_number().over(rw))
                        .where(F.col("request_rank") <= F.lit(cap)).drop("request_rank"))
                rows = rows.join(kept, ["user_id", "request_id"])
                kept_per_user = F.least(F.col("requests"), F.lit(cap))
            else:
                kept_per_user = F.col("requests")
            rows = rows.withColumn("sample_weight",
                                   (F.col("user_weight") * F.col("requests") / kept_per_user).cast("double"))
            from reqdedup.schema import IMPRESSIONS_SCHEMA

            for stmt in create_sample_sql(settings):
                spark.sql(stmt)
            out = rows.select(*[f.name for f in IMPRESSIONS_SCHEMA], "sample_stratum", "sample_weight")
            out.writeTo(settings.spark_table(SAMPLE_TABLE)).overwrite(F.col("event_date") == F.lit(day))
            written = spark.table(settings.spark_table(SAMPLE_TABLE)).where(F.col("event_date") == F.lit(day))
            got = written.groupBy("sample_stratum").agg(
                F.countDistinct("request_id").alias("requests"), F.count(F.lit(1)).alias("rows")).collect()
            for r in got:
                per_stratum[r["sample_stratum"]].update(requests_kept=r["requests"], rows_kept=r["rows"])
            summary.update(
                table=settings.spark_table(SAMPLE_TABLE),
                snapshot_id=load_table(SAMPLE_TABLE, settings).current_snapshot().snapshot_id,
                users_sampled=int(users.count()),
                capped_users=int(users.where(F.col("requests") > F.lit(cap)).count()) if cap else 0,
                requests_sampled=sum(r["requests"] for r in got),
                rows=sum(r["rows"] for r in got),
            )
        users.unpersist()
    finally:
        per_user.unpersist()
    summary["strata"] = [
        {**v, "share": round(v["sampled"] / v["users"], 4)} for _, v in sorted(per_stratum.items())
    ]
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary
