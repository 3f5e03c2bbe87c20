"""The ranking models: shapes, forward/backward, gates, and the STAN loss against a hand
computation."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from model.base import MultiTaskTrain
from model.blocks import CGCLayer, ExpertGroup, MMoELayer, TaskTowers
from model.config import MODEL_NAMES, ModelConfig, load_train_config
from model.registry import build_model
from model.stages import StageThresholds
from model.stan import STAN
from tests.model_fixtures import htlnet_tasks, random_batch, tiny_layout, tiny_tasks

SPEC_TASKS = ["click", "dwell", "like"]


def _cfg(name: str, **kw) -> ModelConfig:
    base = {
        "embedding_dim": 8,
        "bottom_hidden": [16, 8],
        "expert_hidden": [16, 8],
        "tower_hidden": [8],
        "mmoe_experts": 3,
        "ple": {"layers": 2, "task_experts": 2, "shared_experts": 2},
        "stan": {"preference_hidden": [8], "heads": 2},
        "stage": {"ctr_task": "click", "dwell_task": "dwell", "conversion_task": "like"},
    }
    return ModelConfig(name=name, **(base | kw))


def _model(name: str, **kw):
    torch.manual_seed(0)
    return build_model(
        _cfg(name, **kw),
        tiny_layout(),
        htlnet_tasks() if name == "htlnet" else tiny_tasks(),
        spec_tasks=SPEC_TASKS,
        stage_thresholds=StageThresholds(0.5, 0.4, 0.1),
    )


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward_shapes(name: str) -> None:
    model = _model(name)
    train = MultiTaskTrain(model)
    batch = random_batch(tiny_layout(), 16, n_pad=3)
    loss, (per_task, logits, labels) = train(batch)
    assert loss.shape == () and torch.isfinite(loss)
    assert per_task.shape == (3,) and logits.shape == (16, 3) and labels.shape == (16, 3)
    assert torch.allclose(loss.detach(), per_task.sum())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), "every parameter takes part in the loss"
    assert any(float(g.abs().sum()) > 0 for g in grads)
    # the embedding tables get gradients too
    assert model.sparse_arch.ebc.embedding_bags["t_user_id"].weight.grad is not None
    model.eval()
    scores = model.scores(batch)
    assert scores.shape == (16, 3) and bool((scores >= 0).all())
    binary = [k for k, t in enumerate(model.tasks) if t.task_type.value == "binary"]
    assert bool((scores[:, binary] <= 1).all())


@pytest.mark.parametrize("batched", [None, True])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bf16_autocast_runs_the_matmuls_in_bf16_and_the_loss_in_fp32(
    name: str, batched: bool | None
) -> None:
    """``train.precision=bf16``: every linear layer of the dense arch (the batched experts and
    towers too) computes in bfloat16, the logits, losses, gradients and parameters are fp32,
    and the loss is the fp32 loss to bfloat16's precision (8 bits of mantissa)."""
    batch = random_batch(tiny_layout(), 16, n_pad=3, seed=2)
    fp32 = _model(name)
    fp32.train()
    loss32, (per32, _, _) = MultiTaskTrain(fp32)(batch)
    model = _model(name)
    model.train()
    for m in model.modules():  # True: the accelerator's batched kernels, here on CPU
        if hasattr(m, "batched"):
            m.batched = batched
    linear_dtypes: list[torch.dtype] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: linear_dtypes.append(out.dtype))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear | TaskTowers | ExpertGroup)
    ]
    loss, (per_task, logits, _) = MultiTaskTrain(model, torch.bfloat16, "cpu")(batch)
    for h in hooks:
        h.remove()
    assert linear_dtypes and set(linear_dtypes) == {torch.bfloat16}
    assert loss.dtype == per_task.dtype == logits.dtype == torch.float32
    torch.testing.assert_close(per_task, per32.detach(), rtol=0.05, atol=0.02)
    loss.backward()
    for p in model.parameters():
        if p.grad is not None:
            assert p.dtype == p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all())
    if isinstance(model, STAN) and model.use_beta:
        # the Beta state's counts are updated in fp32 (float64 buffers), not in bfloat16
        state = model.beta_state
        assert state.alpha.dtype == torch.float64 and state.alpha.shape[0] > 0


@pytest.mark.parametrize("name", ["mlp_single", "mlp_shared", "mmoe", "ple", "aitm"])
def test_each_tower_outputs_one_logit_per_sample(name: str) -> None:
    model = _model(name)
    _, x = model.embed(random_batch(tiny_layout(), 7))
    if isinstance(model.towers, TaskTowers):
        width = model.towers.in_dim
        assert model.towers(torch.randn(7, width)).shape == (7, 3)
        assert model.towers(torch.randn(3, 7, width)).shape == (7, 3)
    else:
        for tower in model.towers:
            width = tower.mlp[0].in_features
            assert tower(torch.randn(7, width)).shape == (7,)
    assert model.heads(x, random_batch(tiny_layout(), 7)).shape == (7, 3)


def test_padding_rows_change_nothing() -> None:
    """Losses weight rows by mask: changing a padding row's inputs and labels leaves them."""
    model = _model("ple")
    a = random_batch(tiny_layout(), 12, n_pad=4, seed=3)
    b = random_batch(tiny_layout(), 12, n_pad=4, seed=3)
    b.labels[-4:] = 1.0
    b.dense_features[-4:] = 100.0
    torch.testing.assert_close(model.loss(a, model(a)), model.loss(b, model(b)))


def test_mmoe_and_cgc_gates_sum_to_one() -> None:
    x = torch.randn(9, 6)
    mmoe = MMoELayer(6, n_tasks=3, n_experts=4, hidden=[5])
    outs = mmoe(x)
    assert [o.shape for o in outs] == [(9, 5)] * 3
    for w in mmoe.last_gates:
        assert w.shape == (9, 4)
        torch.testing.assert_close(w.sum(1), torch.ones(9))
    cgc = CGCLayer(6, n_tasks=3, task_experts=2, shared_experts=3, hidden=[5], last=False)
    outs = cgc([x] * 4)
    assert len(outs) == 4 and all(o.shape == (9, 5) for o in outs)
    widths = [w.shape[1] for w in cgc.last_gates]
    assert widths == [5, 5, 5, 3 * 2 + 3]  # own + shared experts; the shared gate sees all
    for w in cgc.last_gates:
        torch.testing.assert_close(w.sum(1), torch.ones(9))
    last = CGCLayer(6, n_tasks=3, task_experts=2, shared_experts=3, hidden=[5], last=True)
    assert len(last([x] * 4)) == 3


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("same_input", [True, False])
def test_ple_gate_mixture_is_the_weighted_sum_of_experts(batched: bool, same_input: bool) -> None:
    """Eq. 1-3 by hand from the layer's weights: task k's experts (E_k = 2 each) and the shared
    ones (3) on their inputs, task k's gate a softmax over its own and the shared experts, the
    shared gate a softmax over all of them; with one input for all (the first layer) or task
    inputs of their own (deeper layers, DTRN)."""
    torch.manual_seed(1)
    cgc = CGCLayer(4, n_tasks=2, task_experts=2, shared_experts=3, hidden=[3], last=False)
    cgc.batched = batched
    x = torch.randn(5, 4)
    inputs = [x, x, x] if same_input else [torch.randn(5, 4) for _ in range(3)]
    outs = cgc(inputs)
    w, b = cgc.experts.weights[0], cgc.experts.biases[0]  # [7, 4, 3], [7, 1, 3]

    def expert(j: int, xin: torch.Tensor) -> torch.Tensor:
        return torch.relu(xin @ w[j] + b[j])

    gw, gb = cgc.gates.weight, cgc.gates.bias  # rows: task 0 (5), task 1 (5), shared (7)
    shared = [expert(j, inputs[2]) for j in (4, 5, 6)]
    for k, rows in ((0, slice(0, 5)), (1, slice(5, 10))):
        own = [expert(j, inputs[k]) for j in (2 * k, 2 * k + 1)]
        weights = torch.softmax(inputs[k] @ gw[rows].t() + gb[rows], dim=1)
        want = sum(weights[:, i : i + 1] * e for i, e in enumerate(own + shared))
        torch.testing.assert_close(outs[k], want)
        torch.testing.assert_close(cgc.last_gates[k], weights)
    every = [expert(j, inputs[j // 2]) for j in range(4)] + shared
    weights = torch.softmax(inputs[2] @ gw[10:].t() + gb[10:], dim=1)
    want = sum(weights[:, i : i + 1] * e for i, e in enumerate(every))
    torch.testing.assert_close(outs[2], want)


def test_stan_loss_is_gamma_bce_plus_mse() -> None:
    """L = Σ_k mean(γ_k · BCE_k) + mean(w · (l_k − ỹ_k)²) over real rows, by hand."""
    model = _model("stan", **{})
    model.no_history_weight = 0.25
    batch = random_batch(tiny_layout(), 10, n_pad=2, seed=5)
    model.train()
    out = model(batch)
    gamma, pref = out.aux["gamma"], out.aux["preference"]
    real = batch.mask > 0
    expected = []
    for k in range(3):
        bce = F.binary_cross_entropy_with_logits(
            out.logits[real, k], batch.labels[real, k], reduction="none"
        )
        w = torch.where(batch.n_prev[real] > 0, 1.0, 0.25)
        mse = w * (batch.pseudo_labels[real, k] - pref[real, k]) ** 2
        expected.append((gamma[real, k] * bce).mean() + mse.mean())
    torch.testing.assert_close(model.loss(batch, out), torch.stack(expected))
    assert not gamma.requires_grad
    assert bool((gamma[~real] == 0).all())


def test_gamma_carries_no_gradient_into_the_preference_module() -> None:
    """With the MSE term removed, the preference module gets no gradient at all: γ is a
    detached sample (otherwise the model could lower its loss by pushing ỹ down)."""
    for name in ("stan", "stan_no_beta"):
        model = _model(name)
        batch = random_batch(tiny_layout(), 10, seed=6)
        batch.pseudo_labels.zero_()
        model.train()
        out = model(batch)
        out.aux["preference"] = out.aux["preference"].detach()  # drop the MSE path
        sum(model.loss(batch, out)).backward()
        for p in model.preference.parameters():
            assert p.grad is None or float(p.grad.abs().sum()) == 0.0, name


def test_stan_without_beta_weights_by_the_preference() -> None:
    model = _model("stan_no_beta")
    batch = random_batch(tiny_layout(), 10, seed=7)
    model.train()
    out = model(batch)
    torch.testing.assert_close(out.aux["gamma"], out.aux["preference"].detach())
    assert len(model.beta_state) == 0  # no Beta state is kept


def test_stan_eval_does_not_touch_the_beta_state() -> None:
    model = _model("stan")
    batch = random_batch(tiny_layout(), 10, seed=8)
    model.eval()
    model(batch)
    assert len(model.beta_state) == 0
    model.train()
    model(batch)
    assert len(model.beta_state) == len(torch.unique(batch.user_key))


@pytest.mark.parametrize("f", ["self_attention", "dnn"])
def test_stan_preference_functions(f: str) -> None:
    model = _model("stan", stan={"f": f, "preference_hidden": [8], "heads": 2})
    user = torch.randn(4, 3, 8)
    assert model.preference.represent(user).shape == (4, 3, 8)
    assert model.preference(user).shape == (4, 3)


@pytest.mark.parametrize("batched", [True, False])
def test_stan_preference_matches_its_equations_computed_task_by_task(batched: bool) -> None:
    """The preference module (batched kernels, as on a GPU, or task by task, as on CPU)
    against Eq. 7-9 written out per task with its own weights: U' from torch's
    MultiheadAttention, s^k = U' ⊙ softmax_features(W^k U'), ỹ^k = MLP^k(flatten(s^k))."""
    torch.manual_seed(0)
    model = _model("stan", stan={"f": "self_attention", "preference_hidden": [6], "heads": 2})
    pref = model.preference
    pref.batched = pref.towers.batched = batched
    user = torch.randn(5, 3, 8)
    u = pref.attention(user, user, user, need_weights=False)[0]
    torch.testing.assert_close(pref.represent(user), u)
    want = []
    for k in range(3):
        w_k = pref.task_attention.weight[k * 8 : (k + 1) * 8]  # W^k [D, D]
        s = (u * torch.softmax(u @ w_k.t(), dim=1)).flatten(1)
        w1, b1 = pref.towers.weights[0][k], pref.towers.biases[0][k]
        w2, b2 = pref.towers.weights[1][k], pref.towers.biases[1][k]
        want.append((torch.relu(s @ w1 + b1) @ w2 + b2).squeeze(-1))
    torch.testing.assert_close(pref(user), torch.stack(want, dim=1))


def test_batched_and_task_by_task_kernels_give_the_same_step() -> None:
    """STAN's forward, losses and every gradient are the same whether the towers and the
    preference module run batched (accelerators) or task by task (CPU)."""
    grads = []
    for batched in (True, False):
        torch.manual_seed(0)
        model = _model("stan", stan={"preference_hidden": [6], "heads": 2})
        for m in model.modules():
            if hasattr(m, "batched"):
                m.batched = batched
        model.train()
        batch = random_batch(tiny_layout(), 12, n_pad=2, seed=4)
        loss, (per_task, logits, _) = MultiTaskTrain(model)(batch)
        loss.backward()
        grads.append((per_task, logits, {n: p.grad for n, p in model.named_parameters()}))
    (per_a, logits_a, g_a), (per_b, logits_b, g_b) = grads
    torch.testing.assert_close(per_a, per_b)
    torch.testing.assert_close(logits_a, logits_b)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        if g_a[name] is None:
            assert g_b[name] is None, name
        else:
            torch.testing.assert_close(g_a[name], g_b[name], msg=name)


@pytest.mark.parametrize("batched", [True, False])
def test_task_towers_are_independent_towers(batched: bool) -> None:
    """Tower k of TaskTowers reads x (or x[k]) and only its own weights: its logit equals the
    MLP computed by hand, and a loss on one task's logit gives no other tower a gradient."""
    torch.manual_seed(1)
    towers = TaskTowers(4, 3, [5], dropout=0.0)
    towers.batched = batched
    x = torch.randn(3, 6, 4)
    got = towers(x)
    for k in range(3):
        h = torch.relu(x[k] @ towers.weights[0][k] + towers.biases[0][k])
        want = (h @ towers.weights[1][k] + towers.biases[1][k]).squeeze(-1)
        torch.testing.assert_close(got[:, k], want)
    torch.testing.assert_close(towers(list(x.unbind(0))), got)
    torch.testing.assert_close(towers(x[0]), towers(x[0].expand(3, -1, -1)))
    with pytest.raises(ValueError, match="3 task towers got 2 inputs"):
        towers(x[:2])
    got[:, 1].sum().backward()
    for w in towers.weights:
        assert float(w.grad[1].abs().sum()) > 0
        assert float(w.grad[0].abs().sum()) == 0 and float(w.grad[2].abs().sum()) == 0


def test_ple_stage_appends_the_stage_of_the_pseudo_labels() -> None:
    model = _model("ple_stage")
    batch = random_batch(tiny_layout(), 6, seed=9)
    batch.n_prev[:] = torch.tensor([0, 5, 5, 5, 5, 5])
    # (ctr, dwell, like) pseudo-labels vs thresholds (0.5, 0.4, 0.1)
    batch.pseudo_labels[:] = torch.tensor(
        [[0.9, 0.9, 0.9], [0.2, 0.9, 0.9], [0.8, 0.1, 0.9], [0.8, 0.9, 0.0], [0.8, 0.9, 0.5],
         [0.5, 0.9, 0.5]]
    )  # fmt: skip
    assert model.stages(batch).tolist() == [0, 0, 1, 2, 3, 0]


def test_unknown_model_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="model.name"):
        load_train_config(None, ["model.name=dlrm"])


def test_stan_heads_must_divide_the_embedding_dim() -> None:
    with pytest.raises(ValueError, match="model.stan.heads"):
        _model("stan", stan={"heads": 3})


def test_stan_is_a_ple() -> None:
    assert isinstance(_model("stan"), STAN)


def test_stan_gamma_batch_mean_normalization() -> None:
    """batch_mean: each task's γ is divided by its mean over the real rows (rare tasks keep
    their loss scale); the relative weights of the rows stay."""
    model = _model("stan", stan={"gamma_normalization": "batch_mean", "heads": 2})
    batch = random_batch(tiny_layout(), 10, n_pad=2, seed=11)
    model.train()
    out = model(batch)
    gamma, pref = out.aux["gamma"], out.aux["preference"]
    real = batch.mask > 0
    expected = []
    for k in range(3):
        g = gamma[real, k] / gamma[real, k].mean()
        bce = F.binary_cross_entropy_with_logits(
            out.logits[real, k], batch.labels[real, k], reduction="none"
        )
        mse = (batch.pseudo_labels[real, k] - pref[real, k]) ** 2 * (batch.n_prev[real] > 0)
        expected.append((g * bce).mean() + mse.mean())
    torch.testing.assert_close(model.loss(batch, out), torch.stack(expected))


@pytest.mark.parametrize("name", ["stan", "mlp_shared"])
def test_a_model_saved_with_per_task_towers_loads_into_the_stacked_layout(name: str) -> None:
    """A state dict of the layout before the stacking (one ``Tower`` per task, one task
    attention ``nn.Linear`` per task, as saved by earlier runs and registered champions) is
    upgraded by ``upgrade_state_dict``: the model computes what those modules compute."""
    from torch import nn

    from model.blocks import Tower
    from model.registry import upgrade_state_dict

    torch.manual_seed(2)
    model = _model(name, dropout=0.1 if name == "mlp_shared" else 0.0)
    old = {k: v for k, v in model.state_dict().items() if "towers." not in k}
    width, hidden = model.towers.in_dim, model.cfg.tower_hidden
    old_towers = [Tower(width, hidden, model.cfg.dropout).eval() for _ in range(3)]
    for k, tower in enumerate(old_towers):
        old |= {f"towers.{k}.{n}": v for n, v in tower.state_dict().items()}
    if name == "stan":
        pref = model.preference
        old = {k: v for k, v in old.items() if not k.startswith("preference.task_attention")}
        attentions = [nn.Linear(8, 8, bias=False) for _ in range(3)]
        pref_towers = [
            Tower(pref.towers.in_dim, model.cfg.stan.preference_hidden) for _ in range(3)
        ]
        for k, (a, t) in enumerate(zip(attentions, pref_towers, strict=True)):
            old[f"preference.task_attention.{k}.weight"] = a.weight.detach()
            old |= {f"preference.towers.{k}.{n}": v for n, v in t.state_dict().items()}
    assert any(".mlp." in k for k in old)
    model.load_state_dict(upgrade_state_dict(old, model.state_dict().keys()))
    model.eval()
    x = torch.randn(5, width)
    want = torch.stack([t(x) for t in old_towers], dim=1)
    torch.testing.assert_close(model.towers(x), want)
    if name == "stan":
        user = torch.randn(5, 3, 8)
        u = pref.represent(user)
        old_pref = [
            t((u * torch.softmax(a(u), dim=1)).flatten(1))
            for a, t in zip(attentions, pref_towers, strict=True)
        ]
        torch.testing.assert_close(pref(user), torch.stack(old_pref, dim=1))
    # a state dict already in the stacked layout is left as it is
    now = model.state_dict()
    assert upgrade_state_dict(now, now.keys()).keys() == now.keys()


def test_a_cgc_layer_saved_with_per_task_experts_and_gates_loads_into_the_fused_layer() -> None:
    """The CGC layout before the fusion (an ExpertGroup and a gate per task, a shared group and
    gate) upgraded by ``upgrade_state_dict`` computes what those modules computed."""
    from torch import nn

    from model.registry import upgrade_state_dict

    torch.manual_seed(3)
    T, te, se, width = 2, 2, 3, 4
    task_groups = [ExpertGroup(width, te, [5, 3]) for _ in range(T)]
    shared_group = ExpertGroup(width, se, [5, 3])
    task_gates = [nn.Linear(width, te + se) for _ in range(T)]
    shared_gate = nn.Linear(width, T * te + se)
    old = {}
    for k in range(T):
        old |= {f"task_experts.{k}.{n}": v for n, v in task_groups[k].state_dict().items()}
        old |= {f"task_gates.{k}.{n}": v for n, v in task_gates[k].state_dict().items()}
    old |= {f"shared_experts.{n}": v for n, v in shared_group.state_dict().items()}
    old |= {f"shared_gate.{n}": v for n, v in shared_gate.state_dict().items()}
    cgc = CGCLayer(width, n_tasks=T, task_experts=te, shared_experts=se, hidden=[5, 3], last=False)
    cgc.load_state_dict(upgrade_state_dict(old, cgc.state_dict().keys()))
    x = torch.randn(6, width)
    outs = cgc([x] * (T + 1))
    shared = shared_group(x)
    for k in range(T):
        experts = torch.cat([task_groups[k](x), shared], dim=1)
        w = torch.softmax(task_gates[k](x), dim=1)
        torch.testing.assert_close(outs[k], (w.unsqueeze(-1) * experts).sum(1))
    experts = torch.cat([*(g(x) for g in task_groups), shared], dim=1)
    w = torch.softmax(shared_gate(x), dim=1)
    torch.testing.assert_close(outs[T], (w.unsqueeze(-1) * experts).sum(1))
