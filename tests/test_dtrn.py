"""DTRN: conditional layer norm, the (task, behaviour) hypernetwork, TIM's padding masks, TRM,
and DTRN on every backbone it composes with."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.base import MultiTaskTrain
from model.config import ModelConfig
from model.dtrn import (
    ConditionalLayerNorm,
    HyperNetwork,
    TaskInterestModule,
    TaskRefinementModule,
    padded_sequences,
)
from model.registry import build_model
from model.stages import StageThresholds
from tests.model_fixtures import random_batch, tiny_layout, tiny_tasks

D, T, M = 8, 3, 2


def _dtrn(backbone: str = "ple", condition: str = "ln"):
    torch.manual_seed(0)
    cfg = ModelConfig(
        name="dtrn",
        embedding_dim=D,
        expert_hidden=[16, 8],
        tower_hidden=[8],
        mmoe_experts=3,
        stan={"preference_hidden": [8]},
        dtrn={"backbone": backbone, "condition": condition, "heads": 2, "ffn_hidden": 16},
    )
    return build_model(cfg, tiny_layout(), tiny_tasks(), spec_tasks=["click", "dwell", "like"],
                       stage_thresholds=StageThresholds(0.5, 0.4, 0.1))  # fmt: skip


def test_cln_is_layer_norm_with_unit_scale_and_zero_shift() -> None:
    torch.manual_seed(0)
    cln, ln = ConditionalLayerNorm(D), nn.LayerNorm(D)
    with torch.no_grad():
        for p in (cln.weight, cln.bias):
            p.normal_()
        ln.weight.copy_(cln.weight)
        ln.bias.copy_(cln.bias)
    x = torch.randn(4, 5, D) * 3 + 1
    torch.testing.assert_close(cln(x, torch.ones(D), torch.zeros(D)), ln(x))
    torch.testing.assert_close(cln(x), ln(x))
    # a condition scales the normalised input and shifts it: gamma_tb * gamma * n + beta_tb + beta
    scale, shift = torch.rand(D) + 0.5, torch.randn(D)
    normed = (ln(x) - ln.bias) / ln.weight
    torch.testing.assert_close(cln(x, scale, shift), scale * ln.weight * normed + shift + ln.bias)


def test_hypernetwork_outputs_differ_by_task_and_behaviour() -> None:
    torch.manual_seed(0)
    hyper = HyperNetwork(T, M, sites=4, width=D, emb_dim=4, hidden=16)
    scale, shift = hyper()
    assert scale.shape == shift.shape == (4, T, M, D)
    pairs = torch.cat([scale, shift], dim=-1).permute(1, 2, 0, 3).reshape(T * M, -1)
    dist = torch.cdist(pairs, pairs) + torch.eye(T * M)
    assert float(dist.detach().min()) > 1e-4, "two (task, behaviour) pairs get the same condition"


@pytest.mark.parametrize("condition", ["ln", "qkv", "ffn1", "ffn2"])
def test_tim_gives_t_by_m_interests_and_ignores_padding(condition: str) -> None:
    torch.manual_seed(0)
    tim = TaskInterestModule(D, T, M, heads=2, ffn_hidden=16, condition=condition,
                             hyper_emb_dim=4, hyper_hidden=16)  # fmt: skip
    B, L = 6, 5
    lengths = torch.tensor([[5, 2, 0, 1, 3, 4], [0, 5, 1, 2, 0, 3]])
    valid = torch.arange(L)[None, None, :] < lengths[..., None]
    seq = torch.randn(M, B, L, D) * valid[..., None]
    target = torch.randn(B, D)
    out = tim(seq, valid, target)
    assert out.shape == (T, M, B, D)
    # garbage at padded positions changes nothing
    noisy = seq + torch.randn(M, B, L, D) * 100 * (~valid)[..., None]
    torch.testing.assert_close(tim(noisy, valid, target), out)
    # an empty sequence is a zero interest; a non-empty one is not
    empty = lengths == 0
    assert torch.equal(out[:, empty], torch.zeros_like(out[:, empty]))
    assert bool((out[:, ~empty].abs().sum(-1) > 0).all())
    # one shared module, yet task-specific interests
    assert not torch.allclose(out[0], out[1])


def test_padded_sequences_from_an_embedding_collection() -> None:
    model = _dtrn()
    batch = random_batch(tiny_layout(), 9, seed=2)
    coll = model.task_bottom.sequence_collection
    emb, valid = padded_sequences(coll(batch.sequences), tiny_layout().sequence_keys)
    lengths = batch.sequences.lengths().view(M, -1)
    assert emb.shape == (M, 9, int(lengths.max()), D)
    assert torch.equal(valid.sum(-1), lengths)
    table = coll.embeddings["t_seq_item"].weight
    by_key = batch.sequences.to_dict()
    for m, key in enumerate(tiny_layout().sequence_keys):
        ids = by_key[key].to_padded_dense(int(lengths.max()))
        torch.testing.assert_close(emb[m][valid[m]], table[ids[valid[m]]])
        assert torch.equal(emb[m][~valid[m]], torch.zeros_like(emb[m][~valid[m]]))


def test_trm_is_a_per_task_sigmoid_gate() -> None:
    torch.manual_seed(0)
    trm = TaskRefinementModule(T, 12, reduction=4)
    raw = torch.randn(T, 5, 12)
    out = trm(raw)
    gate = torch.sigmoid(
        torch.relu(raw @ trm.w1 + trm.b1) @ trm.w2 + trm.b2
    )  # per task, its own weights
    torch.testing.assert_close(out, raw * gate)
    assert bool(((out / raw).abs() <= 1 + 1e-6).all())


@pytest.mark.parametrize("backbone", ["mmoe", "ple", "aitm", "stan"])
def test_dtrn_composes_with_each_backbone(backbone: str) -> None:
    model = _dtrn(backbone)
    batch = random_batch(tiny_layout(), 16, n_pad=2)
    emb, x = model.embed(batch)
    assert x.shape == (T, 16, model.input_dim)
    assert model.input_dim == 6 * D + 3 + M * D
    loss, (per_task, logits, _) = MultiTaskTrain(model)(batch)
    assert logits.shape == (16, T) and per_task.shape == (T,)
    loss.backward()
    weight = model.task_bottom.sequence_collection.embeddings["t_seq_item"].weight
    assert weight.grad is not None and float(weight.grad.abs().sum()) > 0
    assert model.task_bottom.tim.hyper.task_embedding.grad.abs().sum() > 0


def test_dtrn_scores_ignore_other_rows_sequences() -> None:
    """Row i's score depends on row i's sequences only (no leak across the batch)."""
    model = _dtrn().eval()
    a = random_batch(tiny_layout(), 8, seed=5)
    b = random_batch(tiny_layout(), 8, seed=5)
    # replace row 7's sequences in b
    kjt = b.sequences
    lengths = kjt.lengths().view(M, -1).clone()
    per_key = []
    for m, key in enumerate(kjt.keys()):
        dense = kjt.to_dict()[key].to_dense()
        rows = [dense[i] if i < 7 else torch.tensor([3, 4, 5, 6]) for i in range(8)]
        lengths[m, 7] = 4
        per_key.append(torch.cat(rows))
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    b.sequences = KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(), values=torch.cat(per_key), lengths=lengths.flatten().int()
    )
    sa, sb = model.scores(a), model.scores(b)
    torch.testing.assert_close(sa[:7], sb[:7])
    assert not torch.allclose(sa[7], sb[7])


def _padded_reference(tim: TaskInterestModule, seq, valid, target):
    """TIM written the direct way: every (task, behaviour, row) on the padded [L] positions,
    padding masked in every attention (the packed module must equal it)."""
    c, T = tim.condition, tim.n_tasks
    M, B, L, D = seq.shape
    scale, shift = tim.hyper()
    sc, sh = scale[:, :, :, None, None, :], shift[:, :, :, None, None, :]
    has = valid.any(-1)
    valid = valid.clone()
    valid[..., 0] |= ~has

    def attend(attn, q, kv):
        lead = torch.broadcast_shapes(q.shape[:-2], kv.shape[:-2], valid.shape[:-1])
        q, kv = q.expand(*lead, *q.shape[-2:]), kv.expand(*lead, *kv.shape[-2:])
        v = valid.expand(*lead, L)
        out = attn(q.reshape(-1, *q.shape[-2:]), kv.reshape(-1, L, D), v.reshape(-1, L))
        return out.view(*lead, *out.shape[-2:])

    def ffn(layers, x, site):
        if c == "ffn1":
            x = x * sc[site] + sh[site]
        h = torch.relu(layers[0](x))
        if c == "ffn2":
            h = h * sc[site] + sh[site]
        return layers[1](h)

    def norm(i, x):
        return tim.norms[i](x, sc[i], sh[i]) if c == "ln" else tim.norms[i](x)

    x = seq.unsqueeze(0)
    a_in = x * sc[0] + sh[0] if c == "qkv" else x
    x = norm(0, x + attend(tim.enc_attn, a_in, a_in))
    x = norm(1, x + ffn(tim.enc_ffn, x, 0))
    q = target[None, None, :, None, :]
    q_in = q * sc[1] + sh[1] if c == "qkv" else q
    kv_in = x * sc[1] + sh[1] if c == "qkv" else x
    y = norm(2, q + attend(tim.dec_attn, q_in, kv_in))
    y = norm(3, y + ffn(tim.dec_ffn, y, 1))
    return y.squeeze(-2).expand(T, M, B, D) * has[None, :, :, None]


@pytest.mark.parametrize("condition", ["ln", "qkv", "ffn1", "ffn2"])
def test_packed_tim_equals_the_padded_formulation(condition: str) -> None:
    torch.manual_seed(1)
    tim = TaskInterestModule(D, T, M, heads=2, ffn_hidden=16, condition=condition,
                             hyper_emb_dim=4, hyper_hidden=16)  # fmt: skip
    B, L = 7, 6
    lengths = torch.randint(0, L + 1, (M, B))
    lengths[0, 0] = 0
    valid = torch.arange(L)[None, None, :] < lengths[..., None]
    seq = torch.randn(M, B, L, D) * valid[..., None]
    target = torch.randn(B, D, requires_grad=True)
    out = tim(seq, valid, target)
    ref = _padded_reference(tim, seq, valid, target)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # and the gradients agree
    g1 = torch.autograd.grad(out.sum(), [target, *tim.parameters()], allow_unused=True)
    g2 = torch.autograd.grad(ref.sum(), [target, *tim.parameters()], allow_unused=True)
    for a, b in zip(g1, g2, strict=True):
        if a is None or b is None:
            assert a is None or float(a.abs().sum()) == 0
            continue
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("condition", ["ln", "qkv"])
def test_a_batch_without_any_item_gives_zero_interests_and_gradients(condition: str) -> None:
    """The last batch of a rank can be all padding rows: no token at all."""
    tim = TaskInterestModule(D, T, M, heads=2, ffn_hidden=16, condition=condition,
                             hyper_emb_dim=4, hyper_hidden=16)  # fmt: skip
    valid = torch.zeros(M, 4, 1, dtype=torch.bool)
    target = torch.randn(4, D, requires_grad=True)
    out = tim(torch.zeros(M, 4, 1, D), valid, target)
    assert out.shape == (T, M, 4, D) and not out.any()
    out.sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in tim.parameters())
