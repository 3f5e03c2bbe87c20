"""The STAN paper's comparison on your data: every model, several seeds, a search on the valid
days only, a results table on the test days, all under one MLflow parent run.

python -m jobs.experiment --spec feature_specs/kuairand.yaml --models all --seeds 5
python -m jobs.experiment --models mlp_single,ple,stan --seeds 3 --search optim.lr=0.001,0.003
python -m jobs.experiment --models all --seeds 5 --set train.epochs=2 --set model.embedding_dim=32
python -m jobs.experiment --models all --seeds 5 --ablations      # + w/o Beta, DNN f, all-history,
                                                                  #   Stage_single

Every model gets the same budget: the config's embedding dim, hidden units, batch and epochs
(--set applies to all). Writes <out>/results.md, results.csv and runs.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs._cli import job_parser, setup_logging


def main(argv: list[str] | None = None) -> int:
    p = job_parser("experiment", __doc__, "conf/train.yaml")
    p.add_argument("--spec", help="feature spec YAML (default: the config's)")
    p.add_argument("--spec-set", dest="spec_overrides", action="append", default=[])
    p.add_argument("--models", default="all", help="comma list, or all")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    p.add_argument(
        "--search",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a hyper-parameter grid axis, searched on the valid days (repeatable)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=MODEL[,KEY=VALUE...]",
        help="an extra row: a model with config overrides, e.g. stan_dnn=stan,model.stan.f=dnn",
    )
    p.add_argument(
        "--ablations",
        action="store_true",
        help="add the paper's ablations: stan_no_beta, stan_dnn_f, stan_all_history, and "
        "Stage_single of stan (unless --stage-single names another model)",
    )
    p.add_argument(
        "--stage-single",
        metavar="MODEL",
        help="also train MODEL on each rule-based stage's rows alone (STAN's Stage_single)",
    )
    p.add_argument(
        "--no-stage-single", action="store_true", help="--ablations without Stage_single"
    )
    p.add_argument("--no-stage-analysis", action="store_true")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes per training (above 1: torchrun; 1: a fork of a preloaded server)",
    )
    p.add_argument("--out", default="out/experiment")
    args = p.parse_args(argv)
    setup_logging(args.verbose)

    from model.config import MODEL_NAMES, load_train_config
    from model.experiment import ABLATIONS, ExperimentPlan, run_experiment
    from pipelines.spec import SpecError

    overrides = list(args.overrides) + ([f"spec={args.spec}"] if args.spec else [])
    try:
        cfg = load_train_config(args.conf, overrides)
        models = list(MODEL_NAMES) if args.models == "all" else args.models.split(",")
        variants = {}
        for item in args.variant:
            name, _, rest = item.partition("=")
            model, *sets = rest.split(",")
            variants[name] = (model, sets)
        if args.ablations:
            variants |= ABLATIONS
            for extra in ("stan_no_beta", *ABLATIONS):
                if extra not in models:
                    models.append(extra)
        models += [v for v in variants if v not in models]
        search = {}
        for item in args.search:
            key, _, values = item.partition("=")
            if not values:
                raise ValueError(f"--search {item!r}: expected KEY=V1,V2")
            search[key] = values.split(",")
        plan = ExperimentPlan(
            models=models,
            seeds=list(range(args.seeds)),
            out_dir=Path(args.out),
            search=search,
            train_conf=args.conf,
            overrides=overrides,
            spec_overrides=args.spec_overrides,
            nproc=args.nproc,
            variants=variants,
            stage_analysis=not args.no_stage_analysis,
            stage_single=None
            if args.no_stage_single
            else args.stage_single or ("stan" if args.ablations else None),
        )
    except (SpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run_experiment(plan, cfg)
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
