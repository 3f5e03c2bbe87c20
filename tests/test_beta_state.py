"""STAN's latent stage module (Algorithm 1) as per-user running state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.beta_state import BetaStageState, sample_beta


def _apply(state: BetaStageState, users, times, prefs, mask=None) -> torch.Tensor:
    users = torch.as_tensor(users, dtype=torch.long)
    prefs = torch.as_tensor(prefs, dtype=torch.float32).reshape(len(users), -1)
    mask = torch.ones(len(users)) if mask is None else torch.as_tensor(mask, dtype=torch.float32)
    return state.update_and_sample(
        users, torch.as_tensor(times, dtype=torch.long), torch.arange(len(users)), prefs, mask
    )


def _loop_reference(events: list[tuple[int, int, int, list[float]]], n_tasks: int):
    """Algorithm 1 literally: every user's samples one by one in (time, id) order."""
    state: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
    for user, _, _, y in sorted(events, key=lambda e: (e[0], e[1], e[2])):
        c, a, b = state.get(user, (0, np.ones(n_tasks), np.ones(n_tasks)))
        c += 1
        state[user] = (c, a + np.asarray(y) * c, b + (1 - np.asarray(y)) * c)
    return state


def test_hand_computed_sequence() -> None:
    """ỹ = 0.2, 0.9, 0.5 for one user: (α, β) = (1.2, 1.8), (3.0, 2.0), (4.5, 3.5)."""
    s = BetaStageState(n_tasks=1)
    _apply(s, [7], [100], [0.2])
    assert s.alpha.tolist() == [[pytest.approx(1.2)]] and s.beta.tolist() == [[pytest.approx(1.8)]]
    _apply(s, [7, 7], [200, 300], [0.9, 0.5])
    assert s.alpha.item() == pytest.approx(4.5)
    assert s.beta.item() == pytest.approx(3.5)
    assert s.count.tolist() == [3]


def test_rows_of_a_user_inside_a_batch_are_applied_in_time_order() -> None:
    """The count c weights each update, so the order matters: shuffled rows of one batch give
    the state of the time-ordered loop, and so does the same stream cut into two batches."""
    users = [3, 1, 3, 3, 1, 2]
    times = [30, 5, 10, 20, 1, 7]
    prefs = [0.9, 0.4, 0.1, 0.5, 0.8, 0.3]
    one = BetaStageState(1)
    _apply(one, users, times, prefs)
    ref = _loop_reference(
        [(u, t, i, [p]) for i, (u, t, p) in enumerate(zip(users, times, prefs, strict=True))], 1
    )
    for i, user in enumerate(one.keys.tolist()):
        c, a, b = ref[user]
        assert one.count[i] == c
        assert one.alpha[i, 0].item() == pytest.approx(a[0])
        assert one.beta[i, 0].item() == pytest.approx(b[0])
    # user 3 in time order: 0.1 (c=1), 0.5 (c=2), 0.9 (c=3): α = 1 + 0.1 + 1.0 + 2.7
    assert one.alpha[one.keys.tolist().index(3), 0].item() == pytest.approx(4.8)
    two = BetaStageState(1)
    order = np.argsort(times)
    first, second = order[:3], order[3:]
    for part in (first, second):
        _apply(two, [users[i] for i in part], [times[i] for i in part], [prefs[i] for i in part])
    torch.testing.assert_close(two.alpha, one.alpha)
    torch.testing.assert_close(two.beta, one.beta)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 6),  # user
            st.integers(0, 5),  # time (ties allowed)
            st.floats(0, 1),
            st.floats(0, 1),
            st.booleans(),  # real row (False: padding)
        ),
        min_size=1,
        max_size=40,
    ),
    st.integers(1, 8),
)
def test_vectorised_update_equals_the_loop(rows, batch_size) -> None:
    """Any stream, cut into batches in stream order (ties broken by position), equals the loop;
    padding rows change nothing and get γ = 0."""
    s = BetaStageState(2)
    # times must not go back for a user across batches: the loader keeps per-user time order
    rows = sorted(rows, key=lambda r: r[1])
    events = []
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        users = torch.tensor([r[0] for r in part])
        times = torch.tensor([r[1] for r in part])
        ids = torch.arange(start, start + len(part))
        prefs = torch.tensor([[r[2], r[3]] for r in part], dtype=torch.float32)
        mask = torch.tensor([1.0 if r[4] else 0.0 for r in part])
        gamma = s.update_and_sample(users, times, ids, prefs, mask)
        assert bool((gamma[mask == 0] == 0).all())
        assert bool(((gamma[mask > 0] >= 0) & (gamma[mask > 0] <= 1)).all())
        events += [
            (r[0], r[1], int(i), [float(prefs[j, 0]), float(prefs[j, 1])])
            for j, (r, i) in enumerate(zip(part, ids, strict=True))
            if r[4]
        ]
    ref = _loop_reference(events, 2)
    assert sorted(ref) == s.keys.tolist()
    for i, user in enumerate(s.keys.tolist()):
        c, a, b = ref[user]
        assert int(s.count[i]) == c
        np.testing.assert_allclose(s.alpha[i].numpy(), a, rtol=1e-12)
        np.testing.assert_allclose(s.beta[i].numpy(), b, rtol=1e-12)


def test_gamma_follows_the_beta_distribution() -> None:
    """One sample each of 4000 new users with ỹ = 0.3: γ ~ Beta(1.3, 1.7), mean 0.4333,
    variance αβ / ((α + β)² (α + β + 1)) = 0.0614."""
    s = BetaStageState(1, seed=3)
    gamma = _apply(s, np.arange(4000), np.zeros(4000), np.full(4000, 0.3))[:, 0].double()
    assert gamma.mean().item() == pytest.approx(1.3 / 3.0, abs=0.015)
    assert gamma.var().item() == pytest.approx(1.3 * 1.7 / (9 * 4), abs=0.006)


def test_heavy_users_gamma_concentrates_on_a_recency_weighted_mean() -> None:
    s = BetaStageState(1)
    n = 400
    prefs = np.r_[np.full(n // 2, 0.1), np.full(n // 2, 0.8)]  # the user changed stage
    gamma = _apply(s, np.zeros(n, int), np.arange(n), prefs)[:, 0]
    weights = np.arange(1, n + 1)
    expected = (1 + (prefs * weights).sum()) / (2 + weights.sum())
    assert expected > 0.6  # the later half weighs more than the plain mean 0.45
    assert gamma[-1].item() == pytest.approx(expected, abs=0.01)


def test_sample_beta_is_seeded() -> None:
    a = torch.tensor([2.0, 5.0], dtype=torch.float64)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(sample_beta(a, a, g1), sample_beta(a, a, g2))


def test_checkpoint_round_trip_continues_identically() -> None:
    rng = np.random.default_rng(0)
    users, prefs = rng.integers(0, 20, 50), rng.random((50, 3))
    a = BetaStageState(3, seed=11)
    _apply(a, users[:30], np.arange(30), prefs[:30])
    saved = a.state_dict()
    b = BetaStageState(3, seed=99)
    b.load_state_dict({k: v.clone() if torch.is_tensor(v) else v for k, v in saved.items()})
    ga = _apply(a, users[30:], np.arange(30, 50), prefs[30:])
    gb = _apply(b, users[30:], np.arange(30, 50), prefs[30:])
    torch.testing.assert_close(ga, gb)  # same state and same sampler position
    torch.testing.assert_close(a.alpha, b.alpha)
    with pytest.raises(ValueError, match="tasks"):
        BetaStageState(2).load_state_dict(saved)


def test_reset_forgets_users_and_reseeds() -> None:
    s = BetaStageState(1, seed=5)
    g1 = _apply(s, [1, 2], [0, 0], [0.5, 0.5])
    s.reset()
    assert len(s) == 0
    torch.testing.assert_close(_apply(s, [1, 2], [0, 0], [0.5, 0.5]), g1)
