"""Run configuration: YAML in conf/, validated on load, every value overridable as key.path=value."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.spec import SpecError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SparkConfig(_Strict):
    master: str | None = "local[*]"
    app_name: str = "lifecycle-mtl"
    conf: dict[str, str] = Field(default_factory=dict)
    # Partitions of the per-user running-feature stage (users are hashed into them).
    user_partitions: int = Field(8, ge=1)
    # A driver JVM launched here starts from a class-data archive of this Spark and Java,
    # recorded by the first run (`pipelines.spark.ClassArchive`), kept in jvm_cache_dir
    # (default $XDG_CACHE_HOME/lifecycle-mtl/jvm, else ~/.cache/lifecycle-mtl/jvm).
    class_archive: bool = True
    jvm_cache_dir: str | None = None


class DeltaConfig(_Strict):
    # delta-rs commits by default; delta-spark needs its jars on the classpath (cluster only).
    writer: Literal["delta-rs", "delta-spark"] = "delta-rs"
    # With delta-rs, each date's examples files below this size (one per kernel task) are merged
    # before the commit into files of about target_file_mb (0: keep the tasks' files). With
    # delta-spark, use the cluster's optimized writes / OPTIMIZE instead.
    merge_files_below_mb: float = Field(32.0, ge=0)
    target_file_mb: float = Field(128.0, gt=0)


class PipelineConfig(_Strict):
    spec: str = "feature_specs/kuairand.yaml"
    # Tables go to <lake>/<spec name>/{examples,rejected,user_state,user_daily} plus artifacts/.
    lake: str = "lake"
    spark: SparkConfig = Field(default_factory=SparkConfig)
    delta: DeltaConfig = Field(default_factory=DeltaConfig)
    # Snapshots of the user state kept after a nightly run (re-running the last N dates works).
    state_retention_days: int = Field(7, ge=2)
    # A full rebuild writes the user state as of its last N dates, so that the last dates can be
    # re-run nightly afterwards (each snapshot aggregates the whole history up to its date).
    full_state_snapshots: int = Field(2, ge=1)
    # Rows more than this many seconds after the run's wall clock are rejected as future_time.
    future_tolerance_s: int = Field(3600, ge=0)
    # An empty day is an error (usually an upstream failure) unless allowed.
    allow_empty_day: bool = False


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a dotted key; integer parts index lists (user.tables.0.path)."""
    keys = dotted.split(".")
    cur: Any = data
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(cur, list):
            if not k.isdigit() or int(k) >= len(cur):
                raise SpecError(
                    f"override {dotted}: {k!r} is not an index of a {len(cur)}-item list"
                )
            if last:
                cur[int(k)] = value
            else:
                cur = cur[int(k)]
            continue
        if not isinstance(cur, dict):
            raise SpecError(f"override {dotted}: {keys[i - 1]!r} is not a mapping or list")
        rest = ".".join(keys[i:])
        if rest in cur or (i > 0 and keys[i - 1] == "conf"):
            # keys that contain dots (Spark settings under `conf`) take the rest of the path
            cur[rest] = value if not isinstance(value, (int, float, bool)) else str(value)
            return
        if last:
            cur[k] = value
        else:
            if cur.get(k) is None:
                cur[k] = {}
            cur = cur[k]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; values are parsed as YAML (numbers, lists, null)."""
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return data


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    model: type[BaseModel] = PipelineConfig,
) -> Any:
    data: dict[str, Any] = {}
    origin = "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise SpecError(f"config not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        origin = str(path)
    data = apply_overrides(data, overrides or [])
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "<root>"
            lines.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}")
        raise SpecError(f"invalid config {origin}:\n  " + "\n  ".join(lines)) from None
