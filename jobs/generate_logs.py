"""Generate a synthetic lifecycle log (see :mod:`pipelines.synthetic` for layout and model).

Example::

    python -m jobs.generate_logs --out /tmp/synth --users 50000 --items 100000 --days 14 \\
        --impressions-per-user-day 10 --start-date 2022-04-25 --seed 7
    python -m jobs.generate_logs --out /tmp/synth --events 1e7 --items 1e5 --days 14 \\
        --impressions-per-user-day 10 --start-date 2022-04-25 --seed 7

``--events`` picks the number of users (overriding ``--users``) so that the log holds roughly
that many event rows, measured on a pilot of the first users.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import math
import sys
import time
from collections.abc import Sequence

from pipelines.synthetic import Progress, SyntheticConfig, generate, users_for_events


def parse_count(text: str) -> int:
    """A non-negative count, accepting float notation: ``1e7``, ``2.5e6``, ``10_000``."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return int(round(value))


def _positive_count(text: str) -> int:
    value = parse_count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return value


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.generate_logs",
        description="Write a synthetic lifecycle interaction log (events, users, items, truth).",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--users", type=_positive_count, default=10_000, help="number of users")
    p.add_argument("--items", type=_positive_count, default=10_000, help="number of items")
    p.add_argument("--days", type=_positive_count, default=14, help="number of calendar days")
    p.add_argument(
        "--impressions-per-user-day",
        type=float,
        default=10.0,
        help="mean impressions per user-day at stage factor 1 (loyal users see more)",
    )
    p.add_argument(
        "--start-date", type=_date, default=dt.date(2022, 4, 25), help="YYYY-MM-DD (UTC)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--events",
        type=_positive_count,
        default=None,
        help="target number of event rows (e.g. 1e7); picks --users accordingly",
    )
    p.add_argument(
        "--chunk-users",
        type=_positive_count,
        default=200_000,
        help="users generated at once per day (bounds memory; does not change the content)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace generated data in --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class _Printer:
    """Progress lines, at most one every ``every_s`` seconds (plus the end of each day)."""

    def __init__(self, every_s: float = 2.0) -> None:
        self.every_s = every_s
        self._last = -math.inf
        self._last_day = -1

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        day_end = p.user_days_done == (p.day + 1) * (p.user_days_total // max(1, p.days))
        if now - self._last < self.every_s and not day_end:
            return
        self._last = now
        print(
            f"day {p.day + 1}/{p.days}  {p.rows_written:,} rows written  "
            f"{p.rows_per_s:,.0f} rows/s  {100 * p.fraction:5.1f}%  ETA {_fmt_eta(p.eta_s)}",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = SyntheticConfig(
        users=args.users,
        items=args.items,
        days=args.days,
        impressions_per_user_day=args.impressions_per_user_day,
        start_date=args.start_date,
        seed=args.seed,
        chunk_users=args.chunk_users,
    )
    try:
        config.validate()
        if args.events is not None:
            users = users_for_events(config, args.events)
            config = dataclasses.replace(config, users=users)
            print(f"--events {args.events:,}: {users:,} users", flush=True)
        manifest = generate(
            config, args.out, progress=None if args.quiet else _Printer(), overwrite=args.overwrite
        )
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = manifest["counts"]["events"]
    print(
        f"wrote {total['total']:,} events ({', '.join(f'{k} {v:,}' for k, v in total.items() if k != 'total')}) "
        f"for {config.users:,} users x {config.days} days to {args.out} "
        f"in {manifest['elapsed_s']:.1f}s ({manifest['events_per_s']:,.0f} events/s)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
