"""Airflow 3 plugin: the latest reqdedup reports as a page inside the Airflow UI.

A FastAPI app mounted by the api-server under ``/reqdedup-reports`` renders what the
pipeline wrote under ``settings.reports_dir``: the storage benchmark (JSON + PNG), the
evaluation table, data-quality results, and every plot, newest first. An
``external_views`` entry with a ``url_route`` puts it in the UI's Browse menu, shown in
the UI's frame at ``/plugin/reqdedup-report``.

The app answers only logged-in users: it uses the api-server's own ``get_user``
dependency (the UI's session cookie, or a Bearer token from ``POST /auth/token``).
Files are served only from inside the reports folder.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
from pathlib import Path

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/reqdedup-reports"
URL_ROUTE = "reqdedup-report"
MAX_FILES = 200
SHOWN_SUFFIXES = {".json", ".md", ".png", ".svg", ".html"}


def reports_dir() -> Path:
    from reqdedup.config import get_settings

    return get_settings().reports_dir


# ---- rendering (pure functions: tested without a server) --------------------------------
def _cell(value) -> str:
    if isinstance(value, float):
        text = f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    elif isinstance(value, int) and not isinstance(value, bool):
        text = f"{value:,}"
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, default=str)
        if len(text) > 160:
            text = text[:157] + "..."
    else:
        text = str(value)
    return html.escape(text)


def json_to_html(data) -> str:
    """Top-level scalars as a key/value table; dicts of dicts (and lists of dicts) as tables."""
    parts = []
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        return records_table(data)
    if not isinstance(data, dict):
        return f"<pre>{html.escape(json.dumps(data, indent=2, default=str))}</pre>"
    scalars = {k: v for k, v in data.items() if not isinstance(v, (dict, list)) or _short(v)}
    if scalars:
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_cell(v)}</td></tr>" for k, v in scalars.items())
        parts.append(f"<table class='kv'>{rows}</table>")
    for key, value in data.items():
        if key in scalars:
            continue
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            parts.append(f"<h4>{html.escape(str(key))}</h4>" + records_table(
                [{"": k, **v} for k, v in value.items()]))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            parts.append(f"<h4>{html.escape(str(key))}</h4>" + records_table(value))
        else:
            parts.append(f"<h4>{html.escape(str(key))}</h4><pre>"
                         f"{html.escape(json.dumps(value, indent=2, default=str)[:4000])}</pre>")
    return "".join(parts)


def _short(value) -> bool:
    return len(json.dumps(value, default=str)) <= 120 and not (
        isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()))


def records_table(records: list[dict]) -> str:
    columns: list[str] = []
    for r in records:
        columns += [c for c in r if c not in columns]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c, ''))}</td>" for c in columns) + "</tr>"
                   for r in records)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown_to_html(text: str) -> str:
    """Headings, pipe tables and paragraphs: enough for the reports the pipeline writes."""
    out, table = [], []

    def flush():
        if not table:
            return
        rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table]
        rows = [r for r in rows if not all(set(c) <= set(":- ") and c for c in r)]  # separator line
        if rows:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        table.clear()

    for line in text.splitlines():
        if line.strip().startswith("|"):
            table.append(line)
            continue
        flush()
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            level = min(6, len(stripped) - len(stripped.lstrip("#")) + 2)
            out.append(f"<h{level}>{html.escape(stripped.lstrip('#').strip())}</h{level}>")
        else:
            out.append(f"<p>{html.escape(stripped)}</p>")
    flush()
    return "".join(out)


def list_reports(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = Path(dirpath).relative_to(root).parts
        # Great Expectations' Data Docs site: link its index only, not its thousand assets.
        dirnames[:] = [d for d in dirnames if len(depth) < 3 and not d.startswith(".")
                       and d not in ("static", "expectations", "validations")]
        for name in filenames:
            p = Path(dirpath) / name
            if p.suffix in SHOWN_SUFFIXES and not name.startswith("."):
                if p.suffix == ".html" and name != "index.html":
                    continue
                found.append(p)
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return found[:MAX_FILES]


def _when(p: Path) -> str:
    return dt.datetime.fromtimestamp(p.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _section_of(rel: Path) -> str:
    name = str(rel).lower()
    if "storage" in name:
        return "Storage: IID vs request-sorted"
    if "eval" in name or "gate" in name:
        return "Evaluation"
    if "train" in name:
        return "Training"
    if "valid" in name or "data_docs" in name or "quality" in name:
        return "Data quality"
    return "Other reports"


SECTION_ORDER = ["Evaluation", "Storage: IID vs request-sorted", "Training", "Data quality", "Other reports"]


def storage_headline(root: Path) -> str:
    path = root / "storage_bench.json"
    if not path.is_file():
        return ""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return ""
    ratio, user_ratio = data.get("table_ratio"), data.get("user_columns_ratio")
    return (f"<p class='headline'>Request-sorted table: <b>{_cell(ratio)}x</b> smaller than IID-shuffled; "
            f"user columns <b>{_cell(user_ratio)}x</b> ({_cell(data.get('rows'))} rows).</p>")


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.2rem;color:#1a202c}
h1{font-size:1.4rem} h2{font-size:1.15rem;border-bottom:1px solid #ccd;padding-bottom:.2rem;margin-top:1.6rem}
h3{font-size:1rem;margin-bottom:.2rem} h4{font-size:.9rem;margin:.6rem 0 .2rem}
table{border-collapse:collapse;margin:.3rem 0 .8rem;font-size:.85rem}
th,td{border:1px solid #d0d5dd;padding:.2rem .5rem;text-align:left;vertical-align:top}
thead th{background:#f0f3f7} table.kv th{background:#f7f8fa;font-weight:600}
img{max-width:100%;border:1px solid #d0d5dd;margin:.3rem 0}
.meta{color:#667;font-size:.8rem} .headline{font-size:1.05rem;background:#eef6ee;padding:.5rem;border-radius:4px}
"""


def render_page(root: Path) -> str:
    files = list_reports(root)
    # Within a section: tables and plots first, then the JSON behind them (newest first each).
    rank = {".md": 0, ".png": 1, ".svg": 1, ".json": 2, ".html": 3}
    files = sorted(files, key=lambda p: rank.get(p.suffix, 4))
    sections: dict[str, list[str]] = {}
    for p in files:
        rel = p.relative_to(root)
        url = "files/" + "/".join(rel.parts)
        head = (f"<h3>{html.escape(str(rel))}</h3><div class='meta'>{_when(p)} · "
                f"<a href='{html.escape(url)}' target='_blank'>raw</a></div>")
        if p.suffix in (".png", ".svg"):
            body = f"<img src='{html.escape(url)}' alt='{html.escape(str(rel))}'>"
        elif p.suffix == ".json":
            try:
                body = json_to_html(json.loads(p.read_text()))
            except (OSError, json.JSONDecodeError) as e:
                body = f"<p>unreadable: {html.escape(str(e))}</p>"
        elif p.suffix == ".md":
            body = markdown_to_html(p.read_text(errors="replace"))
        else:  # a Data Docs index
            body = f"<p><a href='{html.escape(url)}' target='_blank'>open</a></p>"
        sections.setdefault(_section_of(rel), []).append(head + body)
    if not files:
        content = (f"<p>No reports yet in <code>{html.escape(str(root))}</code>. Run the "
                   "<code>request_dedup_pipeline</code> DAG (or <code>make demo</code>).</p>")
    else:
        content = "".join(f"<h2>{html.escape(name)}</h2>" + "".join(sections[name])
                          for name in SECTION_ORDER if name in sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>reqdedup reports</title>"
            f"<style>{STYLE}</style></head><body><h1>reqdedup: latest reports</h1>"
            f"<div class='meta'>from {html.escape(str(root))}</div>{storage_headline(root)}{content}</body></html>")


def safe_report_path(root: Path, rel: str) -> Path | None:
    """``rel`` resolved inside ``root``, or None (no escaping the reports folder)."""
    try:
        target = (root / rel).resolve()
        target.relative_to(root.resolve())
    except (ValueError, OSError):
        return None
    return target if target.is_file() else None


# ---- the FastAPI app --------------------------------------------------------------------
def create_app():
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    try:  # the api-server's own authentication: UI session cookie or Bearer token
        from airflow.api_fastapi.core_api.security import get_user

        dependencies = [Depends(get_user)]
    except ImportError:  # pragma: no cover - outside an api-server
        dependencies = []

    app = FastAPI(title="reqdedup reports", dependencies=dependencies, docs_url=None, redoc_url=None)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return render_page(reports_dir())

    @app.get("/summary.json")
    def summary() -> JSONResponse:
        root = reports_dir()
        return JSONResponse({"reports_dir": str(root),
                             "files": [str(p.relative_to(root)) for p in list_reports(root)]})

    @app.get("/files/{rel:path}")
    def files(rel: str):
        path = safe_report_path(reports_dir(), rel)
        if path is None:
            raise HTTPException(status_code=404, detail="no such report file")
        return FileResponse(path)

    return app


class ReqdedupReportsPlugin(AirflowPlugin):
    name = "reqdedup_reports"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "reqdedup reports"}]
    external_views = [{
        "name": "Dedup report",
        "href": URL_PREFIX.lstrip("/") + "/",
        "url_route": URL_ROUTE,
        "destination": "nav",
        "category": "browse",
    }]
