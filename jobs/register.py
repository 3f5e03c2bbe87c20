"""Register a training run's model; move the `champion` alias only if it beats the champion.

python -m jobs.register --run-dir out/train                    # the run in out/train/metrics.json
python -m jobs.register --run-id 3f2c... --set registry.metric=valid/click/gauc

The registry settings (name, validation metric, direction) and the tracking store come from
conf/train.yaml (registry.*, mlflow.*), each overridable with --set. Prints the decision as JSON
(both figures); exit code 0 whether or not the candidate was promoted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jobs._cli import job_parser, setup_logging


def main(argv: list[str] | None = None) -> int:
    p = job_parser("register", __doc__, "conf/train.yaml")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-dir", help="a training output_dir (its metrics.json names the run)")
    which.add_argument("--run-id", help="an MLflow run id")
    args = p.parse_args(argv)
    setup_logging(args.verbose)

    from model.config import load_train_config
    from model.lifecycle import register_candidate
    from pipelines.spec import SpecError

    try:
        cfg = load_train_config(args.conf, args.overrides)
        model_uri = None
        if args.run_dir:
            path = Path(args.run_dir) / "metrics.json"
            if not path.exists():
                raise ValueError(f"{path} does not exist: is {args.run_dir} a finished run?")
            info = json.loads(path.read_text())
            if not info.get("run_id"):
                raise ValueError(f"{path} names no MLflow run (trained with mlflow.enabled=false?)")
            run_id, model_uri = info["run_id"], info.get("model_uri")
        else:
            run_id = args.run_id
        decision = register_candidate(
            run_id,
            cfg.registry.model_name,
            cfg.registry.metric,
            greater_is_better=cfg.registry.greater_is_better,
            model_uri=model_uri,
            tracking_uri=cfg.mlflow.tracking_uri,
        )
    except (SpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(decision.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
