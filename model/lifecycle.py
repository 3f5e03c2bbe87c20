"""The MLflow model lifecycle: register a run's pyfunc and move the ``champion`` alias only when
the candidate beats the current champion on the configured validation metric.

Every decision is recorded with both figures: as tags on the new model version
(``gate.metric``, ``gate.candidate``, ``gate.champion``, ``gate.champion_version``,
``gate.decision``) and as ``registry_decision.json`` in the candidate's run.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

__all__ = ["CHAMPION", "Decision", "register_candidate"]

CHAMPION = "champion"


@dataclass(frozen=True)
class Decision:
    name: str
    version: str
    run_id: str
    metric: str
    candidate: float
    champion: float | None
    champion_version: str | None
    promoted: bool
    reason: str
    already_registered: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _metric_key(metric: str) -> str:
    # MLflow metric names cannot hold "@" (logged as "_at_", see model.trainer._Tracker)
    return metric.replace("@", "_at_")


def register_candidate(
    run_id: str,
    name: str,
    metric: str,
    *,
    greater_is_better: bool = True,
    model_uri: str | None = None,
    tracking_uri: str | None = None,
) -> Decision:
    """Register ``run_id``'s model under ``name``; promote it to ``champion`` if it is the first
    or strictly better than the champion on ``metric`` (e.g. ``valid/click/auc``).

    Registering the same run twice does not add a version: the existing one is re-judged.
    """
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    key = _metric_key(metric)
    if key not in run.data.metrics:
        known = sorted(k for k in run.data.metrics if "/" in k)[:20]
        raise ValueError(f"run {run_id} has no metric {metric!r} (it has e.g. {known})")
    candidate = float(run.data.metrics[key])

    existing = [
        mv
        for mv in _versions(client, name)
        if (mv.tags or {}).get("run_id") == run_id or mv.run_id == run_id
    ]
    if existing:
        mv = existing[0]
        already = True
    else:
        if model_uri is None:
            model_uri = _logged_model_uri(client, run_id)
        mv = mlflow.register_model(model_uri, name)
        client.set_model_version_tag(name, mv.version, "run_id", run_id)
        already = False

    champion_value: float | None = None
    champion_version: str | None = None
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
        champion_version = str(champ.version)
        champ_run = (champ.tags or {}).get("run_id") or champ.run_id
        champion_value = float(client.get_run(champ_run).data.metrics[key])
    except mlflow.exceptions.MlflowException:
        champ = None
    except KeyError:
        raise ValueError(
            f"the champion {name} v{champion_version} has no metric {metric!r}: "
            "compare on a metric both runs logged"
        ) from None

    if champ is None:
        promoted, reason = True, "no champion yet"
    elif champion_version == str(mv.version):
        promoted, reason = False, "this version is the champion already"
    else:
        better = (
            candidate > champion_value if greater_is_better else candidate < champion_value  # type: ignore[operator]
        )
        promoted = better
        cmp = ">" if greater_is_better else "<"
        reason = (
            f"{metric} {candidate:.6f} {cmp} champion's {champion_value:.6f}"
            if better
            else f"{metric} {candidate:.6f} does not beat the champion's {champion_value:.6f}"
        )
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    decision = Decision(
        name=name,
        version=str(mv.version),
        run_id=run_id,
        metric=metric,
        candidate=candidate,
        champion=champion_value,
        champion_version=champion_version,
        promoted=promoted,
        reason=reason,
        already_registered=already,
    )
    tags = {
        "gate.metric": metric,
        "gate.candidate": repr(candidate),
        "gate.champion": repr(champion_value),
        "gate.champion_version": str(champion_version),
        "gate.decision": "promoted" if promoted else "kept champion",
        "gate.reason": reason,
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, mv.version, k, v)
    client.log_dict(run_id, decision.to_dict(), f"registry_decision_v{mv.version}.json")
    log.info("%s v%s: %s (%s)", name, mv.version, tags["gate.decision"], reason)
    return decision


def _versions(client, name: str) -> list:
    import mlflow

    try:
        return list(client.search_model_versions(f"name='{name}'"))
    except mlflow.exceptions.MlflowException:
        return []


def _logged_model_uri(client, run_id: str) -> str:
    """The pyfunc logged by the training run (``model_uri`` tag or the run's logged model)."""
    run = client.get_run(run_id)
    uri = run.data.tags.get("lifecycle.model_uri")
    if uri:
        return uri
    outputs = getattr(run, "outputs", None)
    models = getattr(outputs, "model_outputs", None) or []
    if models:
        return f"models:/{models[0].model_id}"
    return f"runs:/{run_id}/model"
