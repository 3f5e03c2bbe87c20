"""The STAN paper's stage analysis (Sec. 4.4): user representations by rule-based stage, and the
stage shift of the same users over time.

* Stages: New / Wander / Stick / Loyal from each user's rates over a period (CTR-like,
  dwell-like and conversion-like tasks, :mod:`model.stages`) against the medians of the
  training window's per-user rates.
* Representations: the user feature embeddings U_i for a plain model (e.g. PLE), and STAN's
  preference representation f(U_i), one per user (users' features are static).
* A 2-D t-SNE of a user sample coloured by stage (PNG), and the silhouette score of the stages
  in the representation space (higher: the representation separates the stages better).
* The stage shift: each user's stage in the first and the last week of the log, as a 4 x 4
  transition matrix (PNG).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import torch
from deltalake import DeltaTable

from model.base import MultiTaskModel
from model.data import make_loader
from model.stages import STAGES, StageThresholds, assign_stages
from model.stan import STAN

log = logging.getLogger(__name__)

__all__ = ["stage_of_users", "stage_shift", "user_representations", "analyse_runs"]


def _rates(df: pd.DataFrame, cols: dict[str, tuple[str, float]]) -> pd.DataFrame:
    out = pd.DataFrame(index=pd.Index(sorted(df["user_id"].unique()), name="user_id"))
    for key, (col, divisor) in cols.items():
        out[key] = df.groupby("user_id")[col].mean() / divisor
    out["n"] = df.groupby("user_id").size()
    return out


def stage_of_users(rates: pd.DataFrame, thr: StageThresholds) -> pd.Series:
    """Stage index per user from its rates (``ctr``, ``dwell``, ``conversion``, ``n``)."""
    stage = assign_stages(
        torch.tensor(rates["ctr"].to_numpy()),
        torch.tensor(rates["dwell"].to_numpy()),
        torch.tensor(rates["conversion"].to_numpy()),
        torch.tensor(rates["n"].to_numpy()),
        thr.as_tensor().double(),
    )
    return pd.Series(stage.numpy(), index=rates.index, name="stage")


def _label_columns(bundle: Any) -> dict[str, tuple[str, float]]:
    from model.stages import target_column

    divisors = {t.name: float(bundle.artifacts.target_divisor(t.name)) for t in bundle.spec.tasks}
    st = bundle.cfg.model.stage
    return {
        "ctr": target_column(bundle.spec, st.ctr_task, divisors),
        "dwell": target_column(bundle.spec, st.dwell_task, divisors),
        "conversion": target_column(bundle.spec, st.conversion_task, divisors),
    }


def stage_shift(
    examples: str, bundle: Any, thr: StageThresholds, version: int | None = None
) -> pd.DataFrame:
    """4 x 4 counts: users' stage in the first 7 days (rows) -> the last 7 days (columns), for
    the users active in both weeks."""
    cols = _label_columns(bundle)
    table = DeltaTable(examples, version=version).to_pyarrow_dataset()
    df = table.to_table(columns=["user_id", "date", *{c for c, _ in cols.values()}]).to_pandas()
    dates = sorted(df["date"].unique())
    first, last = df[df["date"].isin(dates[:7])], df[df["date"].isin(dates[-7:])]
    a = stage_of_users(_rates(first, cols), thr)
    b = stage_of_users(_rates(last, cols), thr)
    both = a.index.intersection(b.index)
    counts = pd.crosstab(a[both], b[both]).reindex(index=range(4), columns=range(4), fill_value=0)
    counts.index = [f"first week: {s}" for s in STAGES]
    counts.columns = [f"last week: {s}" for s in STAGES]
    return counts


@torch.no_grad()
def user_representations(
    model: MultiTaskModel, bundle: Any, max_users: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(user ids [U], representations [U, R]) from each user's first training row: f(U_i) for
    STAN, the flattened user feature embeddings U_i otherwise."""
    from pipelines.lake import Tables

    tables = Tables.for_spec(bundle.cfg.lake, bundle.spec)
    loader = make_loader(
        tables.examples,
        bundle.spec,
        bundle.artifacts,
        "train",
        8192,
        version=bundle.cfg.table_version,
        check_labels=False,
    )
    keys = getattr(model, "user_keys", None) or bundle.layout.user_keys
    positions = torch.tensor(bundle.layout.positions(list(keys)))
    seen: dict[int, np.ndarray] = {}
    model.eval()
    for batch in loader:
        real = batch.mask > 0
        emb = model.sparse_arch(batch.sparse_features).index_select(1, positions)
        rep = model.preference.represent(emb) if isinstance(model, STAN) else emb
        rep = rep.flatten(1)[real].numpy()
        users = batch.user_idx[real].numpy()
        for u, r in zip(users, rep, strict=True):
            if u and u not in seen:
                seen[int(u)] = r
        if max_users and len(seen) >= max_users:
            break
    ids = np.array(sorted(seen))
    return ids, np.stack([seen[i] for i in ids]) if len(ids) else np.zeros((0, 0))


def analyse_runs(
    runs: dict[str, str | Path], out_dir: Path, sample: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """t-SNE PNGs, silhouette scores and the stage-shift matrix for trained runs
    (``{"stan": output_dir, "ple": output_dir}``); returns the figures' paths and scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    from model.trainer import load_trained
    from pipelines.lake import Tables

    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"silhouette": {}, "figures": []}
    shift_done = False
    for name, run in runs.items():
        model, bundle = load_trained(run)
        tables = Tables.for_spec(bundle.cfg.lake, bundle.spec)
        cols = _label_columns(bundle)
        # the training window's per-user rates, their medians, and each user's stage
        train = (
            DeltaTable(tables.examples, version=bundle.cfg.table_version)
            .to_pyarrow_dataset()
            .to_table(
                columns=["user_idx", "user_id", *{c for c, _ in cols.values()}],
                filter=pc.field("split") == "train",
            )
            .to_pandas()
        )
        rates = _rates(train, cols)
        thr = StageThresholds(
            ctr=float(rates["ctr"].median()),
            dwell=float(rates["dwell"].median()),
            conversion=float(rates["conversion"].median()),
        )
        stage = stage_of_users(rates, thr)
        idx_of = train.drop_duplicates("user_id").set_index("user_id")["user_idx"]
        stage_by_idx = pd.Series(stage.to_numpy(), index=idx_of.reindex(stage.index).to_numpy())
        ids, reps = user_representations(model, bundle)
        labels = stage_by_idx.reindex(ids).to_numpy()
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(ids), size=min(sample, len(ids)), replace=False)
        sil = (
            float(silhouette_score(reps[pick], labels[pick]))
            if len(set(labels[pick])) > 1
            else float("nan")
        )
        result["silhouette"][name] = sil
        xy = TSNE(n_components=2, random_state=seed, init="pca", perplexity=30).fit_transform(
            reps[pick]
        )
        fig, ax = plt.subplots(figsize=(6, 5))
        for s, stage_name in enumerate(STAGES):
            m = labels[pick] == s
            ax.scatter(xy[m, 0], xy[m, 1], s=4, label=f"{stage_name} ({int(m.sum())})")
        ax.set_title(f"{name}: user representations by stage (silhouette {sil:.3f})")
        ax.legend(markerscale=3, fontsize=8)
        fig.tight_layout()
        path = out_dir / f"tsne_{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        result["figures"].append(str(path))
        if not shift_done:
            counts = stage_shift(tables.examples, bundle, thr, bundle.cfg.table_version)
            counts.to_csv(out_dir / "stage_shift.csv")
            fig, ax = plt.subplots(figsize=(6, 5))
            ax.imshow(counts.to_numpy(), cmap="Blues")
            ax.set_xticks(range(4), STAGES)
            ax.set_yticks(range(4), STAGES)
            ax.set_xlabel("stage in the last week")
            ax.set_ylabel("stage in the first week")
            for i in range(4):
                for j in range(4):
                    ax.text(j, i, int(counts.iat[i, j]), ha="center", va="center", fontsize=9)
            ax.set_title("the same users' stage, first vs last week")
            fig.tight_layout()
            fig.savefig(out_dir / "stage_shift.png", dpi=100)
            plt.close(fig)
            result["figures"].append(str(out_dir / "stage_shift.png"))
            result["stage_shift"] = counts
            result["stage_counts"] = {STAGES[s]: int((stage == s).sum()) for s in range(4)}
            shift_done = True
    return result
