"""pyiceberg's view of the catalog Spark writes (same SQLite file, same catalog name)."""

from __future__ import annotations

from reqdedup.config import Settings, get_settings
from reqdedup.errors import InputError


def ensure_catalog_db(settings: Settings) -> None:
    """Create the catalog's SQLite file in WAL mode (persistent in the file).

    Several processes read and commit to this catalog (Airflow tasks, CLI subprocesses,
    Spark JVMs); in WAL mode a reader never blocks the writer, where SQLite's default
    rollback journal fails commits with SQLITE_BUSY while any reader is open. (Spark's own
    catalog-table check would pin a read transaction for the JVM's life: see spark_conf.)
    """
    import sqlite3

    if settings.catalog_on_server:
        return
    settings.catalog_db.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(settings.catalog_db, timeout=30)
    try:
        if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def get_catalog(settings: Settings | None = None):
    from pyiceberg.catalog.sql import SqlCatalog

    settings = settings or get_settings()
    settings.warehouse_dir.mkdir(parents=True, exist_ok=True)
    ensure_catalog_db(settings)
    return SqlCatalog(settings.catalog_name, uri=settings.catalog_uri, warehouse=settings.warehouse_uri)


def load_table(name: str, settings: Settings | None = None):
    """Load ``namespace.name`` or raise a clear error if it was never ingested."""
    from pyiceberg.exceptions import NoSuchTableError

    settings = settings or get_settings()
    try:
        return get_catalog(settings).load_table(settings.table(name))
    except NoSuchTableError:
        raise InputError(
            f"table {settings.table(name)} does not exist in catalog {settings.catalog_location}: run `reqdedup ingest` first"
        ) from None
