"""A tiny hand-made feature layout and random batches for the model unit tests."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from model.base import FeatureLayout, TaskConfig, TaskType
from model.data import Batch

TABLE_ROWS = {"age": 5, "city": 7, "user_id": 30, "genre": 4, "item_id": 50, "tab": 3}


def tiny_layout() -> FeatureLayout:
    keys = ["age", "city", "genre", "tab", "user_id", "item_id"]
    return FeatureLayout(
        sparse_keys=keys,
        tables={k: (TABLE_ROWS[k], [k]) for k in keys},
        user_keys=["age", "city", "user_id"],
        item_keys=["genre", "item_id"],
        context_keys=["tab"],
        n_dense=3,
        sequence_keys=["seq_clicked", "seq_liked"],
        item_rows=TABLE_ROWS["item_id"],
    )


def tiny_tasks() -> list[TaskConfig]:
    """click (binary), dwell (soft target, 4 bins), like (binary): spec order = label order."""
    return [
        TaskConfig("click", TaskType.BINARY, 0),
        TaskConfig("dwell", TaskType.BINARY, 1, is_dwell=True, divisor=3.0),
        TaskConfig("like", TaskType.BINARY, 2),
    ]


def htlnet_tasks() -> list[TaskConfig]:
    """HTLNet's chain on the tiny layout: click -> like -> play seconds (labels column 3)."""
    return [
        TaskConfig("click", TaskType.BINARY, 0),
        TaskConfig("like", TaskType.BINARY, 2),
        TaskConfig("dwell", TaskType.REGRESSION, 3, transform="log1p"),
    ]


def random_sequences(
    layout: FeatureLayout, batch_size: int, g: torch.Generator, max_len: int = 6
) -> KeyedJaggedTensor:
    """Item sequences per key of ``layout.sequence_keys``, 0..max_len items each."""
    M, B = len(layout.sequence_keys), batch_size
    lengths = torch.randint(0, max_len + 1, (M * B,), generator=g)
    lengths[0] = 0  # at least one empty sequence
    values = torch.randint(1, layout.item_rows, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(layout.sequence_keys), values=values, lengths=lengths.int()
    )


def random_batch(
    layout: FeatureLayout, batch_size: int = 16, seed: int = 0, n_users: int = 5, n_pad: int = 0
) -> Batch:
    """A batch of ``batch_size`` rows, the last ``n_pad`` of them padding (mask 0). Labels:
    click, dwell (soft target), like, then the dwell's value in seconds."""
    g = torch.Generator().manual_seed(seed)
    B = batch_size
    users = torch.randint(1, n_users + 1, (B,), generator=g)
    values = []
    for key in layout.sparse_keys:
        rows = layout.tables[key][0]
        values.append(
            users % rows if key == "user_id" else torch.randint(0, rows, (B,), generator=g)
        )
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=layout.sparse_keys,
        values=torch.cat(values),
        lengths=torch.ones(len(layout.sparse_keys) * B, dtype=torch.int32),
    )
    labels = torch.stack(
        [
            torch.randint(0, 2, (B,), generator=g).float(),
            torch.randint(0, 4, (B,), generator=g).float() / 3.0,
            torch.randint(0, 2, (B,), generator=g).float(),
            torch.rand(B, generator=g) * 60.0,
        ],
        dim=1,
    )
    mask = torch.ones(B)
    if n_pad:
        mask[-n_pad:] = 0.0
    return Batch(
        sparse_features=kjt,
        sequences=random_sequences(layout, B, g) if layout.sequence_keys else None,
        dense_features=torch.randn(B, layout.n_dense, generator=g),
        labels=labels * mask[:, None],
        pseudo_labels=torch.rand(B, 3, generator=g),
        n_prev=torch.randint(0, 4, (B,), generator=g) * mask.long(),
        user_idx=users,
        user_key=users * 1000003,
        event_time_ms=torch.randint(0, 10_000, (B,), generator=g),
        example_id=torch.arange(B),
        mask=mask,
    )
