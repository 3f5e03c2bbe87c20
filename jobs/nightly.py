"""The nightly run as one scheduled command: build features -> train -> evaluate -> register ->
score, each step skipped when its output for the date exists (unless forced).

python -m jobs.nightly --date 2022-05-08
python -m jobs.nightly --date 2022-05-08 --nproc 2 --warm-start
python -m jobs.nightly --date 2022-05-08 --force score            # re-score only
python -m jobs.nightly --date 2022-05-08 --force all              # redo every step

Config: conf/pipeline.yaml (--set-pipeline KEY=VALUE) and conf/train.yaml (--set-train
KEY=VALUE); the spec with --spec-set. Exit code 1 names the failed step; earlier outputs stay.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from jobs._cli import setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.nightly",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--date", required=True, help="YYYY-MM-DD")
    p.add_argument("--pipeline-conf", default="conf/pipeline.yaml")
    p.add_argument("--train-conf", default="conf/train.yaml")
    p.add_argument("--set-pipeline", dest="pipeline_overrides", action="append", default=[])
    p.add_argument("--set-train", dest="train_overrides", action="append", default=[])
    p.add_argument("--spec-set", dest="spec_overrides", action="append", default=[])
    p.add_argument("--runs-dir", default="out/nightly", help="training outputs per date")
    p.add_argument("--nproc", type=int, default=1, help="training processes (torchrun if > 1)")
    p.add_argument("--warm-start", action="store_true", help="start from the champion's weights")
    p.add_argument(
        "--force",
        action="append",
        default=[],
        help="redo a step even if its output exists: build, train, register, score or all",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)

    from pipelines.nightly import STEPS, NightlyError, NightlyOptions, run_nightly
    from pipelines.spec import SpecError

    force = {s for f in args.force for s in f.split(",") if s}
    if "all" in force:
        force = set(STEPS)
    try:
        opts = NightlyOptions(
            date=dt.date.fromisoformat(args.date).isoformat(),
            pipeline_conf=args.pipeline_conf,
            pipeline_overrides=args.pipeline_overrides,
            spec_overrides=args.spec_overrides,
            train_conf=args.train_conf,
            train_overrides=args.train_overrides,
            runs_dir=args.runs_dir,
            nproc=args.nproc,
            warm_start=args.warm_start,
            force=force,
        )
        record = run_nightly(opts)
    except (SpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NightlyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
