"""Models by name (``model.name`` in the training config)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

from model.aitm import AITM
from model.base import FeatureLayout, MultiTaskModel, TaskConfig
from model.config import MODEL_NAMES, ModelConfig
from model.htlnet import HTLNet
from model.mlp_shared import MLPShared
from model.mlp_single import MLPSingle
from model.mmoe import MMoE
from model.ple import PLE
from model.ple_stage import PLEStage
from model.stages import StageThresholds, stage_task_index
from model.stan import STAN
from pipelines.preprocessing import Artifacts
from pipelines.spec import FeatureSpec

__all__ = ["STATE_LAYOUT", "build_model", "model_from_saved", "upgrade_state_dict"]

# The layout of the models' state dicts: 2 since the task towers, STAN's task attentions and the
# CGC experts and gates are stacked (1 before, one module per task). Part of a run's checkpoint
# fingerprint: a run resumed across a layout change starts again instead of failing on the old
# optimizer state's shapes.
STATE_LAYOUT = 2


def build_model(
    cfg: ModelConfig,
    layout: FeatureLayout,
    tasks: list[TaskConfig],
    *,
    spec_tasks: list[str],
    stage_thresholds: StageThresholds | None = None,
    seed: int = 0,
) -> MultiTaskModel:
    """The model ``cfg.name`` (see :data:`model.config.MODEL_NAMES`)."""
    name = cfg.dtrn.backbone if cfg.name == "dtrn" else cfg.name
    if name == "htlnet":
        return HTLNet(layout, tasks, cfg)
    if name == "mlp_single":
        return MLPSingle(layout, tasks, cfg)
    if name == "mlp_shared":
        return MLPShared(layout, tasks, cfg)
    if name == "mmoe":
        return MMoE(layout, tasks, cfg)
    if name == "ple":
        return PLE(layout, tasks, cfg)
    if name == "aitm":
        return AITM(layout, tasks, cfg)
    if name == "ple_stage":
        if stage_thresholds is None:
            raise ValueError("ple_stage needs the fitted stage thresholds")
        index = stage_task_index(cfg.stage, spec_tasks)
        return PLEStage(layout, tasks, cfg, index, stage_thresholds)
    if name in ("stan", "stan_no_beta"):
        return STAN(layout, tasks, cfg, beta=name == "stan", seed=seed)
    raise ValueError(f"model.name: {name!r} is not one of {MODEL_NAMES}")


def model_from_saved(
    saved: dict[str, Any], spec: FeatureSpec, artifacts: Artifacts
) -> MultiTaskModel:
    """The unsharded model of a trainer's ``model.pt`` (already loaded), weights in place, in
    eval mode: its config, tasks and stage thresholds come from the file, the layout from the
    spec and its fitted vocabularies."""
    from model.base import TaskType, feature_layout
    from model.config import TrainConfig

    cfg = TrainConfig.model_validate(saved["config"])
    tasks = [TaskConfig(**{**t, "task_type": TaskType(t["task_type"])}) for t in saved["tasks"]]
    thresholds = saved.get("stage_thresholds")
    model = build_model(
        cfg.model,
        feature_layout(spec, artifacts.vocab_sizes),
        tasks,
        spec_tasks=[t.name for t in spec.tasks],
        stage_thresholds=StageThresholds(**thresholds) if thresholds else None,
        seed=cfg.train.seed,
    )
    model.load_state_dict(upgrade_state_dict(saved["state_dict"], model.state_dict().keys()))
    return model.eval()


def upgrade_state_dict(
    state: dict[str, torch.Tensor], expected: Iterable[str]
) -> dict[str, torch.Tensor]:
    """A state dict saved before the task towers, STAN's task attentions and the CGC layers'
    experts and gates were stacked (one ``Tower`` per task: ``towers.<k>.mlp.<j>`` and
    ``towers.<k>.out``; one linear layer per task: ``preference.task_attention.<k>``; per CGC
    layer ``task_experts.<k>``, ``shared_experts``, ``task_gates.<k>``, ``shared_gate``) in the
    stacked layout of the model that
    ``expected`` (its state dict's keys) belongs to: the same weights, so a champion
    registered before still loads. Anything else is returned as it is."""
    expected = set(expected)
    state = dict(state)
    for prefix in ("", "preference."):
        if (
            f"{prefix}towers.weights.0" not in expected
            or f"{prefix}towers.0.out.weight" not in state
        ):
            continue
        pattern = re.compile(
            rf"{re.escape(prefix)}towers\.(\d+)\.(?:mlp\.(\d+)|out)\.(weight|bias)"
        )
        per_tower: dict[int, dict[tuple[int, str], torch.Tensor]] = defaultdict(dict)
        for key in [k for k in state if pattern.fullmatch(k)]:
            m = pattern.fullmatch(key)
            assert m is not None
            position = int(m[2]) if m[2] is not None else 1 << 30  # the output layer last
            per_tower[int(m[1])][(position, m[3])] = state.pop(key)
        towers = [per_tower[k] for k in sorted(per_tower)]
        for layer, position in enumerate(sorted({pos for pos, _ in towers[0]})):
            state[f"{prefix}towers.weights.{layer}"] = torch.stack(
                [t[(position, "weight")].t() for t in towers]
            )
            state[f"{prefix}towers.biases.{layer}"] = torch.stack(
                [t[(position, "bias")] for t in towers]
            ).unsqueeze(1)
    # CGC layers: per-task expert groups and gates -> one expert group and one gate layer
    for prefix in sorted(
        {k[: -len("experts.weights.0")] for k in expected if k.endswith("experts.weights.0")}
    ):
        if f"{prefix}shared_experts.weights.0" not in state:
            continue
        tasks = sorted(
            {
                int(m[1])
                for k in state
                if (m := re.fullmatch(rf"{re.escape(prefix)}task_gates\.(\d+)\.weight", k))
            }
        )
        for kind in ("weights", "biases"):
            layers = sorted(
                {
                    int(m[1])
                    for k in state
                    if (m := re.fullmatch(rf"{re.escape(prefix)}shared_experts\.{kind}\.(\d+)", k))
                }
            )
            for layer in layers:
                groups = [f"{prefix}task_experts.{t}.{kind}.{layer}" for t in tasks]
                groups.append(f"{prefix}shared_experts.{kind}.{layer}")
                state[f"{prefix}experts.{kind}.{layer}"] = torch.cat([state.pop(g) for g in groups])
        for kind in ("weight", "bias"):
            gates = [f"{prefix}task_gates.{t}.{kind}" for t in tasks]
            if f"{prefix}shared_gate.{kind}" in state:
                gates.append(f"{prefix}shared_gate.{kind}")
            state[f"{prefix}gates.{kind}"] = torch.cat([state.pop(g) for g in gates])
    key = "preference.task_attention.weight"
    per_task = re.compile(r"preference\.task_attention\.(\d+)\.weight")
    if key in expected and key not in state:
        parts = sorted((int(m[1]), k) for k in state if (m := per_task.fullmatch(k)))
        if parts:
            state[key] = torch.cat([state.pop(k) for _, k in parts])
    return state
