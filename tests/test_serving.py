"""The pyfunc's preprocessing (raw columns -> the model's inputs) and the registry gate, on
small hand-made inputs with a real MLflow store."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pandas as pd
import pytest

from model.lifecycle import register_candidate
from model.serving import ScoringInputError, java_double_str


@pytest.mark.parametrize(
    ("x", "java"),
    [
        (1.0, "1.0"),
        (0.5, "0.5"),
        (-2.25, "-2.25"),
        (0.0, "0.0"),
        (123456.0, "123456.0"),
        (1e7, "1.0E7"),
        (12345678.9, "1.23456789E7"),
        (0.001, "0.001"),
        (0.0001, "1.0E-4"),
        (1.5e-5, "1.5E-5"),
        (-3e20, "-3.0E20"),
        (math.inf, "Infinity"),
    ],
)
def test_doubles_print_as_spark_casts_them(x: float, java: str) -> None:
    assert java_double_str(x) == java


class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):  # noqa: ANN001
        return pd.DataFrame({"score": np.zeros(len(model_input))})


def _run_with_metric(value: float) -> tuple[str, str]:
    with mlflow.start_run() as run:
        mlflow.log_metric("valid/click/auc", value)
        info = mlflow.pyfunc.log_model(name="model", python_model=_Constant())
    return run.info.run_id, str(info.model_uri)


def test_champion_gate(tmp_path) -> None:
    """The first model becomes champion; a worse one is registered but does not take the
    alias; a better one does; every decision carries both figures."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("gate")
    client = mlflow.MlflowClient(uri)
    first, worse, better = (_run_with_metric(v) for v in (0.70, 0.69, 0.72))

    d1 = register_candidate(
        first[0], "ranker", "valid/click/auc", model_uri=first[1], tracking_uri=uri
    )
    assert d1.promoted and d1.champion is None and d1.reason == "no champion yet"
    d2 = register_candidate(
        worse[0], "ranker", "valid/click/auc", model_uri=worse[1], tracking_uri=uri
    )
    assert not d2.promoted
    assert (d2.candidate, d2.champion, d2.champion_version) == (0.69, 0.70, d1.version)
    assert str(client.get_model_version_by_alias("ranker", "champion").version) == d1.version
    tags = client.get_model_version("ranker", d2.version).tags
    assert tags["gate.decision"] == "kept champion"
    assert float(tags["gate.candidate"]) == 0.69 and float(tags["gate.champion"]) == 0.70
    d3 = register_candidate(
        better[0], "ranker", "valid/click/auc", model_uri=better[1], tracking_uri=uri
    )
    assert d3.promoted and d3.champion == 0.70
    assert str(client.get_model_version_by_alias("ranker", "champion").version) == d3.version
    # registering a run again adds no version and does not demote anything
    again = register_candidate(worse[0], "ranker", "valid/click/auc", tracking_uri=uri)
    assert again.already_registered and again.version == d2.version and not again.promoted
    assert len(client.search_model_versions("name='ranker'")) == 3
    # the decision is in the candidate's run too
    assert client.list_artifacts(worse[0], "") and any(
        a.path.startswith("registry_decision_v") for a in client.list_artifacts(worse[0])
    )
    # lower-is-better metrics (a log loss)
    with pytest.raises(ValueError, match="has no metric 'valid/click/logloss'"):
        register_candidate(better[0], "ranker", "valid/click/logloss", tracking_uri=uri)


def test_scoring_input_errors_name_column_and_row(kuairand_scorer) -> None:
    scorer, raw = kuairand_scorer
    with pytest.raises(ScoringInputError, match="input column 'tab' is missing"):
        scorer.score(raw.drop(columns=["tab"]))
    bad = raw.copy()
    bad["tab"] = bad["tab"].astype(object)
    bad.loc[bad.index[3], "tab"] = "four"
    with pytest.raises(ScoringInputError, match=r"input column 'tab', row 3: 'four' is not a int"):
        scorer.score(bad)
    frac = raw.copy()
    frac["duration_ms"] = frac["duration_ms"].astype(float)
    frac.loc[frac.index[1], "duration_ms"] = 1.5
    with pytest.raises(ScoringInputError, match=r"'duration_ms', row 1: 1.5 is not a long"):
        scorer.score(frac)


def test_unseen_ids_and_nulls_score_as_oov(kuairand_scorer) -> None:
    """An id never seen in training, and a missing category, use the OOV row (index 0), as the
    training examples do; their score equals that of any other unseen value."""
    scorer, raw = kuairand_scorer
    rows = raw.head(5).copy()
    a = rows.copy()
    a["user_id"] = 10**12  # never seen
    a["user_active_degree"] = None
    b = rows.copy()
    b["user_id"] = 10**12 + 7
    b["user_active_degree"] = "a brand new degree"
    sa, sb = scorer.score(a), scorer.score(b)
    np.testing.assert_allclose(sa.to_numpy(), sb.to_numpy(), rtol=0, atol=0)
    assert not np.allclose(sa.to_numpy(), scorer.score(rows).to_numpy())
    idx = scorer.transform.sparse_indices(a)
    keys = [s[0] for s in scorer.transform.sparse]
    assert (idx[keys.index("user_id")] == 0).all()
    assert (idx[keys.index("user_active_degree")] == 0).all()


def test_sequence_columns_become_the_batch_sequences(kuairand_scorer) -> None:
    """seq_<name> cells (lists of item indices, as the examples table holds them) become the
    KJT DTRN reads; a missing column or a null cell is an empty sequence; a bad cell is an
    error naming the column and row."""
    scorer, raw = kuairand_scorer
    transform = scorer.transform
    rows = raw.head(3).copy()
    rows["seq_clicked"] = [[5, 7], None, [9]]
    kjt = transform.sequences(rows)
    assert kjt.keys() == transform.sequence_columns
    by_key = kjt.to_dict()
    assert by_key["seq_clicked"].lengths().tolist() == [2, 0, 1]
    assert by_key["seq_clicked"].values().tolist() == [5, 7, 9]
    assert by_key["seq_liked"].lengths().tolist() == [0, 0, 0]
    rows["seq_liked"] = [[1], [2, 10**9], []]
    with pytest.raises(ScoringInputError, match=r"input column 'seq_liked', row 1"):
        transform.sequences(rows)
