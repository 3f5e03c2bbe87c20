"""Batch scoring of one day with a registered model (Spark, the pyfunc in mapInArrow).

python -m jobs.score --model models:/lifecycle-ranker@champion --date 2022-05-08
python -m jobs.score --model models:/lifecycle-ranker/3 --date 2022-05-08 --set spark.master=yarn

Reads the day's raw log as the feature build does (same sessions and example ids), scores every
session and writes <lake>/<spec>/predictions (Delta, partitioned by date). Re-running a date
replaces its partition. The tracking store comes from --tracking-uri (default: the one in
conf/train.yaml).
"""

from __future__ import annotations

import datetime as dt
import json
import sys

from jobs._cli import job_parser, setup_logging


def main(argv: list[str] | None = None) -> int:
    p = job_parser("score", __doc__, "conf/pipeline.yaml")
    p.add_argument(
        "--model", required=True, help="models:/<name>@<alias>, models:/<name>/<v>, runs:/..."
    )
    p.add_argument("--date", required=True, help="YYYY-MM-DD")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: conf/train.yaml's)")
    p.add_argument("--spec-set", dest="spec_overrides", action="append", default=[])
    p.add_argument("--output", help="predictions table (default <lake>/<spec>/predictions)")
    args = p.parse_args(argv)
    setup_logging(args.verbose)

    from model.config import load_train_config
    from pipelines.config import load_config
    from pipelines.scoring import score_date
    from pipelines.spark import spark_session
    from pipelines.spec import SpecError, load_spec

    try:
        cfg = load_config(args.conf, args.overrides)
        spec = load_spec(cfg.spec, overrides=args.spec_overrides)
        date = dt.date.fromisoformat(args.date).isoformat()
        tracking = args.tracking_uri or load_train_config("conf/train.yaml").mlflow.tracking_uri
    except (SpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spark = spark_session(cfg.spark, "score")
    try:
        summary = score_date(
            spark, spec, cfg, args.model, date, tracking_uri=tracking, out_path=args.output
        )
    finally:
        spark.stop()
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
