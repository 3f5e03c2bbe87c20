"""What batch scoring's driver needs to know of a logged model, kept in its ``MLmodel`` file.

The driver checks the model's spec against its own, names the output columns and decides
whether to read the behaviour sequences; only the executors score rows. Reading the task names
and the sequence flag from the ``MLmodel`` metadata (and the spec from the model's own
``spec.yaml``) spares the driver the model's load: torch's and torchrec's imports and the
weights, about 10 s on 2 cores. This module imports nothing heavy, as the driver imports it.
"""

from __future__ import annotations

from typing import Any

# the key of the facts in the pyfunc's MLmodel metadata
METADATA_KEY = "lifecycle_scoring"


def scoring_metadata(tasks: list[str], uses_sequences: bool) -> dict[str, Any]:
    """The ``metadata`` of ``mlflow.pyfunc.log_model``: the model's task names, in the order of
    its ``score_<task>`` outputs, and whether it reads the behaviour sequences (DTRN)."""
    return {METADATA_KEY: {"tasks": list(tasks), "uses_sequences": bool(uses_sequences)}}
