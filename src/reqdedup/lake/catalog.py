"""pyiceberg's view of the catalog Spark writes (same SQLite file, same catalog name)."""

from __future__ import annotations

from reqdedup.config import Settings, get_settings
from reqdedup.errors import InputError


def get_catalog(settings: Settings | None = None):
    from pyiceberg.catalog.sql import SqlCatalog

    settings = settings or get_settings()
    settings.warehouse_dir.mkdir(parents=True, exist_ok=True)
    return SqlCatalog(settings.catalog_name, uri=settings.catalog_uri, warehouse=settings.warehouse_uri)


def load_table(name: str, settings: Settings | None = None):
    """Load ``namespace.name`` or raise a clear error if it was never ingested."""
    from pyiceberg.exceptions import NoSuchTableError

    settings = settings or get_settings()
    try:
        return get_catalog(settings).load_table(settings.table(name))
    except NoSuchTableError:
        raise InputError(
            f"table {settings.table(name)} does not exist in catalog {settings.catalog_db}: run `reqdedup ingest` first"
        ) from None
