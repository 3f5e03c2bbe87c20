"""Shared bits of the job entry points: logging, config loading with overrides."""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("py4j", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def job_parser(module: str, doc: str | None, default_conf: str) -> argparse.ArgumentParser:
    """The parser of ``python -m jobs.<module>``: its docstring as help, --conf / --set / -v."""
    p = argparse.ArgumentParser(
        prog=f"python -m jobs.{module}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p, default_conf)
    return p


def add_config_args(p: argparse.ArgumentParser, default_conf: str) -> None:
    p.add_argument("--conf", default=default_conf, help=f"YAML config (default {default_conf})")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set spark.master=yarn (repeatable)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
