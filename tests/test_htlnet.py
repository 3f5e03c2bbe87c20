"""HTLNet: the gradient adjustment (projection, magnitude clip), stop-gradient transfers, the
regression target on a log scale."""

from __future__ import annotations

import pytest
import torch

from model.base import MultiTaskTrain
from model.config import ModelConfig
from model.htlnet import HTLNet, adjust_task_gradient, project_conflicting, rescale_magnitude
from tests.model_fixtures import htlnet_tasks, random_batch, tiny_layout


def _model(**htl) -> HTLNet:
    torch.manual_seed(0)
    cfg = ModelConfig(name="htlnet", embedding_dim=8, bottom_hidden=[16, 8],
                      expert_hidden=[16, 8], htlnet=htl)  # fmt: skip
    return HTLNet(tiny_layout(), htlnet_tasks(), cfg)


def test_projection_is_orthogonal_to_the_core_gradient_when_they_conflict() -> None:
    g_core = torch.tensor([1.0, 2.0, 0.0, -1.0])
    conflicting = torch.tensor([-3.0, 0.5, 2.0, 1.0])
    assert torch.dot(conflicting, g_core) < 0
    out = project_conflicting(conflicting, g_core)
    assert abs(float(torch.dot(out, g_core))) < 1e-6
    # only the component along g_core was removed
    torch.testing.assert_close(
        out - conflicting, (out - conflicting).dot(g_core) / g_core.dot(g_core) * g_core
    )
    agreeing = torch.tensor([1.0, 0.0, 5.0, 0.5])
    assert torch.dot(agreeing, g_core) > 0
    assert torch.equal(project_conflicting(agreeing, g_core), agreeing)


def test_magnitude_rescaling_is_clipped() -> None:
    g = torch.tensor([0.1, 0.0, 0.0])
    big_core = torch.tensor([0.0, 10.0, 0.0])  # ratio 100, clipped at 2
    out = rescale_magnitude(g, big_core, gamma=0.5, clip=2.0)
    torch.testing.assert_close(out, 0.5 * 2.0 * g + 0.5 * g)
    small_core = torch.tensor([0.0, 0.05, 0.0])  # ratio 0.5, below the clip
    torch.testing.assert_close(rescale_magnitude(g, small_core, 0.5, 2.0), 0.5 * 0.5 * g + 0.5 * g)
    # the norm never exceeds (gamma * C + 1 - gamma) times the input's
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        a, b = torch.randn(6, generator=gen), torch.randn(6, generator=gen) * 100
        out = adjust_task_gradient(a, b, 0.7, 3.0)
        assert out.norm() <= (0.7 * 3.0 + 0.3) * a.norm() + 1e-5


def test_transfers_carry_no_gradient_into_earlier_towers() -> None:
    model = _model(gradient_adjustment=False).train()
    batch = random_batch(tiny_layout(), 32)
    out = model(batch)
    per = model.loss(batch, out)
    earlier = [*model.towers[0].parameters(), *model.outputs[0].parameters()]
    for k in (1, 2):  # like and the core target read click's tower output and label embedding
        grads = torch.autograd.grad(per[k], earlier, retain_graph=True, allow_unused=True)
        assert all(g is None or float(g.abs().sum()) == 0 for g in grads)
    # click's label table does learn, from the later tasks
    (g_table,) = torch.autograd.grad(per[2], [model.label_tables[0]], retain_graph=True)
    assert float(g_table.abs().sum()) > 0
    # and the shared bottom learns from every task
    shared = list(model.shared.parameters())
    for k in range(3):
        grads = torch.autograd.grad(per[k], shared, retain_graph=True)
        assert sum(float(g.abs().sum()) for g in grads) > 0


def test_gradient_adjustment_replaces_the_shared_gradient_only() -> None:
    batch = random_batch(tiny_layout(), 64, seed=3)
    plain, adjusted = _model(gradient_adjustment=False), _model(gradient_adjustment=True)
    adjusted.load_state_dict(plain.state_dict())
    # the same Gumbel noise in both forward passes
    torch.manual_seed(1)
    out = plain(batch)
    per = plain.loss(batch, out)
    shared = list(plain.shared.parameters())
    per_task = [
        torch.cat([g.flatten() for g in torch.autograd.grad(per[k], shared, retain_graph=True)])
        for k in range(3)
    ]
    expected = per_task[2] + sum(
        adjust_task_gradient(g, per_task[2], 0.5, 2.0) for g in per_task[:2]
    )
    per.sum().backward()

    torch.manual_seed(1)
    out2 = adjusted(batch)
    per2 = adjusted.loss(batch, out2)
    torch.testing.assert_close(per2.detach(), per.detach())  # the reported losses are unchanged
    per2.sum().backward()
    got = torch.cat([p.grad.flatten() for p in adjusted.shared.parameters()])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, torch.cat([p.grad.flatten() for p in shared]))
    # every other parameter gets the plain gradient
    for (name, a), b in zip(adjusted.named_parameters(), plain.parameters(), strict=True):
        if not name.startswith("shared.") and a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_core_target_is_log1p_seconds_and_scores_are_seconds() -> None:
    model = _model().eval()
    batch = random_batch(tiny_layout(), 16)
    y = model.labels(batch)
    torch.testing.assert_close(y[:, 2], torch.log1p(batch.labels[:, 3]))
    logits = model(batch).logits
    scores = model.scores(batch)
    torch.testing.assert_close(scores[:, 2], torch.expm1(logits[:, 2]).clamp_min(0))
    torch.testing.assert_close(scores[:, :2], torch.sigmoid(logits[:, :2]))
    # eval is deterministic (no Gumbel noise)
    torch.testing.assert_close(model.scores(batch), scores)


def test_htlnet_training_wrapper_and_chain_checks() -> None:
    model = _model()
    loss, (per, logits, labels) = MultiTaskTrain(model)(random_batch(tiny_layout(), 16))
    assert per.shape == (3,) and logits.shape == (16, 3)
    torch.testing.assert_close(loss.detach(), per.sum())
    cfg = ModelConfig(name="htlnet", embedding_dim=8)
    with pytest.raises(ValueError, match="ending in a regression"):
        HTLNet(tiny_layout(), htlnet_tasks()[:2], cfg)
