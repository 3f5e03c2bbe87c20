"""Where a spec's tables live in the lake: ``<lake>/<spec name>/{examples, rejected, user_state,
user_daily}`` (Delta), ``artifacts/`` (the fitted preprocessing) and ``summaries/`` (one JSON a
run). Plain paths: the trainer and the scorer read them without Spark."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.spec import FeatureSpec


@dataclass(frozen=True)
class Tables:
    root: Path

    @classmethod
    def for_spec(cls, lake: str | Path, spec: FeatureSpec) -> Tables:
        return cls(Path(lake).resolve() / spec.name)

    @property
    def examples(self) -> str:
        return str(self.root / "examples")

    @property
    def rejected(self) -> str:
        return str(self.root / "rejected")

    @property
    def user_state(self) -> str:
        return str(self.root / "user_state")

    @property
    def user_daily(self) -> str:
        return str(self.root / "user_daily")

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def summaries(self) -> Path:
        return self.root / "summaries"
