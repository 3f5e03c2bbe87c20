"""The stage rules applied to per-user rates (the analysis side of model/stages.py)."""

from __future__ import annotations

import pandas as pd

from model.stage_analysis import _rates, stage_of_users
from model.stages import StageThresholds


def test_users_get_the_stage_of_their_rates() -> None:
    df = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 2, 3, 3, 4, 4],
            "label_click": [0, 0, 1, 1, 1, 1, 1, 1],
            "label_dwell_bin": [0, 0, 0, 0, 3, 3, 3, 3],
            "label_like": [0, 0, 0, 0, 0, 0, 1, 0],
        }
    )
    cols = {
        "ctr": ("label_click", 1.0),
        "dwell": ("label_dwell_bin", 3.0),
        "conversion": ("label_like", 1.0),
    }
    rates = _rates(df, cols)
    assert rates.loc[4, "conversion"] == 0.5 and rates.loc[3, "dwell"] == 1.0
    stages = stage_of_users(rates, StageThresholds(ctr=0.5, dwell=0.5, conversion=0.0))
    assert stages.to_dict() == {1: 0, 2: 1, 3: 2, 4: 3}  # new, wander, stick, loyal
