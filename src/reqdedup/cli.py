"""`reqdedup <stage>`: every DAG task is also a command.

Each sub-command imports its module lazily so `reqdedup --help` stays fast and a command
that needs only torch (train) does not import Spark or MLflow.
"""

from __future__ import annotations

import argparse
import json
import sys


from reqdedup.errors import EX_TEMPFAIL, EX_USAGE_INPUT, InputError, ServiceUnavailableError


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _add_result(p) -> None:
    """``--result PATH``: the stage's result JSON is also written there (atomically), for the
    caller (an Airflow task) to read instead of parsing stdout."""
    p.add_argument("--result", default=None, metavar="PATH",
                   help="also write the result JSON to PATH (atomically: temp file + rename)")


def _emit(a, obj: dict) -> None:
    """Print a stage's result, and write it to ``--result`` when given."""
    _print_json(obj)
    if getattr(a, "result", None):
        from reqdedup.results import write_result

        write_result(a.result, obj)


# ---- generate ---------------------------------------------------------------------------
def _add_generate(sub):
    p = sub.add_parser("generate", help="write a synthetic request log as Parquet under landing/date=D/")
    p.add_argument("--date", required=True, help="logical date, YYYY-MM-DD")
    p.add_argument("--users", type=int, default=500)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--candidates", type=int, default=50, help="candidates per request")
    p.add_argument("--history", type=int, default=256, help="mean history length (item ids)")
    p.add_argument("--items", type=int, default=20000, help="item catalog size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="landing folder (default: settings' landing dir)")
    _add_result(p)

    def run(a):
        from reqdedup.data.generator import GeneratorConfig, write_landing

        cfg = GeneratorConfig(users=a.users, requests=a.requests, candidates=a.candidates,
                              history=a.history, items=a.items, seed=a.seed, date=a.date)
        _emit(a, write_landing(cfg, out_dir=a.out))

    p.set_defaults(func=run)


# ---- import-interactions -----------------------------------------------------------------
def _add_import(sub):
    p = sub.add_parser("import-interactions",
                       help="turn a real interaction log (CSV/Parquet: user_id,item_id,timestamp[,rating]) into request logs")
    p.add_argument("path")
    p.add_argument("--candidates", type=int, default=50)
    p.add_argument("--history", type=int, default=256, help="max history length")
    p.add_argument("--session-gap-minutes", type=float, default=30.0)
    p.add_argument("--min-rating", type=float, default=None,
                   help="ratings at or above count as engagement (default: every interaction does)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    _add_result(p)

    def run(a):
        from reqdedup.data.importer import ImportConfig, import_interactions

        cfg = ImportConfig(candidates=a.candidates, history=a.history,
                           session_gap_minutes=a.session_gap_minutes,
                           min_rating=a.min_rating, seed=a.seed)
        _emit(a, import_interactions(a.path, cfg, out_dir=a.out))

    p.set_defaults(func=run)


# ---- ingest -----------------------------------------------------------------------------
def _add_ingest(sub):
    p = sub.add_parser("ingest", help="Spark: sort landing/date=D by (user_id, request_id) into the Iceberg impressions table")
    p.add_argument("--date", required=True)
    p.add_argument("--publish", action="store_true",
                   help="publish to main at once, skipping the audit (default: stage on branch stage_YYYYMMDD for `validate`)")
    p.add_argument("--items", type=int, default=None,
                   help="item catalog size bounding item_id and user_history ids (default: the landing files' "
                        "schema metadata reqdedup.items, which generate and import-interactions write)")
    _add_result(p)

    def run(a):
        from reqdedup.lake.ingest import ingest_date

        _emit(a, ingest_date(a.date, publish=a.publish, items=a.items))

    p.set_defaults(func=run)

    p = sub.add_parser("publish", help="make a staged date visible on main (what `validate` does after its checks pass)")
    p.add_argument("--date", required=True)
    p.add_argument("--snapshot-id", type=int, default=None,
                   help="the audited staging snapshot (`validate --no-publish` reports it): main moves to exactly "
                        "it, refused if the branch moved past it; a retry after it was published is a no-op")

    p.add_argument("--table", default="impressions", help=argparse.SUPPRESS)
    _add_result(p)

    def run_publish(a):
        from reqdedup.lake.ingest import publish_date

        _emit(a, publish_date(a.date, table=a.table, snapshot_id=a.snapshot_id))

    p.set_defaults(func=run_publish)


# ---- maintain ---------------------------------------------------------------------------
def _add_maintain(sub):
    from reqdedup.lake.maintain import DEFAULTS, STEPS

    p = sub.add_parser("maintain", help="lake clean-up through Iceberg's Spark procedures: stale staging branches, "
                       "sort-rewrite of data files, expire snapshots, remove orphan files")
    # No argparse choices: with nargs="*" argparse checks an empty match against them as a
    # whole and refuses it; maintain() refuses unknown steps itself (exit 2, naming them).
    p.add_argument("steps", nargs="*", default=None, metavar="STEP",
                   help=f"any of {', '.join(STEPS)} (run in that order), or all (default)")
    p.add_argument("--table", dest="tables", action="append", default=None,
                   help="a table of the namespace (repeatable; default: every table)")
    p.add_argument("--branch-max-age-days", type=float, default=DEFAULTS["branch_max_age_days"],
                   help="branches: drop stage_YYYYMMDD branches whose last commit is older (default %(default)s)")
    p.add_argument("--older-than-days", type=float, default=DEFAULTS["older_than_days"],
                   help="expire: snapshots older than this many days (default %(default)s)")
    p.add_argument("--retain-last", type=int, default=DEFAULTS["retain_last"],
                   help="expire: keep at least this many snapshots (default %(default)s)")
    p.add_argument("--orphan-older-than-days", type=float, default=DEFAULTS["orphan_older_than_days"],
                   help="orphans: unreferenced files older than this (>= 1; default %(default)s)")
    p.add_argument("--rewrite-all", action="store_true", help="rewrite: every data file, not only those worth it")
    p.add_argument("--dry-run", action="store_true", help="orphans: list them, delete nothing")
    _add_result(p)

    def run(a):
        from reqdedup.lake.maintain import maintain

        steps = list(STEPS) if not a.steps or "all" in a.steps else a.steps
        _emit(a, maintain(steps, a.tables, branch_max_age_days=a.branch_max_age_days,
                          older_than_days=a.older_than_days, retain_last=a.retain_last,
                          orphan_older_than_days=a.orphan_older_than_days, rewrite_all=a.rewrite_all,
                          dry_run=a.dry_run))

    p.set_defaults(func=run)


# ---- bench ------------------------------------------------------------------------------
def _add_bench(sub):
    p = sub.add_parser("bench", help="benchmarks that write JSON")
    bsub = p.add_subparsers(dest="bench", required=True)

    s = bsub.add_parser("storage", help="Iceberg bytes: raw-log order vs request-sorted")
    s.add_argument("--requests", type=int, default=2000)
    s.add_argument("--candidates", type=int, default=200)
    s.add_argument("--history", type=int, default=1000)
    s.add_argument("--users", type=int, default=None, help="default: requests // 4")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", required=True)
    s.add_argument("--sweep", action="store_true",
                   help="also measure the candidate writer-property sets (how the defaults were chosen)")
    _add_result(s)

    def run_storage(a):
        from reqdedup.bench.storage import run_storage_bench

        _emit(a, run_storage_bench(requests=a.requests, candidates=a.candidates,
                                      history=a.history, users=a.users, seed=a.seed,
                                      json_path=a.json, sweep=a.sweep))

    s.set_defaults(func=run_storage)

    t = bsub.add_parser("train", help="training rows/s: per-row user encoding vs request-level dedup (same run)",
                        add_help=False)

    def run_train_bench(a, rest):
        from reqdedup.bench.train import main as bench_main

        raise SystemExit(bench_main(rest))

    t.set_defaults(func=run_train_bench, passthrough=True)

    sv = bsub.add_parser("serve", help="serving requests/s and p50/p99: request-level vs per-candidate scoring "
                         "(same model, same requests); --help for options", add_help=False)

    def run_serve_bench(a, rest):
        from reqdedup.bench.serve import main as bench_main

        raise SystemExit(bench_main(rest))

    sv.set_defaults(func=run_serve_bench, passthrough=True)

    sh = bsub.add_parser("serve-http", help="bounded load run on loopback against `mlflow models serve` of a "
                         "registered model: p50/p99, errors by status, RSS; --help for options", add_help=False)

    def run_serve_http_bench(a, rest):
        from reqdedup.bench.serve_http import main as bench_main

        raise SystemExit(bench_main(rest))

    sh.set_defaults(func=run_serve_http_bench, passthrough=True)

    cr = bsub.add_parser("crossing", help="crossing ranker: context/crossing dedup vs naive per-candidate, training "
                         "and serving (same model, same run); --help for options", add_help=False)

    def run_crossing_bench(a, rest):
        from reqdedup.bench.crossing import main as bench_main

        raise SystemExit(bench_main(rest))

    cr.set_defaults(func=run_crossing_bench, passthrough=True)

    ld = bsub.add_parser("loader", help="data path: today's RequestLoader vs the request-level reader, and "
                         "end-to-end training fed by it (same data, one run); --help for options", add_help=False)

    def run_loader_bench(a, rest):
        from reqdedup.bench.loader import main as bench_main

        raise SystemExit(bench_main(rest))

    ld.set_defaults(func=run_loader_bench, passthrough=True)

    sz = bsub.add_parser("sizing", help="sizing model on paper from the measured rates (configs/sizing.yaml); "
                         "--help for options", add_help=False)

    def run_sizing(a, rest):
        from reqdedup.bench.sizing import main as sizing_main

        raise SystemExit(sizing_main(rest))

    sz.set_defaults(func=run_sizing, passthrough=True)


# ---- train ------------------------------------------------------------------------------
def _add_train(sub):
    p = sub.add_parser("train", help="train through torchrun (gloo on CPU, NCCL on CUDA) from a YAML config")
    p.add_argument("--config", required=True, help="training config (YAML); see configs/")
    _add_result(p)

    def run(a):
        from reqdedup.train.launch import run_training

        metrics = run_training(a.config)
        _emit(a, {k: v for k, v in metrics.items() if k != "history"})

    p.set_defaults(func=run)


# ---- validate / features / sample (issue 4) ----------------------------------------------
def _date_range(a):
    from reqdedup.errors import InputError as _E

    if a.date and (a.start or a.end):
        raise _E("give --date D or --start D --end D, not both")
    if a.date:
        return a.date, a.date
    if not (a.start and a.end):
        raise _E("give --date D or both --start D and --end D")
    return a.start, a.end


def _int_list(text, what):
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{what} {text!r} is not a comma-separated list of integers") from None


def _add_validate(sub):
    p = sub.add_parser("validate", help="Great Expectations suites on a staged date; publish it to main if they pass")
    p.add_argument("--date", required=True)
    p.add_argument("--label-rate-min", type=float, default=None, help="default 0.005")
    p.add_argument("--label-rate-max", type=float, default=None, help="default 0.5")
    p.add_argument("--no-publish", action="store_true", help="audit only; leave the date on its staging branch")
    p.add_argument("--items", type=int, default=None,
                   help="item catalog size (default: the landing files' schema metadata reqdedup.items)")
    p.add_argument("--table", default="impressions", help=argparse.SUPPRESS)
    _add_result(p)

    def run(a):
        from reqdedup.quality.runner import validate_date

        _emit(a, validate_date(a.date, table=a.table, label_rate_min=a.label_rate_min,
                               label_rate_max=a.label_rate_max, publish=not a.no_publish, items=a.items))

    p.set_defaults(func=run)


def _add_features(sub):
    p = sub.add_parser("features", help="feature side tables: same bucketing and sort as impressions, joined per bucket")
    fsub = p.add_subparsers(dest="features", required=True)

    def dates(q):
        q.add_argument("--date", default=None)
        q.add_argument("--start", default=None)
        q.add_argument("--end", default=None)

    q = fsub.add_parser("list", help="the registered features")
    q.set_defaults(func=lambda a: _print_json(__import__("reqdedup.lake.features", fromlist=["x"]).list_features()))

    q = fsub.add_parser("add", help="compute a feature for dates into its side table (impressions untouched)")
    q.add_argument("name")
    dates(q)
    _add_result(q)

    def run_add(a):
        from reqdedup.lake.features import add_feature

        start, end = _date_range(a)
        _emit(a, add_feature(a.name, start, end))

    q.set_defaults(func=run_add)

    q = fsub.add_parser("backfill", help="recompute a feature for some user buckets only (one atomic overwrite)")
    q.add_argument("name")
    q.add_argument("--buckets", default=None, help="comma-separated bucket numbers, e.g. 1,3")
    q.add_argument("--users", default=None, help="comma-separated user ids, mapped to their buckets")
    dates(q)
    _add_result(q)

    def run_backfill(a):
        from reqdedup.lake.backfill import backfill_feature

        start, end = _date_range(a)
        buckets = _int_list(a.buckets, "--buckets") if a.buckets else None
        users = _int_list(a.users, "--users") if a.users else None
        _emit(a, backfill_feature(a.name, start, end, buckets=buckets, users=users))

    q.set_defaults(func=run_backfill)


def _add_sample(sub):
    p = sub.add_parser("sample", help="user-stratified sample of a date: whole users and requests, heavy users capped")
    p.add_argument("--date", required=True)
    p.add_argument("--rate", type=float, required=True, help="share of users sampled in every activity stratum")
    p.add_argument("--cap", type=int, default=None, help="max requests kept per sampled user")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strata", type=int, default=4, help="activity strata (requests-per-day quantiles)")
    p.add_argument("--users-only", action="store_true", help="return the sampled user ids, write no table")
    _add_result(p)

    def run(a):
        from reqdedup.lake.sample import sample_date

        _emit(a, sample_date(a.date, a.rate, cap=a.cap, seed=a.seed, strata=a.strata, write=not a.users_only))

    p.set_defaults(func=run)


# ---- evaluate / report / register (issue 5) ---------------------------------------------
def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="train + evaluate the experiment matrix (iid vs request-sorted, fixes) in one torchrun launch")
    p.add_argument("--config", required=True, help="evaluation matrix config (YAML), e.g. configs/eval_demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (YAML), e.g. --set data.batch_rows=128; repeatable")
    p.add_argument("--retrain", action="store_true", help="retrain every run instead of reusing its finished checkpoint")
    p.add_argument("--report-dir", default=None, help="report folder (default: <reports>/evaluation)")
    _add_result(p)

    def run(a):
        from pathlib import Path

        from reqdedup.config import get_settings
        from reqdedup.evaluate.matrix import report_dir_default, run_evaluation
        from reqdedup.evaluate.report import SUMMARY, markdown_table

        out_dir = Path(a.report_dir) if a.report_dir else report_dir_default(get_settings())
        summary = run_evaluation(a.config, overrides=a.overrides, retrain=a.retrain, report_dir=out_dir)
        print(markdown_table(summary))
        # What `register --summary PATH --evaluation-id ID` needs: this evaluation's summary.
        _emit(a, {**{k: summary[k] for k in ("evaluation_id", "eval_set_id", "parent_run_id", "status", "timing")},
                  "summary_path": str((out_dir / SUMMARY).resolve())})

    p.set_defaults(func=run)

    p = sub.add_parser("report", help="print the latest evaluation table")
    p.add_argument("--report-dir", default=None, help="report folder (default: <reports>/evaluation)")

    def run_report(a):
        from reqdedup.config import get_settings
        from reqdedup.evaluate.matrix import report_dir_default
        from reqdedup.evaluate.report import show

        print(show(a.report_dir or report_dir_default(get_settings())))

    p.set_defaults(func=run_report)

    p = sub.add_parser("register", help="register sorted_fixed (alias challenger); champion only through the gate")
    p.add_argument("--tolerance", type=float, default=None,
                   help="relative tolerance against iid on the gate metrics (default: the evaluation config's, 0.005)")
    p.add_argument("--summary", default=None, help="evaluation summary.json (default: <reports>/evaluation/summary.json)")
    p.add_argument("--evaluation-id", default=None,
                   help="the evaluation to register: a summary of any other evaluation is refused "
                        "(the pipeline passes the id its evaluate task returned)")
    _add_result(p)

    def run_register(a):
        from reqdedup.registry.register import register

        _emit(a, register(summary_path=a.summary, tolerance=a.tolerance, evaluation_id=a.evaluation_id))

    p.set_defaults(func=run_register)


BUILDERS = [_add_generate, _add_import, _add_ingest, _add_maintain, _add_train, _add_bench, _add_validate, _add_features, _add_sample,
            _add_evaluate]


# ---- serve (issue 7) ----------------------------------------------------------------------
def _add_serve(sub):
    p = sub.add_parser("serve", help="serve a registered model with MLflow's scoring server on 127.0.0.1 "
                       "(mlflow models serve --env-manager local)")
    p.add_argument("--alias", default="champion", help="registered-model alias (default champion)")
    p.add_argument("--model-uri", default=None, help="default: models:/<registered_model>@<alias>")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu / cuda / auto (sets REQDEDUP_SERVE_DEVICE)")

    def run(a):
        import os

        from reqdedup.config import get_settings
        from reqdedup.serve.pyfunc import DEVICE_ENV, serve_command

        settings = get_settings()
        uri = a.model_uri or f"models:/{settings.registered_model}@{a.alias}"
        argv, env = serve_command(uri, host="127.0.0.1", port=a.port, workers=a.workers, settings=settings)
        if a.device:
            env[DEVICE_ENV] = a.device
        print(f"reqdedup serve: {' '.join(argv)}", file=sys.stderr, flush=True)
        os.execve(argv[0], argv, env) if os.path.isabs(argv[0]) else os.execvpe(argv[0], argv, env)

    p.set_defaults(func=run)


BUILDERS.append(_add_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reqdedup", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in BUILDERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        build_parser().parse_args(argv)  # reports the unknown arguments and exits 2
    try:
        args.func(args, rest) if getattr(args, "passthrough", False) else args.func(args)
    except InputError as e:
        print(f"reqdedup {args.command}: error: {e}", file=sys.stderr)
        return EX_USAGE_INPUT
    except ServiceUnavailableError as e:  # an outage: the caller (Airflow) retries
        print(f"reqdedup {args.command}: unavailable: {e}", file=sys.stderr)
        return EX_TEMPFAIL
    return 0


if __name__ == "__main__":
    sys.exit(main())
