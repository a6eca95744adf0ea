"""One settings object for the whole workflow.

Every location has an embedded default under one home folder, ``$REQDEDUP_HOME`` (default
``.reqdedup/`` at the repository root). Each field can be overridden by an environment
variable named ``REQDEDUP_<FIELD>`` (for example ``REQDEDUP_SPARK_MASTER=spark://host:7077``).
Nothing else in the code builds paths of its own: ask ``get_settings()``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# JVM jars Spark needs, fetched once by scripts/setup.sh from Maven Central.
ICEBERG_VERSION = "1.10.1"
SPARK_JARS = (
    f"org.apache.iceberg:iceberg-spark-runtime-3.5_2.12:{ICEBERG_VERSION}",
    "org.xerial:sqlite-jdbc:3.50.3.0",
    "org.postgresql:postgresql:42.7.14",  # a catalog on Postgres (catalog_server_jdbc_uri)
)


def _env(name: str, default: str) -> str:
    return os.environ.get(f"REQDEDUP_{name.upper()}", default)


@dataclass(frozen=True)
class Settings:
    home: Path
    landing_dir: Path
    warehouse_dir: Path
    catalog_db: Path
    catalog_name: str
    namespace: str
    jars_dir: Path
    spark_master: str
    spark_driver_memory: str
    spark_driver_host: str  # the address executors reach the driver at
    spark_driver_bind_address: str  # where the driver listens (127.0.0.1 unless a cluster needs more)
    spark_shuffle_partitions: int
    buckets: int
    read_source: str  # "iceberg" (the table's main branch) or "landing" (raw Parquet, sorted in memory)
    mlflow_tracking_uri: str
    mlflow_artifacts_dir: Path
    mlflow_experiment: str
    registered_model: str
    airflow_home: Path
    reports_dir: Path
    checkpoints_dir: Path
    # A Postgres catalog instead of catalog_db (see catalog_on_server); not in repr: credentials.
    catalog_server_uri: str = field(default="", repr=False)
    catalog_server_jdbc_uri: str = field(default="", repr=False)
    # Serving a crossing ranker: requests whose context (history K/V) an LRU keeps; 0 = off.
    serve_context_cache_requests: int = 0
    # Serving limits: a payload past one is refused (HTTP 400) with a message naming the limit.
    serve_max_requests_per_call: int = 1024
    serve_max_candidates_per_request: int = 1000
    serve_max_history: int = 4096
    extra: dict = field(default_factory=dict)

    # ---- derived names -------------------------------------------------------------
    @property
    def catalog_on_server(self) -> bool:
        """The catalog lives in a database server (Postgres), not in the SQLite file."""
        if bool(self.catalog_server_uri) != bool(self.catalog_server_jdbc_uri):
            from reqdedup.errors import InputError

            raise InputError("set both REQDEDUP_CATALOG_SERVER_URI (SQLAlchemy, for pyiceberg) and "
                             "REQDEDUP_CATALOG_SERVER_JDBC_URI (JDBC, for Spark) to the same database, or neither")
        return bool(self.catalog_server_uri)

    @property
    def catalog_uri(self) -> str:
        """SQLAlchemy URI of the catalog database, for pyiceberg's SqlCatalog."""
        return self.catalog_server_uri if self.catalog_on_server else f"sqlite:///{self.catalog_db}"

    @property
    def catalog_jdbc_uri(self) -> str:
        """JDBC URI of the same catalog database, for Spark's Iceberg JDBC catalog."""
        return self.catalog_server_jdbc_uri if self.catalog_on_server else f"jdbc:sqlite:{self.catalog_db}"

    @property
    def catalog_location(self) -> str:
        """Where the catalog is, for messages (never the server URI: it holds the password)."""
        if self.catalog_on_server:
            return "the catalog database of REQDEDUP_CATALOG_SERVER_URI"
        return str(self.catalog_db)

    @property
    def warehouse_uri(self) -> str:
        return self.warehouse_dir.resolve().as_uri()

    def table(self, name: str) -> str:
        """Fully qualified identifier ``namespace.name`` (pyiceberg form)."""
        return f"{self.namespace}.{name}"

    def spark_table(self, name: str) -> str:
        """``catalog.namespace.name`` (Spark SQL form)."""
        return f"{self.catalog_name}.{self.namespace}.{name}"

    def landing_path(self, date: str) -> Path:
        return self.landing_dir / f"date={date}"

    @property
    def spark_jar_paths(self) -> list[Path]:
        paths = []
        for coord in SPARK_JARS:
            _, artifact, version = coord.split(":")
            paths.append(self.jars_dir / f"{artifact}-{version}.jar")
        return paths

    def ensure_dirs(self) -> None:
        for p in (self.home, self.landing_dir, self.warehouse_dir, self.reports_dir,
                  self.checkpoints_dir, self.mlflow_artifacts_dir, self.airflow_home):
            p.mkdir(parents=True, exist_ok=True)

    def as_env(self) -> dict[str, str]:
        """These settings as REQDEDUP_* variables, for subprocesses (torchrun, airflow)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            out[f"REQDEDUP_{f.name.upper()}"] = str(getattr(self, f.name))
        return out


def _int_setting(name: str, default: str, minimum: int) -> int:
    raw = _env(name, default)
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        from reqdedup.errors import InputError

        raise InputError(f"setting {name} (REQDEDUP_{name.upper()}) must be an integer >= {minimum}, got {raw!r}")
    return value


def get_settings() -> Settings:
    """Settings from the environment, with embedded defaults under the home folder."""
    home = Path(_env("home", str(REPO_ROOT / ".reqdedup"))).expanduser().resolve()

    def path(name: str, default: Path) -> Path:
        return Path(_env(name, str(default))).expanduser().resolve()

    mlflow_db = home / "mlflow.db"
    return Settings(
        home=home,
        landing_dir=path("landing_dir", home / "landing"),
        warehouse_dir=path("warehouse_dir", home / "warehouse"),
        catalog_db=path("catalog_db", home / "catalog.db"),
        # Empty: the SQLite file above. Set both (they hold credentials: environment or a
        # git-ignored env file, never code) to keep the catalog in Postgres instead.
        catalog_server_uri=_env("catalog_server_uri", ""),
        catalog_server_jdbc_uri=_env("catalog_server_jdbc_uri", ""),
        catalog_name=_env("catalog_name", "reqdedup"),
        namespace=_env("namespace", "lake"),
        jars_dir=path("jars_dir", home / "jars"),
        spark_master=_env("spark_master", "local[2]"),
        spark_driver_memory=_env("spark_driver_memory", "4g"),
        spark_driver_host=_env("spark_driver_host", "127.0.0.1"),
        spark_driver_bind_address=_env("spark_driver_bind_address", "127.0.0.1"),
        spark_shuffle_partitions=int(_env("spark_shuffle_partitions", "8")),
        buckets=int(_env("buckets", "8")),
        read_source=_env("read_source", "iceberg"),
        mlflow_tracking_uri=_env("mlflow_tracking_uri", f"sqlite:///{mlflow_db}"),
        mlflow_artifacts_dir=path("mlflow_artifacts_dir", home / "mlartifacts"),
        mlflow_experiment=_env("mlflow_experiment", "reqdedup"),
        registered_model=_env("registered_model", "reqdedup"),
        airflow_home=path("airflow_home", home / "airflow"),
        reports_dir=path("reports_dir", home / "reports"),
        checkpoints_dir=path("checkpoints_dir", home / "checkpoints"),
        serve_context_cache_requests=_int_setting("serve_context_cache_requests", "0", minimum=0),
        serve_max_requests_per_call=_int_setting("serve_max_requests_per_call", "1024", minimum=1),
        serve_max_candidates_per_request=_int_setting("serve_max_candidates_per_request", "1000", minimum=1),
        serve_max_history=_int_setting("serve_max_history", "4096", minimum=0),
    )
