"""The docker-compose topology started for real, without Docker: `scripts/stack.sh up|status|down|env`.

One topology, two launchers. The services are the compose file's (``SERVICES``), started
as plain processes on 127.0.0.1 from what the set-up already installs plus Debian's
PostgreSQL 15:

- ``postgres``: a cluster under ``<stack>/postgres`` (initdb + pg_ctl, password auth, run as
  the ``postgres`` system user where we are root) with the databases of Airflow's metadata
  (``POSTGRES_DB``), MLflow and the Iceberg JDBC catalog;
- ``spark-master`` and ``spark-worker`` x ``spark_workers``: pyspark's own ``bin/spark-class``;
- ``airflow-init`` (one shot: ``airflow db migrate`` and the admin's password file), then
  ``airflow-apiserver``, ``airflow-scheduler``, ``airflow-dag-processor`` and
  ``airflow-triggerer`` as separate processes on the Postgres metadata DB (LocalExecutor);
- ``mlflow``: a tracking server on Postgres serving a local artifact root (--serve-artifacts).

Every service gets the environment variables its compose service gets (``service_env``): the
same REQDEDUP_* settings, the same AIRFLOW__* options, the same secrets (compose's ``.env``);
only values differ (127.0.0.1 and stack ports instead of service names, folders under the
stack dir instead of volumes). The few variables only a process launcher needs (bind
addresses and ports that compose maps instead) are ``LAUNCHER_ONLY``. Secrets are generated
at the first ``up`` into ``<stack>/secrets.env`` (mode 600), never in code. Variables
AIRFLOW__* already in the caller's environment override the stack's defaults.

The stack's own settings are environment variables ``REQDEDUP_STACK_<NAME>`` (``StackSettings``):
its folder, ports, worker count and size. ``up`` records each started process (PID and the
kernel's start time, so a recycled PID is never mistaken for it) in ``<stack>/pids.json``;
``down`` stops exactly those (each in its own session: TERM to its process group, KILL after a
grace period). Each long-running process other than PostgreSQL runs under ``supervise``, the
stack's form of compose's ``restart: unless-stopped`` (Airflow's components exit when their
database goes away). Logs: ``<stack>/logs``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from reqdedup.config import REPO_ROOT, Settings, get_settings
from reqdedup.errors import InputError

# compose service -> what the stack starts for it (spark-worker: spark_workers instances)
SERVICES = ("postgres", "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
            "airflow-triggerer", "mlflow", "spark-master", "spark-worker")
# start order of the long-running processes (airflow-init runs between mlflow and the api-server)
AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")
# compose's .env (see .env.example): the names of every secret and credential
SECRET_NAMES = ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW_ADMIN_PASSWORD",
                "MLFLOW_BACKEND_STORE_URI", "REQDEDUP_CATALOG_SERVER_URI", "REQDEDUP_CATALOG_SERVER_JDBC_URI")
# what only a process launcher sets (compose publishes container ports and names hosts instead)
LAUNCHER_ONLY = {
    "AIRFLOW__API__HOST", "AIRFLOW__API__PORT", "AIRFLOW__API__BASE_URL", "AIRFLOW__API__WORKERS",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST", "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT",
    "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT", "SPARK_HOME", "SPARK_LOCAL_IP", "SPARK_LOG_DIR", "SPARK_NO_DAEMONIZE",
    "SPARK_WORKER_DIR", "PATH", "REQDEDUP_STACK_ID", "PYSPARK_PYTHON",
}
DATABASES = ("mlflow", "iceberg")  # besides POSTGRES_DB (Airflow's), as compose's postgres-init


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StackSettings:
    dir: Path
    postgres_port: int = 15432
    spark_master_port: int = 7077
    spark_master_ui_port: int = 8090  # not 8080: that is Airflow's
    spark_worker_ui_port: int = 8091  # worker i (from 0) serves its UI on this + i
    spark_workers: int = 2
    spark_worker_cores: int = 1
    spark_worker_memory: str = "2g"
    airflow_port: int = 8080
    airflow_scheduler_health_port: int = 8974
    mlflow_port: int = 5000
    start_timeout_s: int = 300

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def data(self) -> Path:  # compose's `warehouse` volume
        return self.dir / "warehouse"

    @property
    def secrets_file(self) -> Path:
        return self.dir / "secrets.env"

    @property
    def pids_file(self) -> Path:
        return self.dir / "pids.json"

    @property
    def pgdata(self) -> Path:
        return self.dir / "postgres" / "data"

    @property
    def airflow_home(self) -> Path:
        return self.dir / "airflow"

    def ports(self) -> dict[str, int]:
        out = {"postgres": self.postgres_port, "spark-master": self.spark_master_port,
               "spark-master-ui": self.spark_master_ui_port, "airflow-apiserver": self.airflow_port,
               "airflow-scheduler-health": self.airflow_scheduler_health_port, "mlflow": self.mlflow_port}
        for i in range(self.spark_workers):
            out[f"spark-worker-{i + 1}-ui"] = self.spark_worker_ui_port + i
        return out


def stack_settings(settings: Settings | None = None) -> StackSettings:
    """From REQDEDUP_STACK_<NAME> variables; the folder defaults to <REQDEDUP_HOME>/stack."""
    settings = settings or get_settings()
    values: dict = {}
    for f in dataclasses.fields(StackSettings):
        raw = os.environ.get(f"REQDEDUP_STACK_{f.name.upper()}")
        if raw is None:
            continue
        if f.type in ("int", int):
            try:
                values[f.name] = int(raw)
            except ValueError:
                raise InputError(f"REQDEDUP_STACK_{f.name.upper()} must be an integer, got {raw!r}") from None
        elif f.name == "dir":
            values[f.name] = Path(raw).expanduser().resolve()
        else:
            values[f.name] = raw
    values.setdefault("dir", settings.home / "stack")
    st = StackSettings(**values)
    ports = st.ports()
    for name, port in ports.items():
        if not 1 <= port <= 65535:
            raise InputError(f"stack port {name} must be in 1..65535, got {port}")
    if len(set(ports.values())) != len(ports):
        raise InputError(f"stack ports collide: {ports}")
    if st.spark_workers < 1 or st.spark_worker_cores < 1:
        raise InputError("REQDEDUP_STACK_SPARK_WORKERS and _SPARK_WORKER_CORES must be >= 1")
    return st


# ---------------------------------------------------------------------------------------------
# secrets and environments
# ---------------------------------------------------------------------------------------------
def _read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v
    return out


def ensure_secrets(st: StackSettings) -> dict[str, str]:
    """The stack's secrets (generated once, kept in <stack>/secrets.env, mode 600); the URIs
    that carry them are rebuilt from the current ports at every call."""
    base = _read_env_file(st.secrets_file) if st.secrets_file.exists() else {}
    if not base.get("POSTGRES_PASSWORD"):
        from cryptography.fernet import Fernet

        base = {"POSTGRES_USER": "airflow", "POSTGRES_PASSWORD": secrets.token_urlsafe(24), "POSTGRES_DB": "airflow",
                "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
                "AIRFLOW_ADMIN_PASSWORD": secrets.token_urlsafe(16)}
    user, pw, port = base["POSTGRES_USER"], base["POSTGRES_PASSWORD"], st.postgres_port
    sa = f"postgresql+psycopg2://{user}:{pw}@127.0.0.1:{port}"
    full = {k: base[k] for k in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "AIRFLOW__CORE__FERNET_KEY",
                                 "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW_ADMIN_PASSWORD")}
    full.update({
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"{sa}/{base['POSTGRES_DB']}",
        "MLFLOW_BACKEND_STORE_URI": f"{sa}/mlflow",
        "REQDEDUP_CATALOG_SERVER_URI": f"{sa}/iceberg",
        "REQDEDUP_CATALOG_SERVER_JDBC_URI": f"jdbc:postgresql://127.0.0.1:{port}/iceberg?user={user}&password={pw}",
    })
    assert set(full) == set(SECRET_NAMES)
    st.dir.mkdir(parents=True, exist_ok=True)
    tmp = st.secrets_file.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("# generated by scripts/stack.sh up; compose's .env for this stack. Keep private.\n")
        fh.writelines(f"{k}={v}\n" for k, v in full.items())
    os.chmod(tmp, 0o600)
    os.replace(tmp, st.secrets_file)
    return full


def reqdedup_env(st: StackSettings, settings: Settings) -> dict[str, str]:
    """compose's x-reqdedup-env for this stack: the same names, stack folders and addresses."""
    d = st.data
    return {
        "REQDEDUP_HOME": str(d / "home"),
        "REQDEDUP_LANDING_DIR": str(d / "landing"),
        "REQDEDUP_WAREHOUSE_DIR": str(d / "iceberg"),
        "REQDEDUP_CATALOG_NAME": settings.catalog_name,
        "REQDEDUP_NAMESPACE": settings.namespace,
        "REQDEDUP_JARS_DIR": str(settings.jars_dir),
        "REQDEDUP_SPARK_MASTER": f"spark://127.0.0.1:{st.spark_master_port}",
        "REQDEDUP_SPARK_DRIVER_MEMORY": settings.spark_driver_memory,
        "REQDEDUP_SPARK_DRIVER_HOST": "127.0.0.1",
        "REQDEDUP_SPARK_DRIVER_BIND_ADDRESS": "127.0.0.1",
        "REQDEDUP_SPARK_SHUFFLE_PARTITIONS": str(settings.spark_shuffle_partitions),
        "REQDEDUP_BUCKETS": str(settings.buckets),
        "REQDEDUP_READ_SOURCE": settings.read_source,
        "REQDEDUP_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{st.mlflow_port}",
        "REQDEDUP_MLFLOW_ARTIFACTS_DIR": str(d / "mlartifacts"),
        "REQDEDUP_MLFLOW_EXPERIMENT": settings.mlflow_experiment,
        "REQDEDUP_REGISTERED_MODEL": settings.registered_model,
        "REQDEDUP_AIRFLOW_HOME": str(st.airflow_home),
        "REQDEDUP_REPORTS_DIR": str(d / "reports"),
        "REQDEDUP_CHECKPOINTS_DIR": str(d / "checkpoints"),
        "REQDEDUP_SERVE_CONTEXT_CACHE_REQUESTS": str(settings.serve_context_cache_requests),
        "REQDEDUP_SERVE_MAX_REQUESTS_PER_CALL": str(settings.serve_max_requests_per_call),
        "REQDEDUP_SERVE_MAX_CANDIDATES_PER_REQUEST": str(settings.serve_max_candidates_per_request),
        "REQDEDUP_SERVE_MAX_HISTORY": str(settings.serve_max_history),
    }


def _airflow_env(st: StackSettings, settings: Settings) -> dict[str, str]:
    url = f"http://127.0.0.1:{st.airflow_port}"
    env = {
        **reqdedup_env(st, settings),
        "AIRFLOW_HOME": str(st.airflow_home),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",  # 2 cores here; compose says 4
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(st.airflow_home / "auth" / "passwords.json"),
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "true",
        # launcher only
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(st.airflow_port),
        "AIRFLOW__API__BASE_URL": url,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": "127.0.0.1",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(st.airflow_scheduler_health_port),
        # task processes call the execution API; 5 s (the default) is short on a busy 2-core box
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
    }
    # the caller's AIRFLOW__* options win (e.g. AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE=False in tests)
    env.update({k: v for k, v in os.environ.items() if k.startswith("AIRFLOW__") and k not in SECRET_NAMES})
    return env


def _spark_env(st: StackSettings, settings: Settings) -> dict[str, str]:
    import pyspark

    return {**reqdedup_env(st, settings), "SPARK_HOME": str(Path(pyspark.__file__).parent),
            "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOG_DIR": str(st.logs), "SPARK_NO_DAEMONIZE": "1",
            "PYSPARK_PYTHON": sys.executable}


def service_env(service: str, st: StackSettings, settings: Settings, secret: dict[str, str]) -> dict[str, str]:
    """The variables (beyond the inherited environment) a service gets; the same names as its
    compose service (environment + env_file), plus LAUNCHER_ONLY ones."""
    common = {"REQDEDUP_STACK_ID": str(st.dir), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if service == "postgres":
        return {**common, **secret}
    if service.startswith("airflow-"):
        return {**common, **_airflow_env(st, settings), **secret}
    if service == "mlflow":
        return {**common, **secret, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if service.startswith("spark-"):
        return {**common, **_spark_env(st, settings)}
    raise KeyError(service)


def client_env(settings: Settings | None = None) -> dict[str, str]:
    """What a client (a `reqdedup` command, a test) sets to use the stack: the services'
    REQDEDUP_* settings with the catalog on Postgres."""
    settings = settings or get_settings()
    st = stack_settings(settings)
    if not st.secrets_file.exists():
        raise InputError(f"no stack at {st.dir} (no {st.secrets_file}): run scripts/stack.sh up first")
    secret = _read_env_file(st.secrets_file)
    return {**reqdedup_env(st, settings), "REQDEDUP_CATALOG_SERVER_URI": secret["REQDEDUP_CATALOG_SERVER_URI"],
            "REQDEDUP_CATALOG_SERVER_JDBC_URI": secret["REQDEDUP_CATALOG_SERVER_JDBC_URI"]}


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------
def _proc_start_time(pid: int) -> int | None:
    """The kernel's start time of a PID (clock ticks since boot), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie is gone
        return None
    return int(fields[19])


def _alive(rec: dict) -> bool:
    return rec.get("pid") is not None and _proc_start_time(rec["pid"]) == rec.get("start")


def _load_pids(st: StackSettings) -> dict:
    return json.loads(st.pids_file.read_text()) if st.pids_file.exists() else {}


def _save_pids(st: StackSettings, pids: dict) -> None:
    tmp = st.pids_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(pids, indent=2))
    os.replace(tmp, st.pids_file)


def _as_root() -> bool:
    return os.geteuid() == 0


def _pg_bin(name: str) -> str:
    cand = Path("/usr/lib/postgresql/15/bin") / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"PostgreSQL 15 server binaries not found ({name}): apt-get install -y postgresql-15 "
                           f"(scripts/stack.sh up does it where it runs as root)")
    return found


def _pg_run(args: list[str], st: StackSettings | None = None, **kw) -> subprocess.CompletedProcess:
    """pg_ctl & co. as the postgres user; the server inherits the stack's marker variable."""
    as_user = ["runuser", "-u", "postgres", "--"] if _as_root() else []
    env = {**os.environ, **({"REQDEDUP_STACK_ID": str(st.dir)} if st else {})}
    return subprocess.run([*as_user, *args], capture_output=True, text=True, env=env, **kw)


def _http(url: str, timeout: float = 5.0):
    """(status, body) of a GET, (None, error) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return None, str(e)


def _wait(what: str, check, timeout: float, log: Path | None = None, rec: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        ok, last = check()
        if ok:
            return
        if rec is not None and not _alive(rec):
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log and log.exists() else ""
            raise RuntimeError(f"stack: {what} exited while starting (log {log}):\n{tail}")
        time.sleep(1)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log and log.exists() else ""
    raise RuntimeError(f"stack: {what} not healthy after {timeout:.0f} s ({last}); log {log}:\n{tail}")


def supervise(cmd: list[str], min_uptime_s: float = 60.0, max_backoff_s: float = 30.0) -> int:
    """compose's ``restart: unless-stopped`` for one process: run ``cmd``, start it again
    whenever it exits (1 s, 2 s, ... up to ``max_backoff_s`` between starts, reset after a run
    of ``min_uptime_s``), until this supervisor gets TERM/INT (which it passes on). Airflow's
    components exit when their database goes away and expect to be restarted."""
    stopping = {"sig": None}
    child: dict = {"proc": None}

    def on_signal(sig, _frame):
        stopping["sig"] = sig
        if child["proc"] is not None and child["proc"].poll() is None:
            child["proc"].send_signal(sig)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    backoff = 1.0
    while True:
        started = time.monotonic()
        child["proc"] = subprocess.Popen(cmd)
        rc = child["proc"].wait()
        if stopping["sig"] is not None:
            return rc
        if time.monotonic() - started >= min_uptime_s:
            backoff = 1.0
        print(f"[stack supervisor] {cmd[0]} exited with {rc}; starting it again in {backoff:.0f} s", flush=True)
        deadline = time.monotonic() + backoff
        while time.monotonic() < deadline:
            if stopping["sig"] is not None:
                return rc
            time.sleep(0.2)
        backoff = min(backoff * 2, max_backoff_s)


def _spawn(name: str, cmd: list[str], env: dict, st: StackSettings, pids: dict, url: str | None = None,
           restart: bool = True) -> dict:
    log = st.logs / f"{name}.log"
    fh = open(log, "ab")
    if restart:  # under a supervisor in the same session: down's TERM to the group reaches both
        cmd = [sys.executable, "-m", "reqdedup.stack", "supervise", "--", *cmd]
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=st.dir, start_new_session=True)
    fh.close()
    rec = {"pid": proc.pid, "start": _proc_start_time(proc.pid), "cmd": cmd, "log": str(log), "url": url,
           "group": True, "started_at": time.time()}
    pids[name] = rec
    _save_pids(st, pids)
    return rec


# ---- health checks: (ok, detail) -------------------------------------------------------------
def _pg_health(st: StackSettings):
    r = subprocess.run([_pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(st.postgres_port)],
                       capture_output=True, text=True)
    return r.returncode == 0, r.stdout.strip()


def _json_health(url: str, key=None):
    status, body = _http(url)
    if status != 200:
        return False, f"{url}: {status} {body[:200]}"
    try:
        data = json.loads(body)
    except ValueError:
        return False, f"{url}: not JSON"
    return (key(data) if key else True), data


def _health(name: str, st: StackSettings):
    if name == "postgres":
        return _pg_health(st)
    if name == "spark-master":
        return _json_health(f"http://127.0.0.1:{st.spark_master_ui_port}/json/", lambda d: d.get("status") == "ALIVE")
    if name.startswith("spark-worker-"):
        i = int(name.rsplit("-", 1)[1]) - 1
        ok, d = _json_health(f"http://127.0.0.1:{st.spark_master_ui_port}/json/")
        if not ok:
            return False, d
        port = st.spark_worker_ui_port + i
        alive = [w for w in d.get("workers", []) if w.get("state") == "ALIVE" and w.get("webuiaddress", "").endswith(f":{port}")]
        return bool(alive), f"{len(alive)} ALIVE worker(s) with UI port {port} on the master"
    if name == "mlflow":
        status, body = _http(f"http://127.0.0.1:{st.mlflow_port}/health")
        return status == 200, body[:100]
    if name == "airflow-scheduler":
        status, body = _http(f"http://127.0.0.1:{st.airflow_scheduler_health_port}/health")
        return status == 200, body[:200]
    if name.startswith("airflow-"):
        ok, d = _json_health(f"http://127.0.0.1:{st.airflow_port}/api/v2/monitor/health")
        if not ok:
            return False, d
        if name == "airflow-apiserver":
            return d.get("metadatabase", {}).get("status") == "healthy", d
        key = {"airflow-dag-processor": "dag_processor", "airflow-triggerer": "triggerer"}[name]
        return (d.get(key) or {}).get("status") == "healthy", d.get(key)
    raise KeyError(name)


def _url(name: str, st: StackSettings) -> str | None:
    if name == "postgres":
        return f"postgresql://127.0.0.1:{st.postgres_port}"
    if name == "spark-master":
        return f"spark://127.0.0.1:{st.spark_master_port} (UI http://127.0.0.1:{st.spark_master_ui_port})"
    if name.startswith("spark-worker-"):
        return f"http://127.0.0.1:{st.spark_worker_ui_port + int(name.rsplit('-', 1)[1]) - 1}"
    if name == "mlflow":
        return f"http://127.0.0.1:{st.mlflow_port}"
    if name == "airflow-apiserver":
        return f"http://127.0.0.1:{st.airflow_port}"
    if name == "airflow-scheduler":
        return f"http://127.0.0.1:{st.airflow_scheduler_health_port}/health"
    return None


def process_names(st: StackSettings) -> list[str]:
    """The long-running processes in start order."""
    return ["postgres", "spark-master", *[f"spark-worker-{i + 1}" for i in range(st.spark_workers)], "mlflow",
            *AIRFLOW_SERVICES]


# ---- postgres ----------------------------------------------------------------------------------
def _postgres_pid(st: StackSettings) -> int | None:
    try:
        return int((st.pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def start_postgres(st: StackSettings, secret: dict, pids: dict) -> None:
    sock_dir = st.dir / "postgres"
    sock_dir.mkdir(parents=True, exist_ok=True)
    if _as_root():
        # the server runs as 'postgres': it must be able to reach its folder
        p = st.dir
        while p != p.parent:
            if not os.access(p, os.X_OK) or (p.stat().st_mode & 0o001) == 0:
                raise RuntimeError(f"stack dir {st.dir}: {p} is not searchable by the postgres user "
                                   f"(chmod o+x it, or set REQDEDUP_STACK_DIR elsewhere)")
            p = p.parent
        shutil.chown(sock_dir, user="postgres")
    log = st.logs / "postgres.log"
    if not (st.pgdata / "PG_VERSION").exists():
        if st.pgdata.exists():
            shutil.rmtree(st.pgdata)  # a half-made cluster of an interrupted `up`
        pwfile = sock_dir / "initdb.pw"
        pwfile.write_text(secret["POSTGRES_PASSWORD"] + "\n")
        os.chmod(pwfile, 0o600)
        if _as_root():
            shutil.chown(pwfile, user="postgres")
        try:
            r = _pg_run([_pg_bin("initdb"), "-D", str(st.pgdata), "-U", secret["POSTGRES_USER"], "--auth=scram-sha-256",
                         f"--pwfile={pwfile}", "-E", "UTF8"])
        finally:
            pwfile.unlink(missing_ok=True)
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    if _as_root():
        for f in (log,):
            f.touch()
            shutil.chown(f, user="postgres")
    rec = pids.get("postgres")
    if not (rec and _alive(rec)):
        r = _pg_run([_pg_bin("pg_ctl"), "-D", str(st.pgdata), "-l", str(log), "-w", "-t", "120", "start",
                     "-o", f"-h 127.0.0.1 -p {st.postgres_port} -k {sock_dir}"], st)
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {r.stdout[-1000:]}{r.stderr[-1000:]}; log {log}")
        pid = _postgres_pid(st)
        pids["postgres"] = {"pid": pid, "start": _proc_start_time(pid), "cmd": ["pg_ctl", "start", str(st.pgdata)],
                            "log": str(log), "url": _url("postgres", st), "group": False, "started_at": time.time()}
        _save_pids(st, pids)
    _wait("postgres", lambda: _pg_health(st), st.start_timeout_s, log)
    import psycopg2

    con = psycopg2.connect(host="127.0.0.1", port=st.postgres_port, user=secret["POSTGRES_USER"],
                           password=secret["POSTGRES_PASSWORD"], dbname="postgres")
    con.autocommit = True
    cur = con.cursor()
    for db in (secret["POSTGRES_DB"], *DATABASES):
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
        if cur.fetchone() is None:
            cur.execute(f'CREATE DATABASE "{db}"')
    con.close()


def restart_postgres(settings: Settings | None = None) -> dict:
    """Restart the stack's PostgreSQL (fast shutdown, then start): what a fault test does to
    a DAG run in flight. Returns the new record."""
    settings = settings or get_settings()
    st = stack_settings(settings)
    pids = _load_pids(st)
    # -l: the new server's output goes to the log, not to this pipe (which would stay open)
    r = _pg_run([_pg_bin("pg_ctl"), "-D", str(st.pgdata), "-l", str(st.logs / "postgres.log"), "-m", "fast", "-w",
                 "-t", "120", "restart", "-o", f"-h 127.0.0.1 -p {st.postgres_port} -k {st.dir / 'postgres'}"],
                st, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"pg_ctl restart failed: {r.stdout[-1000:]}{r.stderr[-1000:]}")
    pid = _postgres_pid(st)
    pids["postgres"] = {**pids.get("postgres", {}), "pid": pid, "start": _proc_start_time(pid), "started_at": time.time()}
    _save_pids(st, pids)
    return pids["postgres"]


# ---------------------------------------------------------------------------------------------
# up / status / down
# ---------------------------------------------------------------------------------------------
def _say(msg: str, t0: float) -> None:
    print(f"[stack {time.monotonic() - t0:5.1f}s] {msg}", file=sys.stderr, flush=True)


def up(settings: Settings | None = None) -> dict:
    """Start whatever of the stack is not running (idempotent); returns the status."""
    settings = settings or get_settings()
    st = stack_settings(settings)
    t0 = time.monotonic()
    for p in (st.dir, st.logs, st.airflow_home / "auth", *[st.data / n for n in
              ("home", "landing", "iceberg", "mlartifacts", "reports", "checkpoints")]):
        p.mkdir(parents=True, exist_ok=True)
    missing = [str(p) for p in settings.spark_jar_paths if not p.exists()]
    if missing:
        raise RuntimeError(f"Spark jars missing: {', '.join(missing)}: run scripts/setup.sh first")
    secret = ensure_secrets(st)
    pids = _load_pids(st)
    venv = Path(sys.executable).parent

    def running(name):
        return name in pids and _alive(pids[name])

    start_postgres(st, secret, pids)
    _say(f"postgres on 127.0.0.1:{st.postgres_port} (databases {secret['POSTGRES_DB']}, {', '.join(DATABASES)})", t0)

    spark_class = str(Path(_spark_env(st, settings)["SPARK_HOME"]) / "bin" / "spark-class")
    if not running("spark-master"):
        rec = _spawn("spark-master", [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                      "--port", str(st.spark_master_port), "--webui-port", str(st.spark_master_ui_port)],
                     service_env("spark-master", st, settings, secret), st, pids, _url("spark-master", st))
        _wait("spark-master", lambda: _health("spark-master", st), st.start_timeout_s, Path(rec["log"]), rec)
    for i in range(st.spark_workers):
        name = f"spark-worker-{i + 1}"
        if running(name):
            continue
        work = st.dir / "spark" / name
        work.mkdir(parents=True, exist_ok=True)
        env = {**service_env("spark-worker", st, settings, secret), "SPARK_WORKER_DIR": str(work)}
        rec = _spawn(name, [spark_class, "org.apache.spark.deploy.worker.Worker",
                            f"spark://127.0.0.1:{st.spark_master_port}", "--host", "127.0.0.1",
                            "--webui-port", str(st.spark_worker_ui_port + i), "--cores", str(st.spark_worker_cores),
                            "--memory", st.spark_worker_memory, "--work-dir", str(work)],
                     env, st, pids, _url(name, st))
        _wait(name, lambda n=name: _health(n, st), st.start_timeout_s, Path(rec["log"]), rec)
    _say(f"spark master spark://127.0.0.1:{st.spark_master_port} + {st.spark_workers} workers", t0)

    if not running("mlflow"):
        hosts = f"127.0.0.1,127.0.0.1:{st.mlflow_port},localhost,localhost:{st.mlflow_port}"
        # the backend URI (it holds the password) comes from MLFLOW_BACKEND_STORE_URI in the
        # environment, not the command line that `ps` shows
        rec = _spawn("mlflow", [str(venv / "mlflow"), "server", "--artifacts-destination", str(st.data / "mlartifacts"), "--serve-artifacts",
                                "--host", "127.0.0.1", "--port", str(st.mlflow_port), "--workers", "1",
                                "--allowed-hosts", hosts],
                     service_env("mlflow", st, settings, secret), st, pids, _url("mlflow", st))
        _wait("mlflow", lambda: _health("mlflow", st), st.start_timeout_s, Path(rec["log"]), rec)
    _say(f"mlflow http://127.0.0.1:{st.mlflow_port}", t0)

    if not all(running(n) for n in AIRFLOW_SERVICES):
        # airflow-init: migrate the metadata DB, write the admin's password (idempotent)
        env = {**os.environ, **service_env("airflow-init", st, settings, secret)}
        pw_file = Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
        fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"admin": secret["AIRFLOW_ADMIN_PASSWORD"]}, fh)
        with open(st.logs / "airflow-init.log", "ab") as fh:
            r = subprocess.run([str(venv / "airflow"), "db", "migrate"], env=env, stdout=fh, stderr=subprocess.STDOUT,
                               cwd=st.dir)
        if r.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed (log {st.logs / 'airflow-init.log'})")
        _say("airflow-init: metadata DB migrated", t0)
    commands = {"airflow-apiserver": ["api-server", "--host", "127.0.0.1", "--port", str(st.airflow_port)],
                # no log server (it binds every interface): the api-server reads the task logs from
                # the same disk, as LocalExecutor writes them
                "airflow-scheduler": ["scheduler", "--skip-serve-logs"], "airflow-dag-processor": ["dag-processor"],
                "airflow-triggerer": ["triggerer", "--skip-serve-logs"]}
    started = []
    for name in AIRFLOW_SERVICES:
        if not running(name):
            started.append(_spawn(name, [str(venv / "airflow"), *commands[name]],
                                  service_env(name, st, settings, secret), st, pids, _url(name, st)))
            started[-1]["name"] = name
    for rec in started:
        _wait(rec["name"], lambda n=rec["name"]: _health(n, st), st.start_timeout_s, Path(rec["log"]), rec)
    _say(f"airflow http://127.0.0.1:{st.airflow_port} (api-server, scheduler, dag-processor, triggerer); "
         f"login admin / the AIRFLOW_ADMIN_PASSWORD of {st.secrets_file}", t0)
    out = status(settings)
    out["started_in_s"] = round(time.monotonic() - t0, 1)
    return out


def status(settings: Settings | None = None) -> dict:
    """Each service's state, PID, URL and health (JSON-able)."""
    settings = settings or get_settings()
    st = stack_settings(settings)
    pids = _load_pids(st)
    services = {}
    for name in process_names(st):
        rec = pids.get(name)
        alive = bool(rec) and _alive(rec)
        ok, detail = _health(name, st) if alive else (False, None)
        services[name] = {"state": "running" if alive else ("dead" if rec else "stopped"),
                          "pid": rec["pid"] if rec else None, "url": _url(name, st),
                          "health": "healthy" if ok else ("unhealthy" if alive else None),
                          **({"detail": detail if isinstance(detail, str) else None} if alive and not ok else {}),
                          "log": str(st.logs / f"{name}.log")}
    return {"stack_dir": str(st.dir), "secrets_file": str(st.secrets_file),
            "state": "up" if all(s["health"] == "healthy" for s in services.values()) else
            ("down" if all(s["state"] != "running" for s in services.values()) else "partial"),
            "services": services}


def _stop_group(pid: int, grace: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.3)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def stop_service(name: str, settings: Settings | None = None, grace: float = 30.0) -> bool:
    """Stop one recorded service (exactly the process `up` started, and its process group);
    False if it was not running."""
    settings = settings or get_settings()
    st = stack_settings(settings)
    pids = _load_pids(st)
    rec = pids.get(name)
    if not rec or not _alive(rec):
        pids.pop(name, None)
        _save_pids(st, pids)
        return False
    if name == "postgres":
        _pg_run([_pg_bin("pg_ctl"), "-D", str(st.pgdata), "-m", "fast", "-w", "-t", str(int(grace)), "stop"])
        if _alive(rec):
            os.kill(rec["pid"], signal.SIGKILL)
    else:
        _stop_group(rec["pid"], grace)
    pids.pop(name, None)
    _save_pids(st, pids)
    return True


def down(settings: Settings | None = None) -> dict:
    """Stop exactly the processes `up` recorded, in reverse start order; returns what stopped."""
    settings = settings or get_settings()
    st = stack_settings(settings)
    pids = _load_pids(st)
    order = [n for n in reversed(process_names(st)) if n in pids] + \
            [n for n in pids if n not in process_names(st)]  # e.g. more workers than now configured
    stopped = {}
    for name in order:
        pid = pids[name].get("pid")
        stopped[name] = {"pid": pid, "stopped": stop_service(name, settings)}
    return {"stack_dir": str(st.dir), "stopped": stopped}


def leftover_processes(stack_dir: Path) -> list[int]:
    """PIDs whose environment carries this stack's REQDEDUP_STACK_ID (every service and its children)."""
    marker = f"REQDEDUP_STACK_ID={stack_dir}".encode()
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if marker in (p / "environ").read_bytes().split(b"\0") and _proc_start_time(int(p.name)) is not None:
                out.append(int(p.name))
        except OSError:
            continue
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["supervise", "--"] and len(argv) > 2:
        return supervise(argv[2:])
    if len(argv) != 1 or argv[0] not in ("up", "status", "down", "env"):
        print("usage: scripts/stack.sh up|status|down|env", file=sys.stderr)
        return 2
    cmd = argv[0]
    try:
        if cmd == "up":
            print(json.dumps(up(), indent=2))
        elif cmd == "status":
            out = status()
            print(json.dumps(out, indent=2))
            return 0 if out["state"] == "up" else 3
        elif cmd == "down":
            out = down()
            print(json.dumps(out, indent=2))
            left = leftover_processes(stack_settings().dir)
            if left:
                print(f"[stack] processes of this stack still running: {left}", file=sys.stderr)
                return 1
        else:
            for k, v in client_env().items():
                print(f"export {k}={shlex.quote(v)}")
    except (InputError, RuntimeError) as e:
        print(f"[stack] {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
