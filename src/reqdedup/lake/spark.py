"""Spark session wired to the Iceberg catalog that pyiceberg shares.

Spark's Iceberg JDBC catalog and pyiceberg's ``SqlCatalog`` point at the same SQLite file
under the same catalog name, so a table Spark writes is the table pyiceberg reads.
"""

from __future__ import annotations

import os

from reqdedup.config import Settings, get_settings


class MissingJarsError(RuntimeError):
    pass


def spark_conf(settings: Settings) -> dict[str, str]:
    """All Spark settings in one place (also used to document the deployment)."""
    cat = settings.catalog_name
    conf = {
        "spark.jars": ",".join(str(p) for p in settings.spark_jar_paths),
        "spark.sql.extensions": "org.apache.iceberg.spark.extensions.IcebergSparkSessionExtensions",
        f"spark.sql.catalog.{cat}": "org.apache.iceberg.spark.SparkCatalog",
        f"spark.sql.catalog.{cat}.type": "jdbc",
        f"spark.sql.catalog.{cat}.uri": settings.catalog_jdbc_uri,
        f"spark.sql.catalog.{cat}.warehouse": settings.warehouse_uri,
        # V1 adds the view column; pyiceberg's SqlCatalog reads the same table.
        f"spark.sql.catalog.{cat}.jdbc.schema-version": "V1",
        # Several processes commit to this catalog (Airflow tasks, CLI subprocesses): no
        # per-session table cache, or a session keeps reading a snapshot another published over.
        f"spark.sql.catalog.{cat}.cache-enabled": "false",
        # Iceberg's catalog-table check (JDBC getTables) leaves its ResultSet open: on SQLite
        # that pins a read transaction for the JVM's life, so the session reads a stale catalog
        # and its commits fail with SQLITE_BUSY_SNAPSHOT once another process has committed.
        # pyiceberg's SqlCatalog creates the tables before Spark starts (get_spark).
        f"spark.sql.catalog.{cat}.jdbc.init-catalog-tables": "false",
        "spark.sql.defaultCatalog": cat,
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": str(settings.spark_shuffle_partitions),
        "spark.driver.memory": settings.spark_driver_memory,
        "spark.driver.host": settings.spark_driver_host,
        "spark.driver.bindAddress": settings.spark_driver_bind_address,
        "spark.ui.enabled": "false",
        # Stage progress bars on a terminal; in logs (Airflow, CI) they are noise.
        "spark.ui.showConsoleProgress": str(os.sys.stderr.isatty()).lower(),
        # Storage-partitioned joins: bucket-aligned tables join without a shuffle.
        "spark.sql.sources.v2.bucketing.enabled": "true",
        "spark.sql.sources.v2.bucketing.pushPartValues.enabled": "true",
        "spark.sql.requireAllClusterKeysForCoPartition": "false",
        "spark.sql.iceberg.planning.preserve-data-grouping": "true",
    }
    if not settings.catalog_on_server:
        # Wait for a competing commit instead of failing at once (SQLite driver property).
        conf[f"spark.sql.catalog.{cat}.jdbc.busy_timeout"] = "30000"
    return conf


def get_spark(settings: Settings | None = None, app_name: str = "reqdedup"):
    """A (cached) SparkSession for the settings' master with the Iceberg catalog."""
    settings = settings or get_settings()
    missing = [str(p) for p in settings.spark_jar_paths if not p.exists()]
    if missing:
        raise MissingJarsError(
            f"Spark jars missing: {', '.join(missing)}. Run scripts/setup.sh (or set REQDEDUP_JARS_DIR)."
        )
    settings.warehouse_dir.mkdir(parents=True, exist_ok=True)
    from reqdedup.lake.catalog import get_catalog

    get_catalog(settings)  # WAL mode and the catalog tables, before the JVM's catalog opens
    os.environ.setdefault("PYSPARK_PYTHON", os.sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.master(settings.spark_master).appName(app_name)
    for key, value in spark_conf(settings).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    spark.sql(f"CREATE NAMESPACE IF NOT EXISTS {settings.catalog_name}.{settings.namespace}")
    return spark
