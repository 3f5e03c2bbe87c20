"""Synthetic lifecycle-aware interaction logs: the test and benchmark source at any scale.

The generator writes an event stream (one row per impression, click, stay and purchase), user and
item side tables, the hidden per-day lifecycle stage of every user, and a manifest. Everything is
vectorised numpy, generated day by day and users in chunks, so memory stays bounded by one
chunk-day of events whatever the total size.

Output layout (the contract the feature pipeline reads)::

    DIR/events/date=YYYY-MM-DD/part-00000.parquet   (part-00001... when a day exceeds
                                                     ``max_rows_per_file``)
        event_id int64, impression_id int64, user_id int64, item_id int64,
        event_type string (impression|click|stay|purchase), event_time_ms int64 (UTC epoch ms),
        dwell_s float64 (seconds for stay events, null otherwise)
    DIR/users.parquet   user_id int64, register_days int64, age_bucket string, device string,
                        city_tier int64
    DIR/items.parquet   item_id int64, category string, author_id int64, duration_s float64,
                        popularity float64
    DIR/truth/user_stage/date=YYYY-MM-DD/part-00000.parquet   user_id int64, stage string
    DIR/manifest.json   parameters, seed, model constants, row counts per day and event type

A row lives in the folder of the UTC calendar day of its ``event_time_ms``: an action of an
impression shown at 23:59:50 can land in the next day's folder. Actions falling after the last
day are not written (the log is an export of ``days`` calendar days); the manifest counts them
under ``dropped_after_end``. Rows within a day are not sorted by time.

Generative model
----------------
*Items.* ``items`` items in ``n_categories`` categories (category shares ~ Dirichlet(2)). The
popularity of the item of popularity rank ``r`` is ``(r + 1) ** -zipf_exponent`` (ranks randomly
assigned to ids), normalised to sum to 1 (the ``popularity`` column). Each item has an author
(authors themselves Zipf-like), a duration (log-normal around a per-category median, 3-900 s) and
a hidden quality multiplier of its click rate (log-normal, mean 1).

*Users.* ``new_user_share`` of the users registered in the last 7 days (``register_days`` 0-6)
and start in stage ``new`` (10 % already ``wandering``); the others (tenure log-normal, median
~300 days) start ``wandering``/``sticky``/``loyal`` with longer tenure making ``loyal`` likelier.
Hidden per-user traits: a preferred category (drawn by category popularity), an activity
multiplier and a click multiplier (log-normal, mean 1), a purchase multiplier (from device and
city tier), and a peak hour (evening, some at lunch time). ``age_bucket``, ``device`` and
``city_tier`` are observable side information.

*Lifecycle.* Each day after the first, every user moves with the row of ``transition`` for their
stage (new -> wandering/sticky, wandering <-> sticky, sticky -> loyal, loyal mostly stays and
sometimes churns back to wandering/sticky). A user still ``new`` 14 days after registering leaves
the stage for sure (to wandering or sticky).

*Impressions.* On a day, a user is active with probability ``active_prob[stage]``; an active user
gets ``Poisson(F * impression_factor[stage] * activity / active_prob[stage])`` impressions (``F``
= ``impressions_per_user_day``), so ``F * impression_factor[stage]`` is the stage's mean per
user-day, loyal users seeing the most. Times follow the user's peak hour (normal, sd 2.5 h).
Items are drawn by popularity; ``preferred_category_share`` of the impressions are drawn from the
user's preferred category instead (a personalised recommender).

*Actions.* An impression is clicked with probability ``base_ctr[stage] * click_mult(user) *
quality(item)``, times ``affinity_boost`` when the item is of the user's preferred category
(capped at 0.95); the click follows 1-61 s later. A click always leads to a ``stay``: total dwell
``duration * watch_fraction[stage] * LogNormal(0, dwell_sigma)`` (0.5 s to min(3 x duration,
1500 s)), logged when the dwell ends; with ``second_stay_prob`` it is split into two ``stay``
events of the same impression whose ``dwell_s`` sum to the total. A click is followed by a
``purchase`` with ``purchase_given_click[stage] * purchase_mult(user)``. Normal actions arrive
within 30 minutes of their impression; with ``late_action_prob`` (~0.5 %) all the actions of a
clicked impression arrive late: shifted together by 30 min to 6 h, beyond a 30-minute
attribution window (so a click always precedes its stays and purchase). At the end of the log,
a stay or purchase can fall after the last day while its click does not; the reverse cannot
happen, so every stay and purchase in the log has its click.

Ids and determinism
-------------------
``user_id`` and ``item_id`` run from 1 (0 is free for padding). ``impression_id`` packs
``((day << 32 | user_id) << 19) | (k << 3)`` for the k-th impression of that user-day and
``event_id = impression_id + slot`` (0 impression, 1 click, 2 first stay, 3 second stay,
4 purchase): positive, unique and deterministic without any global counter (hence the limits:
< 2**32 users, <= 4096 days, <= 65535 impressions per user-day). Randomness comes from ``np.random.SeedSequence(seed,
spawn_key=(domain, day, block))`` for fixed blocks of ``rng_block_users`` users, so the content
(rows and their order) depends on the parameters and seed but not on ``chunk_users`` or
``max_rows_per_file``, and the first full blocks of users are identical whatever ``users`` is.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

GENERATOR_VERSION = 1

STAGES: tuple[str, ...] = ("new", "wandering", "sticky", "loyal")
EVENT_TYPES: tuple[str, ...] = ("impression", "click", "stay", "purchase")
AGE_BUCKETS: tuple[str, ...] = ("<18", "18-24", "25-34", "35-44", "45-54", "55+")
DEVICES: tuple[str, ...] = ("android", "ios", "web")
CATEGORY_NAMES: tuple[str, ...] = (
    "comedy",
    "music",
    "food",
    "gaming",
    "sports",
    "beauty",
    "pets",
    "travel",
    "education",
    "news",
    "fashion",
    "tech",
    "dance",
    "cars",
    "parenting",
    "film",
)

DAY_MS = 86_400_000
ATTRIBUTION_WINDOW_MS = 30 * 60 * 1000

EVENTS_SCHEMA = pa.schema(
    [
        ("event_id", pa.int64()),
        ("impression_id", pa.int64()),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("event_type", pa.string()),
        ("event_time_ms", pa.int64()),
        ("dwell_s", pa.float64()),
    ]
)
USERS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("register_days", pa.int64()),
        ("age_bucket", pa.string()),
        ("device", pa.string()),
        ("city_tier", pa.int64()),
    ]
)
ITEMS_SCHEMA = pa.schema(
    [
        ("item_id", pa.int64()),
        ("category", pa.string()),
        ("author_id", pa.int64()),
        ("duration_s", pa.float64()),
        ("popularity", pa.float64()),
    ]
)
TRUTH_SCHEMA = pa.schema([("user_id", pa.int64()), ("stage", pa.string())])

# Seed-sequence domains: items, user traits, day-blocks of users.
_DOMAIN_ITEMS, _DOMAIN_USERS, _DOMAIN_DAYS = 0, 1, 2

# impression_id = ((day << 32 | user_id) << 19) | (k << 3); event_id = impression_id + slot.
_SLOT_BITS = 3
_SEQ_BITS = 16
_USER_BITS = 32
_DAY_BITS = 12
MAX_IMPRESSIONS_PER_USER_DAY = (1 << _SEQ_BITS) - 1
MAX_USERS = (1 << _USER_BITS) - 1
MAX_DAYS = 1 << _DAY_BITS
_SLOT_IMPRESSION, _SLOT_CLICK, _SLOT_STAY1, _SLOT_STAY2, _SLOT_PURCHASE = 0, 1, 2, 3, 4
_T_IMPRESSION, _T_CLICK, _T_STAY, _T_PURCHASE = 0, 1, 2, 3

# A user still `new` this many days after registering leaves the stage (row 4 of the matrix).
_NEW_STAGE_MAX_DAYS = 14
_NEW_EXIT_ROW = (0.0, 0.6, 0.4, 0.0)
_DEVICE_PURCHASE = np.array([1.0, 1.5, 0.8])
_TIER_PURCHASE = np.array([1.3, 1.15, 1.0, 0.9, 0.8])
_HOUR_MS = 3_600_000
_IMPRESSION_HOUR_SD = 2.5

_EVENT_TYPE_DICT = pa.array(EVENT_TYPES, pa.string())
_STAGE_DICT = pa.array(STAGES, pa.string())
_AGE_DICT = pa.array(AGE_BUCKETS, pa.string())
_DEVICE_DICT = pa.array(DEVICES, pa.string())

_EVENT_COLUMNS = tuple(EVENTS_SCHEMA.names)


@dataclass(frozen=True)
class BehaviourModel:
    """Constants of the generative model; stage-indexed tuples follow :data:`STAGES`."""

    # Daily stage transition matrix, rows = from, columns = to (new, wandering, sticky, loyal).
    transition: tuple[tuple[float, float, float, float], ...] = (
        (0.85, 0.09, 0.06, 0.00),
        (0.00, 0.92, 0.08, 0.00),
        (0.00, 0.06, 0.89, 0.05),
        (0.00, 0.03, 0.02, 0.95),
    )
    new_user_share: float = 0.2
    active_prob: tuple[float, float, float, float] = (0.75, 0.35, 0.80, 0.95)
    impression_factor: tuple[float, float, float, float] = (0.7, 0.4, 1.0, 1.6)
    base_ctr: tuple[float, float, float, float] = (0.06, 0.04, 0.09, 0.13)
    purchase_given_click: tuple[float, float, float, float] = (0.01, 0.005, 0.02, 0.04)
    watch_fraction: tuple[float, float, float, float] = (0.30, 0.25, 0.45, 0.60)
    dwell_sigma: float = 0.7
    second_stay_prob: float = 0.15
    late_action_prob: float = 0.005
    preferred_category_share: float = 0.3
    affinity_boost: float = 2.0
    zipf_exponent: float = 1.05
    n_categories: int = 16
    items_per_author: float = 25.0

    def validate(self) -> None:
        """Raise ``ValueError`` on an inconsistent model."""
        if len(self.transition) != len(STAGES):
            raise ValueError("transition must have one row per stage")
        for i, row in enumerate(self.transition):
            if len(row) != len(STAGES) or min(row) < 0 or not math.isclose(sum(row), 1.0):
                raise ValueError(
                    f"transition row {i} ({STAGES[i]}) must be 4 probabilities summing to 1"
                )
        for name in ("active_prob", "impression_factor", "base_ctr", "purchase_given_click"):
            v = getattr(self, name)
            if len(v) != len(STAGES) or min(v) < 0:
                raise ValueError(f"{name} must hold 4 non-negative values")
        if min(self.active_prob) <= 0 or max(self.active_prob) > 1:
            raise ValueError("active_prob values must be in (0, 1]")
        if len(self.watch_fraction) != len(STAGES) or min(self.watch_fraction) <= 0:
            raise ValueError("watch_fraction must hold 4 positive values")
        for name in (
            "new_user_share",
            "second_stay_prob",
            "late_action_prob",
            "preferred_category_share",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability")
        if not 1 <= self.n_categories <= 1000:
            raise ValueError("n_categories must be in [1, 1000]")
        if self.items_per_author <= 0 or self.affinity_boost < 0 or self.dwell_sigma < 0:
            raise ValueError("items_per_author must be > 0, affinity_boost and dwell_sigma >= 0")


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate. Content depends on every field but ``chunk_users``,
    ``max_rows_per_file`` and ``compression``."""

    users: int
    items: int
    days: int
    impressions_per_user_day: float
    start_date: dt.date
    seed: int
    chunk_users: int = 200_000
    rng_block_users: int = 4096
    max_rows_per_file: int = 25_000_000
    compression: str = "snappy"
    model: BehaviourModel = field(default_factory=BehaviourModel)

    def validate(self) -> None:
        """Raise ``ValueError`` on parameters outside what the generator supports."""
        if not 1 <= self.users <= MAX_USERS:
            raise ValueError(f"users must be in [1, {MAX_USERS}]")
        if self.items < 1:
            raise ValueError("items must be >= 1")
        if not 1 <= self.days <= MAX_DAYS:
            raise ValueError(f"days must be in [1, {MAX_DAYS}]")
        if not (
            self.impressions_per_user_day >= 0 and math.isfinite(self.impressions_per_user_day)
        ):
            raise ValueError("impressions_per_user_day must be a finite number >= 0")
        if self.seed < 0:
            raise ValueError("seed must be >= 0")
        if self.chunk_users < 1 or self.rng_block_users < 1 or self.max_rows_per_file < 1:
            raise ValueError("chunk_users, rng_block_users and max_rows_per_file must be >= 1")
        if self.start_date < dt.date(1970, 1, 1):
            raise ValueError("start_date must not be before 1970-01-01")
        self.model.validate()

    @property
    def effective_chunk_users(self) -> int:
        """``chunk_users`` rounded up to a whole number of RNG blocks."""
        b = self.rng_block_users
        return -(-self.chunk_users // b) * b

    @property
    def start_ms(self) -> int:
        """Epoch milliseconds of ``start_date`` 00:00 UTC."""
        return (self.start_date - dt.date(1970, 1, 1)).days * DAY_MS

    def date(self, day: int) -> dt.date:
        """Calendar date of day index ``day``."""
        return self.start_date + dt.timedelta(days=day)


@dataclass(frozen=True)
class Progress:
    """Reported after every chunk-day written."""

    day: int
    days: int
    rows_written: int
    user_days_done: int
    user_days_total: int
    elapsed_s: float

    @property
    def fraction(self) -> float:
        """Share of the user-days generated so far."""
        return self.user_days_done / max(1, self.user_days_total)

    @property
    def rows_per_s(self) -> float:
        return self.rows_written / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float:
        """Seconds left, extrapolated from the share of user-days done."""
        f = self.fraction
        return self.elapsed_s * (1.0 - f) / f if f > 0 else float("inf")


@dataclass
class ItemCatalog:
    """Items and the popularity sampler (a cumulative weight table ordered by category)."""

    category: np.ndarray  # int16 code per item index
    author_id: np.ndarray  # int64
    duration_s: np.ndarray  # float64
    popularity: np.ndarray  # float64, sums to 1
    quality: np.ndarray  # float64 click-rate multiplier, mean 1
    category_names: tuple[str, ...]
    category_mass: np.ndarray  # float64 popularity share of each category
    _order: np.ndarray  # item index at each position of the cumulative table
    _cum: np.ndarray  # cumulative popularity, ordered by category
    _lo: np.ndarray  # per category code (+1 sentinel = whole catalogue): lower cumulative bound
    _hi: np.ndarray
    _scale: float  # guide table, see _guide
    _guide_lo: np.ndarray
    _guide_hi: np.ndarray

    def table(self) -> pa.Table:
        """``items.parquet`` content."""
        cat = pa.DictionaryArray.from_arrays(
            pa.array(self.category.astype(np.int32)), pa.array(self.category_names, pa.string())
        ).cast(pa.string())
        return pa.Table.from_arrays(
            [
                pa.array(np.arange(1, len(self.category) + 1, dtype=np.int64)),
                cat,
                pa.array(self.author_id),
                pa.array(self.duration_s),
                pa.array(self.popularity),
            ],
            schema=ITEMS_SCHEMA,
        )

    def sample(self, u: np.ndarray, category_code: np.ndarray) -> np.ndarray:
        """Item indices by popularity; ``category_code`` = category, or ``n_categories`` for all.

        ``u`` are uniforms in [0, 1), one per draw. Inverse-CDF sampling on the cumulative
        table; a guide table narrows each search to a few positions (O(1) expected, instead of
        a cache-missing binary search over the whole catalogue).
        """
        lo_c = self._lo[category_code]
        target = lo_c + u * (self._hi[category_code] - lo_c)
        return self._search(target)

    def _search(self, target: np.ndarray) -> np.ndarray:
        """``searchsorted(cum, target, 'right')`` clipped to the last position."""
        last = len(self._cum) - 1
        bucket = (target * self._scale).astype(np.int64)
        np.minimum(bucket, len(self._guide_lo) - 1, out=bucket)
        pos = np.minimum(self._guide_lo[bucket], last).astype(np.int64)
        hi = np.minimum(self._guide_hi[bucket], last).astype(np.int64)
        idx = np.flatnonzero(pos < hi)
        lo, hi, t = pos[idx], hi[idx], target[idx]
        while len(idx):
            mid = (lo + hi) >> 1
            right = self._cum[mid] <= t
            lo = np.where(right, mid + 1, lo)
            hi = np.where(right, hi, mid)
            done = lo >= hi
            if done.any():
                pos[idx[done]] = lo[done]
                keep = ~done
                idx, lo, hi, t = idx[keep], lo[keep], hi[keep], t[keep]
        return self._order[pos]


def _guide(cum: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Guide table over ``cum``: for bucket ``b(x) = min(floor(x * scale), K - 1)`` of a target
    ``x``, the position answering ``x`` lies in ``[lo[b], hi[b]]``.

    The position ``p`` answering ``x`` has ``cum[p - 1] <= x < cum[p]``; ``b`` is monotone, so
    ``b(cum[p]) >= b(x) >= b(cum[p - 1])``, which bounds ``p`` from both sides exactly (the same
    float expression buckets the table and the targets).
    """
    n = len(cum)
    k = int(min(1 << 22, 1 << max(1, math.ceil(math.log2(2 * n)))))
    scale = k / cum[-1]
    b_end = np.minimum((cum * scale).astype(np.int64), k - 1)
    b_start = np.minimum((np.concatenate([[0.0], cum[:-1]]) * scale).astype(np.int64), k - 1)
    buckets = np.arange(k)
    dtype = np.int32 if n < (1 << 31) else np.int64
    lo = np.searchsorted(b_end, buckets, side="left").astype(dtype)
    hi = (np.searchsorted(b_start, buckets, side="right") - 1).astype(dtype)
    return float(scale), lo, hi


@dataclass
class UserBlock:
    """Traits of one RNG block of users (indices ``start .. start + n - 1``, ids from 1)."""

    start: int
    n: int
    register_days: np.ndarray  # int64
    age_bucket: np.ndarray  # int8 code
    device: np.ndarray  # int8 code
    city_tier: np.ndarray  # int64, 1..5
    initial_stage: np.ndarray  # int8 code
    preferred_category: np.ndarray  # int64 code
    activity: np.ndarray  # float64
    click_mult: np.ndarray  # float64
    purchase_mult: np.ndarray  # float64
    peak_hour: np.ndarray  # float64

    @property
    def user_index(self) -> np.ndarray:
        return np.arange(self.start, self.start + self.n, dtype=np.int64)

    def table(self) -> pa.Table:
        """``users.parquet`` rows of this block."""
        return pa.Table.from_arrays(
            [
                pa.array(self.user_index + 1),
                pa.array(self.register_days),
                _decode(self.age_bucket, _AGE_DICT),
                _decode(self.device, _DEVICE_DICT),
                pa.array(self.city_tier),
            ],
            schema=USERS_SCHEMA,
        )


@dataclass
class BlockDay:
    """One RNG block on one day: stages, rows of that day, rows spilling to later days."""

    stage: np.ndarray
    today: list[dict[str, np.ndarray]]
    spill: dict[int, dict[str, np.ndarray]]


def _decode(codes: np.ndarray, dictionary: pa.Array) -> pa.Array:
    """Small-int codes -> Arrow string array."""
    return pa.DictionaryArray.from_arrays(pa.array(codes), dictionary).cast(pa.string())


def _lognormal_mean1(rng: np.random.Generator, sigma: float, n: int) -> np.ndarray:
    return rng.lognormal(-0.5 * sigma * sigma, sigma, n)


class Simulator:
    """The generative model, addressable by (day, block) so any piece can be regenerated alone."""

    def __init__(self, config: SyntheticConfig) -> None:
        config.validate()
        self.config = config
        self.model = config.model
        m = self.model
        self.items = self._build_items()
        trans = np.array(list(m.transition) + [_NEW_EXIT_ROW], dtype=np.float64)
        self._cum_trans = np.cumsum(trans, axis=1)[:, :3]
        self._active = np.array(m.active_prob)
        self._lam_factor = (
            config.impressions_per_user_day * np.array(m.impression_factor) / self._active
        )
        self._ctr = np.array(m.base_ctr)
        self._purchase = np.array(m.purchase_given_click)
        self._watch = np.array(m.watch_fraction)
        self.n_blocks = -(-config.users // config.rng_block_users)

    # --- randomness -------------------------------------------------------------------------
    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.Generator(
            np.random.PCG64(np.random.SeedSequence(self.config.seed, spawn_key=key))
        )

    # --- items ------------------------------------------------------------------------------
    def _build_items(self) -> ItemCatalog:
        m, n = self.model, self.config.items
        rng = self._rng(_DOMAIN_ITEMS)
        k = m.n_categories
        names = tuple(
            CATEGORY_NAMES[i] if i < len(CATEGORY_NAMES) else f"category_{i:03d}" for i in range(k)
        )
        share = rng.dirichlet(np.full(k, 2.0))
        category = np.searchsorted(np.cumsum(share), rng.random(n) * share.sum(), side="right")
        category = np.minimum(category, k - 1).astype(np.int16)
        item_of_rank = rng.permutation(n)  # popularity rank r -> item index
        popularity = np.empty(n)
        weight = np.arange(1.0, n + 1.0) ** -m.zipf_exponent
        popularity[item_of_rank] = weight / weight.sum()
        # Authors: rank floor(n_auth * u**2.5) has density ~ rank**-0.6 (a few prolific ones).
        n_auth = max(1, round(n / m.items_per_author))
        author_rank = np.minimum((n_auth * rng.random(n) ** 2.5).astype(np.int64), n_auth - 1)
        author_id = rng.permutation(n_auth)[author_rank] + 1
        cat_median = rng.uniform(15.0, 120.0, k)
        duration = np.clip(cat_median[category] * rng.lognormal(0.0, 0.6, n), 3.0, 900.0)
        duration = np.round(duration, 1)
        quality = _lognormal_mean1(rng, 0.35, n)

        # Cumulative table ordered by category, then by descending popularity, so that most
        # draws end in the (cache-hot) head of a category.
        order = item_of_rank[np.argsort(category[item_of_rank], kind="stable")]
        cum = np.cumsum(popularity[order])
        cum_excl = np.concatenate([[0.0], cum])
        counts = np.bincount(category, minlength=k)
        ends = np.cumsum(counts)
        starts = ends - counts
        lo = np.concatenate([cum_excl[starts], [0.0]])
        hi = np.concatenate([cum_excl[ends], [cum[-1]]])
        scale, guide_lo, guide_hi = _guide(cum)
        return ItemCatalog(
            category=category,
            author_id=author_id.astype(np.int64),
            duration_s=duration,
            popularity=popularity,
            quality=quality,
            category_names=names,
            category_mass=(hi - lo)[:k],
            _order=order.astype(np.int64),
            _cum=cum,
            _lo=lo,
            _hi=hi,
            _scale=scale,
            _guide_lo=guide_lo,
            _guide_hi=guide_hi,
        )

    # --- users ------------------------------------------------------------------------------
    def user_block(self, block: int) -> UserBlock:
        """Traits of block ``block``; drawn for a full block, then cut at ``users``."""
        cfg, m = self.config, self.model
        size = cfg.rng_block_users
        start = block * size
        n = min(size, cfg.users - start)
        rng = self._rng(_DOMAIN_USERS, block)

        is_new = rng.random(size) < m.new_user_share
        tenure = 7 + np.minimum(rng.lognormal(np.log(300.0), 1.0, size), 3650.0).astype(np.int64)
        register_days = np.where(is_new, rng.integers(0, 7, size), tenure)
        u = rng.random(size)
        p_loyal = 0.15 + 0.25 * np.minimum(register_days / 730.0, 1.0)
        p_wandering = 0.65 - p_loyal
        old_stage = np.where(u < p_wandering, 1, np.where(u < p_wandering + 0.35, 2, 3))
        new_stage = np.where(u < 0.9, 0, 1)
        initial_stage = np.where(is_new, new_stage, old_stage).astype(np.int8)

        age = rng.choice(len(AGE_BUCKETS), size, p=[0.08, 0.27, 0.30, 0.18, 0.10, 0.07])
        device = rng.choice(len(DEVICES), size, p=[0.62, 0.33, 0.05])
        tier = rng.choice(5, size, p=[0.12, 0.25, 0.28, 0.20, 0.15])
        mass = self.items.category_mass
        preferred = rng.choice(len(mass), size, p=mass / mass.sum())
        activity = _lognormal_mean1(rng, 0.5, size)
        click_mult = _lognormal_mean1(rng, 0.3, size)
        lunch = rng.random(size) < 0.3
        peak = np.where(lunch, rng.normal(12.5, 1.5, size), rng.normal(20.5, 2.0, size))
        s = slice(0, n)
        return UserBlock(
            start=start,
            n=n,
            register_days=register_days[s].astype(np.int64),
            age_bucket=age[s].astype(np.int8),
            device=device[s].astype(np.int8),
            city_tier=(tier[s] + 1).astype(np.int64),
            initial_stage=initial_stage[s],
            preferred_category=preferred[s].astype(np.int64),
            activity=activity[s],
            click_mult=click_mult[s],
            purchase_mult=(_DEVICE_PURCHASE[device] * _TIER_PURCHASE[tier])[s],
            peak_hour=peak[s],
        )

    # --- one block on one day ---------------------------------------------------------------
    def block_day(self, day: int, block: UserBlock, prev_stage: np.ndarray | None) -> BlockDay:
        """Stages and events of ``block`` on day index ``day``.

        ``prev_stage`` is the block's stage on the previous day (ignored on day 0, where the
        initial stage applies).
        """
        cfg, m, items = self.config, self.model, self.items
        rng = self._rng(_DOMAIN_DAYS, day, block.start // cfg.rng_block_users)
        n_users = block.n

        # Stage of the day.
        u_stage = rng.random(n_users)
        if day == 0 or prev_stage is None:
            stage = block.initial_stage.copy()
        else:
            row = prev_stage.astype(np.int64)
            forced = (prev_stage == 0) & (block.register_days + day >= _NEW_STAGE_MAX_DAYS)
            row[forced] = len(STAGES)
            stage = (u_stage[:, None] >= self._cum_trans[row]).sum(axis=1).astype(np.int8)

        # Impressions per user.
        active = rng.random(n_users) < self._active[stage]
        lam = self._lam_factor[stage] * block.activity
        n_imp = rng.poisson(lam)
        n_imp = np.where(active, np.minimum(n_imp, MAX_IMPRESSIONS_PER_USER_DAY), 0)
        total = int(n_imp.sum())

        user_local = np.repeat(np.arange(n_users), n_imp)
        first = np.cumsum(n_imp) - n_imp
        seq = np.arange(total, dtype=np.int64) - np.repeat(first, n_imp)
        block_user_id = block.user_index + 1
        base = ((np.int64(day) << _USER_BITS) | block_user_id) << (_SEQ_BITS + _SLOT_BITS)
        imp_id = base[user_local] + (seq << _SLOT_BITS) + _SLOT_IMPRESSION
        user_id = block_user_id[user_local]

        # Items: popularity, or popularity within the preferred category.
        pref = block.preferred_category[user_local]
        use_pref = rng.random(total) < m.preferred_category_share
        code = np.where(use_pref, pref, m.n_categories)
        item = items.sample(rng.random(total), code)

        # Times around the user's peak hour.
        hour = block.peak_hour[user_local] + rng.normal(0.0, _IMPRESSION_HOUR_SD, total)
        offset = (np.mod(hour, 24.0) * _HOUR_MS).astype(np.int64)
        np.minimum(offset, DAY_MS - 1, out=offset)
        imp_t = cfg.start_ms + day * DAY_MS + offset

        # Clicks.
        p_user = self._ctr[stage] * block.click_mult
        p = p_user[user_local] * items.quality[item]
        p *= np.where(items.category[item] == pref, m.affinity_boost, 1.0)
        clicked = np.flatnonzero(rng.random(total) < np.minimum(p, 0.95))
        n_click = len(clicked)
        c_user = user_local[clicked]
        c_stage = stage[c_user]
        c_item = item[clicked]
        c_imp = imp_id[clicked]
        c_uid = user_id[clicked]
        c_iid = c_item + 1
        click_t = (
            imp_t[clicked]
            + 1000
            + np.minimum(rng.exponential(4000.0, n_click), 60_000.0).astype(np.int64)
        )
        # Late arrivals: all actions of a few impressions come beyond the attribution window
        # (shifting the whole chain keeps click <= stay and click <= purchase).
        late = np.flatnonzero(rng.random(n_click) < m.late_action_prob)
        click_t[late] += (
            ATTRIBUTION_WINDOW_MS + 1000 + (rng.random(len(late)) * 5.5 * _HOUR_MS).astype(np.int64)
        )

        # Stays: total dwell, sometimes split in two.
        dur = items.duration_s[c_item]
        dwell = dur * self._watch[c_stage] * rng.lognormal(0.0, m.dwell_sigma, n_click)
        dwell = np.round(np.clip(dwell, 0.5, np.minimum(3.0 * dur, 1500.0)), 3)
        two = rng.random(n_click) < m.second_stay_prob
        frac = rng.uniform(0.2, 0.8, n_click)
        d1 = np.where(two, np.round(dwell * frac, 3), dwell)
        d2 = np.round(dwell - d1, 3)[two]
        gap = np.minimum(rng.exponential(10_000.0, n_click), 120_000.0).astype(np.int64)
        stay1_t = click_t + np.round(d1 * 1000.0).astype(np.int64)
        stay2_t = stay1_t[two] + gap[two] + np.round(d2 * 1000.0).astype(np.int64)

        # Purchases.
        p_buy = self._purchase[c_stage] * block.purchase_mult[c_user]
        bought = rng.random(n_click) < p_buy
        n_buy = int(bought.sum())
        delay = np.minimum(rng.exponential(60_000.0, n_buy), 600_000.0).astype(np.int64)
        buy_t = click_t[bought] + 2000 + delay

        n_two = int(two.sum())
        act_imp = np.concatenate([c_imp, c_imp, c_imp[two], c_imp[bought]])
        slot = np.concatenate(
            [
                np.full(n_click, _SLOT_CLICK),
                np.full(n_click, _SLOT_STAY1),
                np.full(n_two, _SLOT_STAY2),
                np.full(n_buy, _SLOT_PURCHASE),
            ]
        )
        nan_c = np.full(n_click, np.nan)
        actions = {
            "event_id": act_imp + slot,
            "impression_id": act_imp,
            "user_id": np.concatenate([c_uid, c_uid, c_uid[two], c_uid[bought]]),
            "item_id": np.concatenate([c_iid, c_iid, c_iid[two], c_iid[bought]]),
            "event_type": np.concatenate(
                [
                    np.full(n_click, _T_CLICK, np.int8),
                    np.full(n_click + n_two, _T_STAY, np.int8),
                    np.full(n_buy, _T_PURCHASE, np.int8),
                ]
            ),
            "event_time_ms": np.concatenate([click_t, stay1_t, stay2_t, buy_t]),
            "dwell_s": np.concatenate([nan_c, d1, d2, np.full(n_buy, np.nan)]),
        }

        impressions = {
            "event_id": imp_id,
            "impression_id": imp_id,
            "user_id": user_id,
            "item_id": item + 1,
            "event_type": np.full(total, _T_IMPRESSION, np.int8),
            "event_time_ms": imp_t,
            "dwell_s": np.full(total, np.nan),
        }

        # Actions past midnight belong to a later day's folder.
        act_day = (actions["event_time_ms"] - cfg.start_ms) // DAY_MS
        spill: dict[int, dict[str, np.ndarray]] = {}
        later = act_day > day
        if later.any():
            keep = ~later
            for d in np.unique(act_day[later]).tolist():
                sel = act_day == d
                spill[int(d)] = {k: v[sel] for k, v in actions.items()}
            actions = {k: v[keep] for k, v in actions.items()}
        return BlockDay(stage=stage, today=[impressions, actions], spill=spill)


# --- tables and files ---------------------------------------------------------------------


def _concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in _EVENT_COLUMNS}


def _events_table(cols: dict[str, np.ndarray]) -> pa.Table:
    dwell = cols["dwell_s"]
    return pa.Table.from_arrays(
        [
            pa.array(cols["event_id"]),
            pa.array(cols["impression_id"]),
            pa.array(cols["user_id"]),
            pa.array(cols["item_id"]),
            _decode(cols["event_type"], _EVENT_TYPE_DICT),
            pa.array(cols["event_time_ms"]),
            pa.array(dwell, type=pa.float64(), mask=np.isnan(dwell)),
        ],
        schema=EVENTS_SCHEMA,
    )


def _type_counts(cols: dict[str, np.ndarray]) -> np.ndarray:
    return np.bincount(cols["event_type"], minlength=len(EVENT_TYPES)).astype(np.int64)


class _PartWriter:
    """Parquet parts of one folder: part-00000.parquet, rolling over at ``max_rows``."""

    def __init__(
        self,
        folder: Path,
        schema: pa.Schema,
        max_rows: int,
        compression: str,
        dictionary: list[str],
    ) -> None:
        self.folder, self.schema, self.max_rows = folder, schema, max_rows
        self.compression, self.dictionary = compression, dictionary
        folder.mkdir(parents=True, exist_ok=True)
        self.part = 0
        self.rows_in_part = 0
        self.rows = 0
        self._writer = self._open()

    def _open(self) -> pq.ParquetWriter:
        return pq.ParquetWriter(
            self.folder / f"part-{self.part:05d}.parquet",
            self.schema,
            compression=self.compression,
            use_dictionary=self.dictionary,
        )

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self.rows_in_part > 0 and self.rows_in_part + table.num_rows > self.max_rows:
            self._writer.close()
            self.part += 1
            self.rows_in_part = 0
            self._writer = self._open()
        self._writer.write_table(table)
        self.rows_in_part += table.num_rows
        self.rows += table.num_rows

    def close(self) -> None:
        self._writer.close()


def _day_dir(root: Path, date: dt.date) -> Path:
    return root / f"date={date.isoformat()}"


def _prepare_out(out: Path, overwrite: bool) -> None:
    owned = [out / "events", out / "truth", out / "users.parquet", out / "items.parquet"]
    manifest = out / "manifest.json"
    existing = [p for p in [*owned, manifest] if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds generated data ({existing[0].name}); use overwrite"
        )
    for p in existing:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _counts_dict(counts: np.ndarray) -> dict[str, int]:
    d = {name: int(c) for name, c in zip(EVENT_TYPES, counts, strict=True)}
    d["total"] = int(counts.sum())
    return d


def generate(
    config: SyntheticConfig,
    out_dir: str | os.PathLike[str],
    *,
    progress: Callable[[Progress], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the synthetic log to ``out_dir``; return the manifest (also written last).

    Memory holds one chunk-day of events, the previous day's spill past midnight and one stage
    byte per user.
    """
    t0 = time.perf_counter()
    sim = Simulator(config)
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    cfg = config
    n_users, n_days = cfg.users, cfg.days
    chunk = cfg.effective_chunk_users
    bpc = chunk // cfg.rng_block_users
    chunks = [range(s, min(s + bpc, sim.n_blocks)) for s in range(0, sim.n_blocks, bpc)]

    pq.write_table(sim.items.table(), out / "items.parquet", compression=cfg.compression)
    stage = np.empty(n_users, np.int8)
    with pq.ParquetWriter(out / "users.parquet", USERS_SCHEMA, compression=cfg.compression) as w:
        for blocks in chunks:
            ubs = [sim.user_block(b) for b in blocks]
            for ub in ubs:
                stage[ub.start : ub.start + ub.n] = ub.initial_stage
            w.write_table(pa.concat_tables([ub.table() for ub in ubs]))

    by_day: dict[str, dict[str, int]] = {}
    totals = np.zeros(len(EVENT_TYPES), np.int64)
    dropped = np.zeros(len(EVENT_TYPES), np.int64)
    spill: dict[int, list[dict[str, np.ndarray]]] = {}
    rows_written = 0
    files = 0
    for day in range(n_days):
        date = cfg.date(day)
        writer = _PartWriter(
            _day_dir(out / "events", date),
            EVENTS_SCHEMA,
            cfg.max_rows_per_file,
            cfg.compression,
            ["event_type"],
        )
        truth = _PartWriter(
            _day_dir(out / "truth" / "user_stage", date),
            TRUTH_SCHEMA,
            MAX_USERS,
            cfg.compression,
            ["stage"],
        )
        day_counts = np.zeros(len(EVENT_TYPES), np.int64)
        if day in spill:
            cols = _concat(spill.pop(day))
            writer.write(_events_table(cols))
            day_counts += _type_counts(cols)
            rows_written += len(cols["event_id"])
        for ci, blocks in enumerate(chunks):
            batches: list[dict[str, np.ndarray]] = []
            truth_tables: list[pa.Table] = []
            for b in blocks:
                ub = sim.user_block(b)
                sl = slice(ub.start, ub.start + ub.n)
                res = sim.block_day(day, ub, stage[sl])
                stage[sl] = res.stage
                batches.extend(res.today)
                truth_tables.append(
                    pa.Table.from_arrays(
                        [pa.array(ub.user_index + 1), _decode(res.stage, _STAGE_DICT)],
                        schema=TRUTH_SCHEMA,
                    )
                )
                for d, cols in res.spill.items():
                    if d < n_days:
                        spill.setdefault(d, []).append(cols)
                    else:
                        dropped += _type_counts(cols)
            cols = _concat(batches)
            del batches
            writer.write(_events_table(cols))
            day_counts += _type_counts(cols)
            rows_written += len(cols["event_id"])
            del cols
            truth.write(pa.concat_tables(truth_tables))
            if progress is not None:
                done_users = min(n_users, (chunks[ci][-1] + 1) * cfg.rng_block_users)
                progress(
                    Progress(
                        day=day,
                        days=n_days,
                        rows_written=rows_written,
                        user_days_done=day * n_users + done_users,
                        user_days_total=n_days * n_users,
                        elapsed_s=time.perf_counter() - t0,
                    )
                )
        writer.close()
        truth.close()
        files += writer.part + 1
        totals += day_counts
        by_day[date.isoformat()] = _counts_dict(day_counts)

    elapsed = time.perf_counter() - t0
    manifest: dict[str, Any] = {
        "generator": "pipelines.synthetic",
        "version": GENERATOR_VERSION,
        "params": {
            "users": cfg.users,
            "items": cfg.items,
            "days": cfg.days,
            "impressions_per_user_day": cfg.impressions_per_user_day,
            "start_date": cfg.start_date.isoformat(),
            "end_date": cfg.date(cfg.days - 1).isoformat(),
            "seed": cfg.seed,
            "rng_block_users": cfg.rng_block_users,
            "chunk_users": chunk,
            "max_rows_per_file": cfg.max_rows_per_file,
            "compression": cfg.compression,
        },
        "model": dataclasses.asdict(cfg.model),
        "schemas": {
            name: {f.name: str(f.type) for f in schema}
            for name, schema in (
                ("events", EVENTS_SCHEMA),
                ("users", USERS_SCHEMA),
                ("items", ITEMS_SCHEMA),
                ("truth_user_stage", TRUTH_SCHEMA),
            )
        },
        "counts": {
            "events": _counts_dict(totals),
            "events_by_day": by_day,
            "dropped_after_end": _counts_dict(dropped),
            "users": cfg.users,
            "items": cfg.items,
            "truth_user_stage": cfg.users * cfg.days,
            "event_files": files,
        },
        "elapsed_s": round(elapsed, 3),
        "events_per_s": round(float(totals.sum()) / elapsed, 1) if elapsed > 0 else None,
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / "manifest.json")
    return manifest


# --- sizing -------------------------------------------------------------------------------


def iter_block_days(config: SyntheticConfig, blocks: int) -> Iterator[tuple[int, BlockDay]]:
    """In-memory generation of the first ``blocks`` RNG blocks, day by day (no files)."""
    sim = Simulator(config)
    for b in range(min(blocks, sim.n_blocks)):
        ub = sim.user_block(b)
        stage: np.ndarray | None = None
        for day in range(config.days):
            res = sim.block_day(day, ub, stage)
            stage = res.stage
            yield day, res


def estimate_events_per_user(config: SyntheticConfig, target_rows: int = 2_000_000) -> float:
    """Written event rows per user over the whole period, measured on a pilot of full blocks.

    The pilot users are the first users of any run with the same other parameters (blocks do
    not depend on ``users``), so the estimate is unbiased; it is sized to ~``target_rows``.
    """
    b = config.rng_block_users
    per_user_guess = max(1e-9, config.days * config.impressions_per_user_day * 1.3)
    want = int(min(max(target_rows / per_user_guess, 2 * b), 65_536))
    blocks = max(1, -(-want // b))
    pilot = dataclasses.replace(config, users=min(MAX_USERS, blocks * b))
    rows = 0
    for _day, res in iter_block_days(pilot, blocks):
        rows += sum(len(c["event_id"]) for c in res.today)
        rows += sum(len(c["event_id"]) for d, c in res.spill.items() if d < config.days)
    return rows / pilot.users


def users_for_events(config: SyntheticConfig, target_events: float) -> int:
    """Number of users that gives roughly ``target_events`` event rows with ``config``."""
    per_user = estimate_events_per_user(config)
    if per_user <= 0:
        raise ValueError("these settings generate no events; cannot size users for a target")
    return int(min(MAX_USERS, max(1, round(target_events / per_user))))


# --- reading back -------------------------------------------------------------------------


def _read_days(root: Path) -> pa.Table:
    tables = []
    for folder in sorted(root.glob("date=*")):
        date = folder.name.removeprefix("date=")
        for part in sorted(folder.glob("part-*.parquet")):
            t = pq.read_table(part)
            tables.append(
                t.append_column("date", pa.repeat(pa.scalar(date, pa.string()), t.num_rows))
            )
    return pa.concat_tables(tables)


def read_events(out_dir: str | os.PathLike[str]) -> pa.Table:
    """All events in folder/part order, with the folder's ``date`` (YYYY-MM-DD) appended."""
    return _read_days(Path(out_dir) / "events")


def read_truth(out_dir: str | os.PathLike[str]) -> pa.Table:
    """The per-day user stages, with the folder's ``date`` appended."""
    return _read_days(Path(out_dir) / "truth" / "user_stage")
