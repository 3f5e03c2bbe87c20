"""Nightly feature build: raw log -> leakage-free Delta example tables.

python -m jobs.build_features --date 2022-05-01           # nightly run for one date
python -m jobs.build_features --full                      # full rebuild (refits vocab/bins)
python -m jobs.build_features --full --spec feature_specs/synthetic.yaml --set lake=/data/lake
"""

from __future__ import annotations

import datetime as dt
import json
import sys

from jobs._cli import job_parser, setup_logging


def main(argv: list[str] | None = None) -> int:
    p = job_parser("build_features", __doc__, "conf/pipeline.yaml")
    p.add_argument("--spec", help="feature spec YAML (default: the config's spec)")
    p.add_argument("--lake", help="output root (default: the config's lake)")
    p.add_argument(
        "--spec-set",
        dest="spec_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec value, e.g. source.path=/data/log.csv",
    )
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--date", help="the day to build, YYYY-MM-DD (nightly mode)")
    when.add_argument("--full", action="store_true", help="rebuild every day of the source")
    when.add_argument("--dates", help="build FROM..TO day by day (nightly mode, in order)")
    args = p.parse_args(argv)
    setup_logging(args.verbose)

    from pipelines.build import BuildError, build
    from pipelines.config import load_config
    from pipelines.source import SourceError
    from pipelines.spark import spark_session
    from pipelines.spec import SpecError, load_spec

    try:
        overrides = list(args.overrides)
        if args.spec:
            overrides.append(f"spec={args.spec}")
        if args.lake:
            overrides.append(f"lake={args.lake}")
        cfg = load_config(args.conf, overrides)
        spec = load_spec(cfg.spec, overrides=args.spec_overrides)
        dates: list[str | None]
        if args.full:
            dates = [None]
        elif args.dates:
            lo, hi = (dt.date.fromisoformat(x) for x in args.dates.split(".."))
            dates = [(lo + dt.timedelta(days=i)).isoformat() for i in range((hi - lo).days + 1)]
        else:
            dates = [dt.date.fromisoformat(args.date).isoformat()]
    except (SpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    spark = spark_session(cfg.spark)
    try:
        for d in dates:
            summary = build(spark, spec, cfg, date=d)
            print(
                json.dumps(
                    {
                        k: summary[k]
                        for k in (
                            "run",
                            "rows_in",
                            "rows_accepted",
                            "rows_rejected",
                            "examples",
                            "users",
                            "seconds",
                        )
                    }
                )
            )
    except (BuildError, SourceError, SpecError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
