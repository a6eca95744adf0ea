"""`reqdedup <stage>`: every DAG task is also a command.

Each sub-command imports its module lazily so `reqdedup --help` stays fast and a command
that needs only torch (train) does not import Spark or MLflow.
"""

from __future__ import annotations

import argparse
import json
import sys


from reqdedup.errors import InputError


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


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

    def run(a):
        from reqdedup.data.generator import GeneratorConfig, write_landing

        cfg = GeneratorConfig(users=a.users, requests=a.requests, candidates=a.candidates,
                              history=a.history, items=a.items, seed=a.seed, date=a.date)
        _print_json(write_landing(cfg, out_dir=a.out))

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

    def run(a):
        from reqdedup.data.importer import ImportConfig, import_interactions

        cfg = ImportConfig(candidates=a.candidates, history=a.history,
                           session_gap_minutes=a.session_gap_minutes,
                           min_rating=a.min_rating, seed=a.seed)
        _print_json(import_interactions(a.path, cfg, out_dir=a.out))

    p.set_defaults(func=run)


# ---- ingest -----------------------------------------------------------------------------
def _add_ingest(sub):
    p = sub.add_parser("ingest", help="Spark: sort landing/date=D by (user_id, request_id) into the Iceberg impressions table")
    p.add_argument("--date", required=True)
    p.add_argument("--publish", action="store_true",
                   help="publish to main at once, skipping the audit (default: stage on branch stage_YYYYMMDD for `validate`)")

    def run(a):
        from reqdedup.lake.ingest import ingest_date

        _print_json(ingest_date(a.date, publish=a.publish))

    p.set_defaults(func=run)

    p = sub.add_parser("publish", help="make a staged date visible on main (what `validate` does after its checks pass)")
    p.add_argument("--date", required=True)

    def run_publish(a):
        from reqdedup.lake.ingest import publish_date

        _print_json(publish_date(a.date))

    p.set_defaults(func=run_publish)


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

    def run_storage(a):
        from reqdedup.bench.storage import run_storage_bench

        _print_json(run_storage_bench(requests=a.requests, candidates=a.candidates,
                                      history=a.history, users=a.users, seed=a.seed,
                                      json_path=a.json, sweep=a.sweep))

    s.set_defaults(func=run_storage)


BUILDERS = [_add_generate, _add_import, _add_ingest, _add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reqdedup", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in BUILDERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except InputError as e:
        print(f"reqdedup {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
