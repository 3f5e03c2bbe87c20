"""Feature specs: one YAML per data source, validated on load.

A spec says where a log lives and what shape it has, which columns are ids and time, which user
and item features to build, which tasks to label, how pseudo-labels are windowed, how time is
split, and which behaviour sequences to keep. A new log schema is onboarded by writing a spec.

Errors name the offending key path (``tasks.2.column: ...``) and the file.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SPARK_TYPES = {"string", "int", "long", "double", "float", "boolean"}
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class SpecError(ValueError):
    """A feature spec or config that does not validate; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceFormat(StrEnum):
    CSV = "csv"
    PARQUET = "parquet"
    DELTA = "delta"


class TimeUnit(StrEnum):
    MS = "ms"
    S = "s"


class TableSource(_Strict):
    """A file or folder readable by Spark (csv, parquet) or a Delta table."""

    path: str
    format: SourceFormat
    # Declared schema: column -> spark type. Columns not declared here are an error unless
    # allow_extra_columns is set, so that an upstream schema change is noticed, not ignored.
    columns: dict[str, str]
    allow_extra_columns: bool = False

    @field_validator("columns")
    @classmethod
    def _types_known(cls, v: dict[str, str]) -> dict[str, str]:
        for col, typ in v.items():
            if typ not in SPARK_TYPES:
                raise ValueError(
                    f"column {col!r} has type {typ!r}; use one of {sorted(SPARK_TYPES)}"
                )
        if not v:
            raise ValueError("at least one column must be declared")
        return v


class EventsShape(_Strict):
    """How an event stream becomes one session per impression (STAN's definition of a session)."""

    type_column: str
    impression_id_column: str
    impression_type: str = "impression"
    # action name -> event type value in type_column; the session gets one binary flag per action
    actions: dict[str, str]
    # action name -> numeric column summed over that action's events (e.g. stay -> dwell seconds)
    action_values: dict[str, str] = Field(default_factory=dict)
    attribution_window_s: int = Field(1800, gt=0)

    @model_validator(mode="after")
    def _values_name_actions(self) -> EventsShape:
        for name in self.action_values:
            if name not in self.actions:
                raise ValueError(f"action_values.{name}: not one of actions {sorted(self.actions)}")
        return self


class LogSource(TableSource):
    shape: Literal["impressions", "events"]
    user_id: str
    item_id: str
    time_column: str
    time_unit: TimeUnit = TimeUnit.MS
    # Calendar days (partitions, splits, windows) are taken in this time zone.
    timezone: str = "UTC"
    # Optional column that must agree with the date derived from time_column.
    date_column: str | None = None
    date_column_format: str = "yyyyMMdd"
    # Columns that order same-user same-time rows; a hash of the whole row breaks what is left.
    tie_break: list[str] = Field(default_factory=list)
    # Exact duplicate rows go to `rejected` (reason exact_duplicate) unless this is false.
    reject_exact_duplicates: bool = True
    events: EventsShape | None = None

    @field_validator("timezone")
    @classmethod
    def _timezone_known(cls, v: str) -> str:
        # Day bounds are computed in Python (nightly windows, per-date files): an IANA name
        # that both Python and Spark read, not an offset such as "+08:00".
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"{v!r}: not an IANA time zone name (e.g. UTC, Asia/Shanghai)") from e
        return v

    @model_validator(mode="after")
    def _shape_consistent(self) -> LogSource:
        if self.shape == "events" and self.events is None:
            raise ValueError("events: required when shape is 'events'")
        if self.shape == "impressions" and self.events is not None:
            raise ValueError("events: only allowed when shape is 'events'")
        for key in ("user_id", "item_id", "time_column"):
            col = getattr(self, key)
            if col not in self.columns:
                raise ValueError(f"{key}: column {col!r} is not declared in columns")
        if self.date_column and self.date_column not in self.columns:
            raise ValueError(f"date_column: column {self.date_column!r} is not declared in columns")
        for col in self.tie_break:
            if col not in self.columns:
                raise ValueError(f"tie_break: column {col!r} is not declared in columns")
        if self.events is not None:
            for key in ("type_column", "impression_id_column"):
                col = getattr(self.events, key)
                if col not in self.columns:
                    raise ValueError(f"events.{key}: column {col!r} is not declared in columns")
            for name, col in self.events.action_values.items():
                if col not in self.columns:
                    raise ValueError(f"events.action_values.{name}: column {col!r} is not declared")
        return self

    @property
    def per_date(self) -> bool:
        """True when the path holds one folder/file per day (a ``{date}`` placeholder)."""
        return "{date}" in self.path


class SideTable(TableSource):
    """A user or item feature table joined on its key."""

    key: str

    @model_validator(mode="after")
    def _key_declared(self) -> SideTable:
        if self.key not in self.columns:
            raise ValueError(f"key: column {self.key!r} is not declared in columns")
        return self


class CategoricalFeature(_Strict):
    name: str
    column: str
    # Vocabulary fitted on the training window: values seen at least min_count times, the
    # max_vocab most frequent; index 0 is the reserved OOV / missing index.
    max_vocab: int = Field(100_000, gt=0)
    min_count: int = Field(1, ge=1)
    # Features sharing a table name share one embedding table (and one vocabulary).
    table: str | None = None


class DenseTransform(StrEnum):
    NONE = "none"
    LOG1P = "log1p"
    STANDARDIZE = "standardize"
    LOG1P_STANDARDIZE = "log1p_standardize"


class DenseFeature(_Strict):
    name: str
    column: str
    transform: DenseTransform = DenseTransform.NONE
    # Missing values are replaced by this before the transform.
    fill: float = 0.0


class FeatureGroup(_Strict):
    # Where the columns come from: the log itself (no tables), or side tables joined on their key
    # (the user id for `user`, the item id for `item`).
    tables: list[SideTable] = Field(default_factory=list)
    categorical: list[CategoricalFeature] = Field(default_factory=list)
    dense: list[DenseFeature] = Field(default_factory=list)

    def column_owner(self) -> dict[str, int]:
        """column -> index of the side table holding it (keys excluded)."""
        owner: dict[str, int] = {}
        for i, t in enumerate(self.tables):
            for col in t.columns:
                if col == t.key:
                    continue
                if col in owner:
                    raise ValueError(f"tables.{i}.columns: {col!r} is also in tables.{owner[col]}")
                owner[col] = i
        return owner


class IdVocab(_Strict):
    max_vocab: int = Field(10_000_000, gt=0)
    min_count: int = Field(1, ge=1)


class TaskKind(StrEnum):
    BINARY = "binary"
    DWELL = "dwell"


class Task(_Strict):
    name: str
    kind: TaskKind
    # For an impressions source: the log column. For an events source: an action name (binary:
    # whether the impression got that action) or an action_values name (dwell: summed value).
    column: str
    # dwell: source values are multiplied by this (e.g. 0.001 for milliseconds -> seconds)
    scale: float = 1.0
    n_bins: int | None = Field(None, ge=2)

    @model_validator(mode="after")
    def _bins_for_dwell(self) -> Task:
        if self.kind == TaskKind.DWELL and self.n_bins is None:
            raise ValueError("n_bins: required for a dwell task")
        if self.kind == TaskKind.BINARY and self.n_bins is not None:
            raise ValueError("n_bins: only for dwell tasks")
        return self


class PseudoLabels(_Strict):
    """Running pseudo-labels l_i^k: the mean of a user's task values over strictly earlier events.

    window_days = W keeps the events of the W calendar days ending on the event's own day (still
    strictly earlier than the event); null means all history. With all_history true the
    all-history variant is written too (pl_all_<task>, n_prev_all) for the ablation.
    """

    window_days: int | None = Field(30, ge=1)
    all_history: bool = True


class Split(_Strict):
    """Chronological split by calendar day: train <= train_end < valid <= valid_end < test."""

    train_start: dt.date | None = None
    train_end: dt.date
    valid_end: dt.date

    @model_validator(mode="after")
    def _ordered(self) -> Split:
        if self.valid_end < self.train_end:
            raise ValueError("valid_end: must not be before train_end")
        if self.train_start and self.train_start > self.train_end:
            raise ValueError("train_start: must not be after train_end")
        return self


class SequenceFilter(_Strict):
    task: str
    equals: float


class BehaviourSequence(_Strict):
    """The last max_len item indices of the user's strictly earlier events matching `when`."""

    name: str
    when: SequenceFilter | None = None
    max_len: int = Field(50, ge=1, le=1000)


class FeatureSpec(_Strict):
    name: str
    source: LogSource
    user: FeatureGroup = Field(default_factory=FeatureGroup)
    item: FeatureGroup = Field(default_factory=FeatureGroup)
    context: FeatureGroup = Field(default_factory=FeatureGroup)
    tasks: Annotated[list[Task], Field(min_length=1)]
    pseudo_labels: PseudoLabels = Field(default_factory=PseudoLabels)
    split: Split
    sequences: list[BehaviourSequence] = Field(default_factory=list)
    user_ids: IdVocab = Field(default_factory=IdVocab)
    item_ids: IdVocab = Field(default_factory=IdVocab)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r}: use lower case letters, digits and _")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> FeatureSpec:
        names: set[str] = set()
        for i, t in enumerate(self.tasks):
            if not NAME_RE.match(t.name):
                raise ValueError(
                    f"tasks.{i}.name: {t.name!r}: use lower case letters, digits and _"
                )
            if t.name in names:
                raise ValueError(f"tasks.{i}.name: duplicate task {t.name!r}")
            names.add(t.name)
            src = self.source
            if src.shape == "impressions" and t.column not in src.columns:
                raise ValueError(
                    f"tasks.{i}.column: {t.column!r} is not declared in source.columns"
                )
            if src.shape == "events" and src.events is not None:
                # binary tasks read an action's flag, dwell tasks an action's summed value
                known = (
                    src.events.actions if t.kind == TaskKind.BINARY else src.events.action_values
                )
                if t.column not in known:
                    what = "actions" if t.kind == TaskKind.BINARY else "action_values"
                    raise ValueError(
                        f"tasks.{i}.column: {t.column!r} is not in source.events.{what}"
                    )
        feats: set[str] = set()
        for gname in ("user", "item", "context"):
            group: FeatureGroup = getattr(self, gname)
            try:
                owner = group.column_owner()
            except ValueError as e:
                raise ValueError(f"{gname}.{e}") from None
            cols = owner if group.tables else self.source.columns
            where = f"{gname}.tables.*.columns" if group.tables else "source.columns"
            for kind in ("categorical", "dense"):
                for i, f in enumerate(getattr(group, kind)):
                    key = f"{gname}.{kind}.{i}"
                    if not NAME_RE.match(f.name):
                        raise ValueError(
                            f"{key}.name: {f.name!r}: use lower case letters, digits and _"
                        )
                    if f.name in feats or f.name in RESERVED_COLUMNS:
                        raise ValueError(f"{key}.name: {f.name!r} is used twice or is reserved")
                    feats.add(f.name)
                    if f.column not in cols:
                        raise ValueError(f"{key}.column: {f.column!r} is not declared in {where}")
        if self.context.tables:
            raise ValueError("context.tables: context features come from the log itself")
        seq_names: set[str] = set()
        for i, s in enumerate(self.sequences):
            if s.name in seq_names:
                raise ValueError(f"sequences.{i}.name: duplicate {s.name!r}")
            seq_names.add(s.name)
            if s.when is not None and s.when.task not in names:
                raise ValueError(f"sequences.{i}.when.task: {s.when.task!r} is not a task")
        return self

    # --- derived names used by the pipeline and the trainer -----------------------------------
    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def categorical_features(self) -> list[CategoricalFeature]:
        return [f for g in (self.user, self.item, self.context) for f in g.categorical]

    @property
    def dense_features(self) -> list[DenseFeature]:
        return [f for g in (self.user, self.item, self.context) for f in g.dense]


# The leading columns of every examples table, in order.
EXAMPLE_ID_COLUMNS = [
    "date",
    "user_id",
    "item_id",
    "user_idx",
    "item_idx",
    "event_time_ms",
    "example_id",
    "split",
]
RESERVED_COLUMNS = {*EXAMPLE_ID_COLUMNS, "n_prev", "n_prev_all"}


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}")
    return f"invalid feature spec {origin}:\n  " + "\n  ".join(lines)


def parse_spec(data: dict[str, Any], origin: str = "<dict>") -> FeatureSpec:
    try:
        return FeatureSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_validation_error(err, origin)) from None


def load_spec(
    path: str | Path, base_dir: str | Path | None = None, overrides: list[str] | None = None
) -> FeatureSpec:
    """Load and validate a spec. Relative source paths resolve against ``base_dir``
    (default: the current directory), so specs can point at ``../shared/data``.
    ``overrides`` are ``key.path=value`` strings applied before validation."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"feature spec not found: {path}")
    with path.open() as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict):
        raise SpecError(f"invalid feature spec {path}: top level must be a mapping")
    if overrides:
        from pipelines.config import apply_overrides

        data = apply_overrides(data, overrides)
    spec = parse_spec(data, str(path))
    return resolve_paths(spec, Path(base_dir) if base_dir else Path.cwd())


def resolve_paths(spec: FeatureSpec, base: Path) -> FeatureSpec:
    def fix(p: str) -> str:
        if "://" in p or Path(p).is_absolute():
            return p
        return str((base / p).resolve()) if "{date}" not in p else str(base.resolve() / p)

    update: dict[str, Any] = {
        "source": spec.source.model_copy(update={"path": fix(spec.source.path)})
    }
    for g in ("user", "item"):
        group: FeatureGroup = getattr(spec, g)
        if group.tables:
            tables = [t.model_copy(update={"path": fix(t.path)}) for t in group.tables]
            update[g] = group.model_copy(update={"tables": tables})
    return spec.model_copy(update=update)
