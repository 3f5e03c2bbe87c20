"""Train a ranking model on the examples table (STAN, its baselines) with TorchRec sharding.

torchrun --standalone --nproc-per-node 2 -m jobs.train                 # 2 processes (gloo/nccl)
python -m jobs.train --set model.name=ple --set train.max_steps=200    # one process
python -m jobs.train --set train.device=cuda --set model.embedding_dim=128 \\
    --set model.expert_hidden=[1024,512] --set train.batch_size=2048   # the paper's settings

Every config key (conf/train.yaml) can be overridden with --set; spec keys with --spec-set.
Re-running with the same output_dir resumes from its latest checkpoint (train.resume).
"""

from __future__ import annotations

import json
import sys

from jobs._cli import job_parser, setup_logging


def main(argv: list[str] | None = None) -> int:
    p = job_parser("train", __doc__, "conf/train.yaml")
    p.add_argument(
        "--spec-set",
        dest="spec_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a feature spec value",
    )
    args = p.parse_args(argv)
    setup_logging(args.verbose)

    from model.config import load_train_config
    from model.data import ExamplesTableError
    from model.trainer import train
    from pipelines.spec import SpecError

    try:
        cfg = load_train_config(args.conf, args.overrides)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(cfg, args.spec_overrides)
    except (SpecError, ExamplesTableError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.rank != 0:
        return 0
    print(
        json.dumps(
            {
                "output_dir": result.output_dir,
                "steps": result.steps,
                "run_id": result.run_id,
                "table_version": result.table_version,
                "samples_per_s": round(result.samples_per_s, 1),
                "metrics": {k: round(v, 5) for k, v in sorted(result.metrics.items())},
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
