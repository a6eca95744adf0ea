"""The evaluation report: Markdown table (mean ± std over seeds, change relative to `iid`),
PNG plots and the summary JSON the registry step reads, all under one folder
(default ``<reports>/evaluation``), replaced as a whole on every evaluation.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from reqdedup.contract import BASELINE_CONFIG
from reqdedup.evaluate import metrics as M
from reqdedup.fsutil import replace_dir_atomically, temp_dir_for

SUMMARY = "summary.json"
TABLE = "report.md"
PLOT_METRICS = "metrics_by_config.png"
PLOT_FNR = "fnr_vs_users_per_batch.png"
BASELINE = BASELINE_CONFIG


def metric_names(results: list[dict]) -> list[str]:
    """Report order: eval metrics first, then training figures."""
    keys = list(results[0]["metrics"]) if results else []
    first = ["auc", "log_loss"] + sorted(k for k in keys if k.startswith("recall@")) + \
            sorted(k for k in keys if k.startswith("ndcg@"))
    rest = ["false_negative_rate", "unique_users_per_batch", "requests_per_batch", "train_rows_per_s"]
    return [k for k in first + rest if k in keys]


def aggregate(results: list[dict], configs: list[str]) -> dict:
    """Per config and metric: seed summary (mean, std, ...), the per-seed values, and the
    relative change of the mean against the iid mean."""
    names = metric_names(results)
    out: dict = {"metrics": names, "configs": {}}
    for c in configs:
        runs = sorted((r for r in results if r["config"] == c), key=lambda r: r["seed"])
        out["configs"][c] = {}
        for m in names:
            values = [r["metrics"].get(m, float("nan")) for r in runs]
            st = M.seed_summary(values)
            st["values"] = values
            st["seeds"] = [r["seed"] for r in runs]
            out["configs"][c][m] = st
    base = out["configs"].get(BASELINE, {})
    for c, ms in out["configs"].items():
        for m, st in ms.items():
            st["rel_to_iid"] = M.relative_change(st["mean"], base.get(m, {}).get("mean", float("nan")))
            # paired by seed: the same seed gives the same model init in every config, so the
            # per-seed change against iid removes the init's share of the spread
            b = base.get(m, {})
            if b and b.get("seeds") == st["seeds"]:
                st["paired_rel_to_iid"] = M.seed_summary(
                    [M.relative_change(v, bv) for v, bv in zip(st["values"], b["values"])])
    return out


def add_intervals(agg: dict, results: list[dict], *, n_boot: int = 200, level: float = 0.95, seed: int = 0) -> dict:
    """95% intervals of the relative change against iid of every config on the eval metrics
    (``metrics.relative_change_interval``: paired request bootstrap + seed spread), from each
    run's saved eval arrays; seeds are paired (the seeds both configs ran). Stored under
    ``agg["intervals"][config][metric]``, the gate's input."""
    from reqdedup.evaluate.metrics import EVAL_ARRAYS, load_eval_arrays, relative_change_interval

    names = [m for m in agg["metrics"] if m.startswith(PAIRED_METRICS)]
    by = {(r["config"], r["seed"]): r for r in results}
    base_seeds = {s for c, s in by if c == BASELINE}
    arrays = {}

    def load(key):
        if key not in arrays:
            arrays[key] = load_eval_arrays(Path(by[key]["run_dir"]) / EVAL_ARRAYS)
        return arrays[key]

    agg["intervals"] = {}
    for c in agg["configs"]:
        if c == BASELINE:
            continue
        seeds = sorted(s for cc, s in by if cc == c and s in base_seeds)
        if not seeds:
            continue
        cand, base = [load((c, s)) for s in seeds], [load((BASELINE, s)) for s in seeds]
        agg["intervals"][c] = {m: {**relative_change_interval(cand, base, m, n_boot=n_boot, level=level, seed=seed),
                                   "seeds": seeds} for m in names}
    return agg


def interval_table(summary: dict) -> str:
    agg = summary["aggregate"]
    ivs = agg.get("intervals") or {}
    names = [m for m in agg["metrics"] if m.startswith(PAIRED_METRICS)]
    lines = ["| config | " + " | ".join(f"Δ {LABELS.get(m, m)} vs iid [95% interval]" for m in names) + " |",
             "| --- | " + " | ".join("---:" for _ in names) + " |"]
    for c, ms in ivs.items():
        cells = [f"{100 * ms[m]['point']:+.2f}% [{100 * ms[m]['low']:+.2f}, {100 * ms[m]['high']:+.2f}]"
                 if m in ms else "n/a" for m in names]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAIRED_METRICS = ("auc", "log_loss", "recall@", "ndcg@")


def paired_table(summary: dict) -> str:
    """Per-seed relative change against iid (same seed), mean ± std over seeds."""
    agg = summary["aggregate"]
    names = [m for m in agg["metrics"] if m.startswith(PAIRED_METRICS)]
    lines = ["| config | " + " | ".join(f"Δ {LABELS.get(m, m)} vs iid" for m in names) + " |",
             "| --- | " + " | ".join("---:" for _ in names) + " |"]
    for c, ms in agg["configs"].items():
        if c == BASELINE:
            continue
        cells = []
        for m in names:
            p = ms[m].get("paired_rel_to_iid")
            cells.append("n/a" if not p or p["n"] == 0 else f"{100 * p['mean']:+.2f}% ± {100 * p['std']:.2f}%")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(x: float, metric: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if metric in ("train_rows_per_s",):
        return f"{x:,.0f}"
    if metric in ("unique_users_per_batch", "requests_per_batch"):
        return f"{x:.1f}"
    return f"{x:.4f}"


def _fmt_rel(x: float) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{100 * x:+.2f}%"


LABELS = {"auc": "AUC", "log_loss": "log loss", "false_negative_rate": "in-batch FNR",
          "unique_users_per_batch": "users/batch", "requests_per_batch": "requests/batch",
          "train_rows_per_s": "train rows/s"}


def markdown_table(summary: dict) -> str:
    """One row per config; each cell "mean ± std (Δ vs iid)" over seeds."""
    agg = summary["aggregate"]
    names = agg["metrics"]
    header = "| config | " + " | ".join(LABELS.get(m, m) for m in names) + " |"
    sep = "| --- | " + " | ".join("---:" for _ in names) + " |"
    lines = [header, sep]
    for c, ms in agg["configs"].items():
        cells = []
        for m in names:
            st = ms[m]
            cell = f"{_fmt(st['mean'], m)} ± {_fmt(st['std'], m)}"
            if c != BASELINE and m not in ("unique_users_per_batch", "requests_per_batch", "false_negative_rate"):
                cell += f" ({_fmt_rel(st['rel_to_iid'])})"
            cells.append(cell)
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(summary: dict) -> str:
    cfg = summary["config"]
    seeds = cfg["seeds"]
    d = cfg["data"]
    td, ed = summary["train_data"], summary["eval_data"]
    lines = [
        f"# Evaluation `{summary['name']}` ({summary['evaluation_id']})",
        "",
        f"- status: **{summary['status']}**; created {summary['created_at']}; MLflow parent run `{summary['parent_run_id']}`",
        f"- training data {d['train_start']}..{d['train_end']}: {td['rows']:,} rows, {td['requests']:,} requests; "
        f"evaluation (later, held out) {d['eval_start']}..{d['eval_end']}: {ed['rows']:,} rows, "
        f"{ed['requests']:,} requests, {ed['positives']:,} engaged pairs; eval set `{summary['eval_set_id']}`"
        + ("" if d.get("buckets") is None else f"; buckets {d['buckets']}"),
        f"- {len(cfg['configs'])} configs x {len(seeds)} seeds {seeds}; batch_rows {d['batch_rows']} per process, "
        f"order of the request-level configs `{d.get('sorted_order', 'sorted')}`, "
        f"epochs {cfg['train'].get('epochs', 'default')}, {cfg['dist'].get('nproc_per_node', 2)} processes; "
        f"model {json.dumps(cfg['model'])}",
        f"- cells: mean ± sample std over seeds (relative change of the mean against `iid`). "
        f"AUC and log loss over every eval row (ranking head, BatchNorm in eval mode); recall@K / NDCG@K "
        f"rank each engaged (request, item) pair's item among all {summary.get('pool_items', 'distinct')} "
        f"items of the eval split by user_emb . item_emb (the request's other engaged items filtered, ties "
        f"pessimistic); FNR = share of in-batch negatives from the anchor's own user (before masking), "
        f"training mean; rows/s = training throughput of the 2-process run.",
        "",
        markdown_table(summary),
        "",
        "Paired by seed (each seed's relative change against `iid` with the same seed, then mean ± std "
        "over seeds; the seed fixes the model init in every config, so this removes the init's share "
        "of the spread):",
        "",
        paired_table(summary),
        "",
        "Relative change of the seed mean against `iid` with its 95% interval (paired bootstrap over eval "
        "requests, the same resampled requests for both configs, plus the spread over seeds; "
        "docs/evaluation.md). The gate promotes only when the interval's worst end is within the tolerance:",
        "",
        interval_table(summary),
        "",
    ]
    if summary.get("timing"):
        lines.append(f"Wall time: torchrun {summary['timing']['torchrun_seconds']} s, "
                     f"total {summary['timing']['total_seconds']} s.")
        lines.append("")
    lines += [f"![metrics by config](plots/{PLOT_METRICS})", "", f"![FNR vs users per batch](plots/{PLOT_FNR})", ""]
    if any(r.get("curve") for r in summary.get("runs", [])):
        lines += [f"![learning curves](plots/{PLOT_CURVES})", ""]
    return "\n".join(lines)


def plot_metrics(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = summary["aggregate"]
    names = [m for m in agg["metrics"] if m != "requests_per_batch"]
    configs = list(agg["configs"])
    cols = 3
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, m in zip(axes.ravel(), names):
        for i, c in enumerate(configs):
            st = agg["configs"][c][m]
            vals = [v for v in st["values"] if v == v]
            ax.scatter([i] * len(vals), vals, s=14, alpha=0.6, color="tab:blue", zorder=3)
            if st["mean"] == st["mean"]:
                ax.errorbar([i], [st["mean"]], yerr=[st["std"]], fmt="_", color="black", markersize=18, capsize=4,
                            zorder=4)
        base = agg["configs"].get(BASELINE, {}).get(m, {}).get("mean")
        if base is not None and base == base:
            ax.axhline(base, color="tab:gray", lw=0.8, ls="--")
        ax.set_title(LABELS.get(m, m), fontsize=10)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(configs, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{summary['name']}: per seed (dots), mean ± std (bars), iid mean (dashed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_fnr(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    configs = list(summary["aggregate"]["configs"])
    for i, c in enumerate(configs):
        runs = [r for r in summary["runs"] if r["config"] == c]
        ax.scatter([r["metrics"]["unique_users_per_batch"] for r in runs],
                   [r["metrics"]["false_negative_rate"] for r in runs], label=c, s=30, alpha=0.8,
                   marker="os^vD"[i % 5])
    ax.set_xscale("log")
    ax.set_xlabel("unique users per batch (training mean)")
    ax.set_ylabel("in-batch false-negative rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("same-user in-batch negatives vs batch composition", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOT_CURVES = "learning_curves.png"


def plot_curves(summary: dict, path: Path) -> Path | None:
    """Eval metrics against training rows seen and against training seconds, one line per
    (config, seed), from each run's learning curve (None when no run has one)."""
    runs = [r for r in summary["runs"] if r.get("curve")]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = summary["config"]["eval"]["k"]
    metrics = ["auc", f"recall@{k}"]
    configs = list(summary["aggregate"]["configs"])
    colors = {c: f"C{i}" for i, c in enumerate(configs)}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), squeeze=False)
    for row, m in enumerate(metrics):
        for col, x in enumerate(("rows", "train_seconds")):
            ax = axes[row][col]
            seen = set()
            for r in runs:
                pts = sorted(r["curve"], key=lambda p: p["rows"])
                ax.plot([p[x] for p in pts], [p[m] for p in pts], marker=".", lw=1, alpha=0.7, color=colors[r["config"]],
                        label=r["config"] if r["config"] not in seen else None)
                seen.add(r["config"])
            ax.set_xlabel("training rows seen" if x == "rows" else "training seconds")
            ax.set_ylabel(LABELS.get(m, m))
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{summary['name']}: learning curves (eval split, one line per seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(summary: dict, out_dir: str | Path) -> list[Path]:
    """Write report.md, plots/*.png and summary.json into a fresh folder and swap it in
    (a rerun replaces the previous report whole). Returns the final paths."""
    out_dir = Path(out_dir)
    tmp = temp_dir_for(out_dir)
    try:
        (tmp / "plots").mkdir()
        plot_metrics(summary, tmp / "plots" / PLOT_METRICS)
        plot_fnr(summary, tmp / "plots" / PLOT_FNR)
        curves = plot_curves(summary, tmp / "plots" / PLOT_CURVES)
        (tmp / TABLE).write_text(markdown_report(summary))
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
        replace_dir_atomically(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out_dir / TABLE, out_dir / SUMMARY, out_dir / "plots" / PLOT_METRICS, out_dir / "plots" / PLOT_FNR] + \
        ([out_dir / "plots" / PLOT_CURVES] if curves is not None else [])


def write_failed(summary: dict, out_dir: str | Path) -> Path:
    """A failed evaluation replaces the report with its summary (status failed) and a note,
    so nothing downstream mistakes an older report for this evaluation's."""
    out_dir = Path(out_dir)
    tmp = temp_dir_for(out_dir)
    (tmp / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
    (tmp / TABLE).write_text(f"# Evaluation `{summary['name']}` ({summary['evaluation_id']}) FAILED\n\n"
                             f"{summary.get('error', '')}\n\nNothing from it can be registered.\n")
    replace_dir_atomically(tmp, out_dir)
    return out_dir / SUMMARY


def read_summary(path: str | Path) -> dict:
    from reqdedup.errors import InputError

    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY
    if not path.is_file():
        raise InputError(f"no evaluation summary at {path}: run `reqdedup evaluate --config FILE` first")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise InputError(f"{path} is not a valid evaluation summary ({e})") from None


def show(report_dir: str | Path) -> str:
    """What `reqdedup report` prints: the table of the latest evaluation."""
    from reqdedup.errors import InputError

    report_dir = Path(report_dir)
    table = report_dir / TABLE
    if not table.is_file():
        raise InputError(f"no evaluation report at {table}: run `reqdedup evaluate --config FILE` first")
    return table.read_text()
