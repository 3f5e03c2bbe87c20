"""DTRN (Liu et al., CIKM 2023): task-specific bottom representations from behaviour sequences.

* **TIM** (Task-specific Interest Module): one Transformer encoder-decoder shared by every task
  and behaviour type. The encoder self-attends over a behaviour sequence; the decoder attends
  from the target item to the encoded sequence. A hypernetwork maps the pair (task embedding,
  behaviour embedding) to a scale and a shift that condition the layers (Eq. 6), so one set of
  weights yields T x M different interests.
* **TRM** (Task-specific Representation Refinement Module): per task,
  r_t = raw_t ⊙ sigmoid(MLP_t(raw_t)) with raw_t = [shared input x, the task's M interests]
  (SENet-like, Eq. 9).

The T refined bottoms then feed an MTL backbone (MMoE, PLE, AITM or STAN): see
``MultiTaskModel.embed``. Where the condition enters is configurable (DTRN Table 6):
``ln`` (conditional layer norm, the paper's choice), ``qkv`` (the attention inputs), ``ffn1``
(the FFN's input) or ``ffn2`` (the FFN's hidden layer); the last three modulate with the same
(scale, shift) as FiLM, and use plain layer norms.

The sequences come from the feature pipeline (the last L item indices per behaviour type,
strictly before the event) and are looked up in TorchRec's unpooled ``EmbeddingCollection``, a
table of its own (TorchRec cannot share a table between a bag collection and a sequence
collection), sharded like the other tables.

Shapes: B batch, T tasks, M behaviour types, L padded sequence length, D embedding dim.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

Condition = Literal["ln", "qkv", "ffn1", "ffn2"]
SEQUENCE_TABLE = "t_seq_item"

__all__ = [
    "ConditionalLayerNorm",
    "DTRNBottom",
    "HyperNetwork",
    "TaskInterestModule",
    "TaskRefinementModule",
    "padded_sequences",
]


class ConditionalLayerNorm(nn.Module):
    """CLN(X) = scale ⊙ γ ⊙ (X − μ)/σ + shift + β (DTRN Eq. 6): a layer norm whose own affine
    (γ, β) is modulated by a condition's (scale, shift). With scale 1 and shift 0 it is
    ``nn.LayerNorm``.

    Call: (x [..., D], scale [..., D], shift [..., D]) (broadcastable) -> [..., D].
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None
    ) -> torch.Tensor:
        normed = F.layer_norm(x, x.shape[-1:], eps=self.eps) * self.weight
        if scale is not None:
            normed = normed * scale
        if shift is not None:
            normed = normed + shift
        return normed + self.bias


class HyperNetwork(nn.Module):
    """A 2-layer MLP over [task embedding, behaviour embedding]: per (t, b) pair and per
    conditioned site, a scale (1 + output) and a shift.

    Call: () -> (scale, shift), each [sites, T, M, width].
    """

    def __init__(
        self, n_tasks: int, n_behaviours: int, sites: int, width: int, emb_dim: int, hidden: int
    ) -> None:
        super().__init__()
        self.task_embedding = nn.Parameter(torch.randn(n_tasks, emb_dim) * 0.1)
        self.behaviour_embedding = nn.Parameter(torch.randn(n_behaviours, emb_dim) * 0.1)
        self.mlp = nn.Sequential(
            nn.Linear(2 * emb_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * sites * width)
        )
        self.sites = sites
        self.width = width

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        T, M = self.task_embedding.shape[0], self.behaviour_embedding.shape[0]
        pairs = torch.cat(
            [
                self.task_embedding[:, None, :].expand(T, M, -1),
                self.behaviour_embedding[None, :, :].expand(T, M, -1),
            ],
            dim=-1,
        )
        out = self.mlp(pairs).view(T, M, 2, self.sites, self.width).permute(2, 3, 0, 1, 4)
        return 1.0 + out[0], out[1]


class _Attention(nn.Module):
    """Multi-head attention over key positions with a padding mask.

    Call: (q [N, Lq, D], kv [N, L, D], valid [N, L] bool) -> [N, Lq, D].
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.dtrn.heads={heads} must divide the embedding dim {dim}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        N, Lq, D = q.shape
        h = self.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(N, -1, h, D // h).transpose(1, 2)

        mask = valid[:, None, None, :]  # [N, 1, 1, L]: True = attend
        att = F.scaled_dot_product_attention(split(self.q(q)), split(self.k(kv)), split(self.v(kv)),
                                             attn_mask=mask)  # fmt: skip
        return self.out(att.transpose(1, 2).reshape(N, Lq, D))


def _film(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return x * scale + shift


def _cross_attention_packed(
    attn: _Attention,
    q: torch.Tensor,
    kv: torch.Tensor,
    group: torch.Tensor,
    m_index: torch.Tensor,
    b_index: torch.Tensor,
    n_behaviours: int,
) -> torch.Tensor:
    """Attention of one query per (behaviour, row) group over that group's real tokens only.

    q [Tq, Mq, B, D] (Tq in {1, T}, Mq in {1, M}), kv [Tk, N, D] (the N real tokens, Tk in
    {1, T}), group [N] = m * B + b of each token -> [T', M, B, D] (T' = max(Tq, Tk)). A group
    without tokens gets the output projection's bias (its interest is zeroed by the caller).
    The softmax runs per group with scatter reductions, so no padded position is ever touched.
    """
    _, Mq, B, D = q.shape
    H = attn.heads
    dh = D // H
    Q = attn.q(q)
    Q = Q[:, m_index if Mq > 1 else torch.zeros_like(m_index), b_index]  # [Tq, N, D]
    K, V = attn.k(kv), attn.v(kv)  # [Tk, N, D]
    Tp, N = max(Q.shape[0], K.shape[0]), K.shape[1]  # N may be 0 (a batch of padding rows)
    score = (Q * K).view(Tp, N, H, dh).sum(-1) * dh**-0.5  # [T', N, H]
    G = n_behaviours * B
    idx = group[None, :, None].expand(Tp, N, H)
    top = torch.full((Tp, G, H), -torch.inf, dtype=score.dtype, device=score.device)
    top = top.scatter_reduce(1, idx, score.detach(), reduce="amax", include_self=True)
    e = torch.exp(score - top[:, group])
    denominator = torch.zeros(Tp, G, H, dtype=e.dtype, device=e.device).index_add(1, group, e)
    w = e / denominator[:, group]
    weighted = w[..., None] * V.view(V.shape[0], N, H, dh)  # [T', N, H, dh]
    out = torch.zeros(Tp, G, H, dh, dtype=weighted.dtype, device=weighted.device)
    out = out.index_add(1, group, weighted)
    return attn.out(out.view(Tp, n_behaviours, B, D))


class TaskInterestModule(nn.Module):
    """TIM: a 1-layer post-LN Transformer encoder and a 1-layer decoder (target item as the
    query), shared by every (task, behaviour) pair and conditioned by the hypernetwork.

    Call: (seq [M, B, L, D], valid [M, B, L] bool, target [B, D]) -> interests [T, M, B, D].

    The encoder's self-attention runs on the padded sequences (padding masked); everything
    after it (the conditioned layer norms, the FFNs, the decoder's attention) runs on the N real
    tokens only, packed: sequences are short on average (KuaiRand: about 11 real items per row
    over the 5 behaviours, against 5 x 50 padded slots), and the T-fold conditioned tensors
    would otherwise be mostly padding. A sequence with no item gives a zero interest.
    """

    def __init__(
        self,
        dim: int,
        n_tasks: int,
        n_behaviours: int,
        heads: int,
        ffn_hidden: int,
        condition: Condition,
        hyper_emb_dim: int,
        hyper_hidden: int,
    ) -> None:
        super().__init__()
        self.condition = condition
        self.n_tasks = n_tasks
        self.enc_attn = _Attention(dim, heads)
        self.dec_attn = _Attention(dim, heads)
        self.enc_ffn = nn.ModuleList([nn.Linear(dim, ffn_hidden), nn.Linear(ffn_hidden, dim)])
        self.dec_ffn = nn.ModuleList([nn.Linear(dim, ffn_hidden), nn.Linear(ffn_hidden, dim)])
        self.norms = nn.ModuleList(ConditionalLayerNorm(dim) for _ in range(4))
        # sites: the 4 layer norms (ln), or the encoder's and the decoder's injection point
        sites, width = (4, dim) if condition == "ln" else (2, dim)
        if condition == "ffn2":
            width = ffn_hidden
        self.hyper = HyperNetwork(n_tasks, n_behaviours, sites, width, hyper_emb_dim, hyper_hidden)

    def forward(self, seq: torch.Tensor, valid: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        M, B, L, D = seq.shape
        T, c = self.n_tasks, self.condition
        scale, shift = self.hyper()  # [sites, T, M, width]
        has_items = valid.any(-1)  # [M, B]
        m_index, b_index, l_index = valid.nonzero(as_tuple=True)  # the N real tokens
        group = m_index * B + b_index

        # the condition of each token ([T, N, W]) and of each (behaviour, row) group
        # ([T, M, 1, W]), per site
        def token(site: int) -> tuple[torch.Tensor, torch.Tensor]:
            return scale[site][:, m_index], shift[site][:, m_index]

        def grouped(site: int) -> tuple[torch.Tensor, torch.Tensor]:
            return scale[site][:, :, None, :], shift[site][:, :, None, :]

        def norm(i: int, x: torch.Tensor, cond: Any) -> torch.Tensor:
            return self.norms[i](x, *cond(i)) if c == "ln" else self.norms[i](x)

        def ffn(layers: nn.ModuleList, x: torch.Tensor, site: int, cond: Any) -> torch.Tensor:
            if c == "ffn1":
                x = _film(x, *cond(site))
            h = torch.relu(layers[0](x))
            if c == "ffn2":
                h = _film(h, *cond(site))
            return layers[1](h)

        # encoder self-attention, padded; a row without items attends to one (zero) position,
        # which keeps the softmax finite and is never read
        att_valid = valid.clone()
        att_valid[..., 0] |= ~has_items
        if c == "qkv":  # the condition enters the attention: per task
            s0, h0 = scale[0][:, :, None, None, :], shift[0][:, :, None, None, :]
            a_in = (seq.unsqueeze(0) * s0 + h0).reshape(T * M * B, L, D)
            mask = att_valid.unsqueeze(0).expand(T, M, B, L).reshape(T * M * B, L)
            a_tok = self.enc_attn(a_in, a_in, mask).view(T, M, B, L, D)[
                :, m_index, b_index, l_index
            ]
        else:
            flat = seq.reshape(M * B, L, D)
            a_full = self.enc_attn(flat, flat, att_valid.reshape(M * B, L)).view(M, B, L, D)
            a_tok = a_full[m_index, b_index, l_index][None]  # [1, N, D]
        x = norm(0, seq[m_index, b_index, l_index][None] + a_tok, token)  # [T or 1, N, D]
        x = norm(1, x + ffn(self.enc_ffn, x, 0, token), token)
        # decoder: the target item queries its group's encoded tokens
        q = target[None, None]  # [1, 1, B, D]
        q_in = _film(q, *grouped(1)) if c == "qkv" else q
        kv_in = _film(x, *token(1)) if c == "qkv" else x
        attended = _cross_attention_packed(self.dec_attn, q_in, kv_in, group, m_index, b_index, M)
        y = norm(2, q + attended, grouped)
        y = norm(3, y + ffn(self.dec_ffn, y, 1, grouped), grouped)
        y = y.expand(T, M, B, D)
        return y * has_items[None, :, :, None].to(y.dtype)


class TaskRefinementModule(nn.Module):
    """TRM: per task r_t = raw_t ⊙ sigmoid(W2_t relu(W1_t raw_t)), batched over tasks.

    Call: raw [T, B, I] -> [T, B, I].
    """

    def __init__(self, n_tasks: int, in_dim: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, in_dim // reduction)
        self.w1 = nn.Parameter(torch.empty(n_tasks, in_dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(n_tasks, 1, hidden))
        self.w2 = nn.Parameter(torch.empty(n_tasks, hidden, in_dim))
        self.b2 = nn.Parameter(torch.zeros(n_tasks, 1, in_dim))
        for w in (self.w1, self.w2):
            nn.init.uniform_(w, -1 / math.sqrt(w.shape[1]), 1 / math.sqrt(w.shape[1]))

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(torch.baddbmm(self.b2, torch.relu(torch.baddbmm(self.b1, raw, self.w1)),
                                           self.w2))  # fmt: skip
        return raw * gate


def padded_sequences(
    by_key: dict[str, JaggedTensor], keys: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """An ``EmbeddingCollection``'s lookups of the sequences, padded: (embeddings [M, B, L, D],
    valid [M, B, L]) with L the longest sequence of the batch (at least 1)."""
    lengths = [by_key[key].lengths() for key in keys]
    L = max([1] + [int(n.max()) for n in lengths if n.numel()])
    embs, valids = [], []
    for key, lens in zip(keys, lengths, strict=True):
        embs.append(by_key[key].to_padded_dense(desired_length=L, padding_value=0.0))
        valids.append(torch.arange(L, device=lens.device)[None, :] < lens[:, None])
    return torch.stack(embs), torch.stack(valids)


class DTRNBottom(nn.Module):
    """Sequences + shared input -> T task-specific bottoms (TIM, then TRM).

    Call: (x [B, I], target item embedding [B, D], the sequences' :meth:`lookup`) ->
    [T, B, I + M * D].
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        n_tasks: int,
        sequence_keys: list[str],
        item_rows: int,
        heads: int,
        ffn_hidden: int,
        condition: Condition,
        hyper_emb_dim: int,
        hyper_hidden: int,
        reduction: int,
    ) -> None:
        super().__init__()
        if not sequence_keys:
            raise ValueError("DTRN needs behaviour sequences: the spec has none (`sequences:`)")
        self.sequence_keys = list(sequence_keys)
        self.sequence_collection = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=SEQUENCE_TABLE,
                    embedding_dim=dim,
                    num_embeddings=item_rows,
                    feature_names=list(sequence_keys),
                )
            ],
            device=torch.device("cpu"),
        )
        M = len(sequence_keys)
        self.tim = TaskInterestModule(dim, n_tasks, M, heads, ffn_hidden, condition,
                                      hyper_emb_dim, hyper_hidden)  # fmt: skip
        self.out_dim = in_dim + M * dim
        self.trm = TaskRefinementModule(n_tasks, self.out_dim, reduction)
        self.n_tasks = n_tasks

    def lookup(self, sequences: KeyedJaggedTensor | None) -> dict[str, JaggedTensor]:
        """The batch's sequences looked up in the (sharded) collection: key -> [B, L_b, D]."""
        if sequences is None:  # an identity test: also holds for torch.fx's proxy of a KJT
            raise ValueError("DTRN needs the batch's behaviour sequences (the spec has none?)")
        return self.sequence_collection(sequences)

    def interests(self, target: torch.Tensor, looked_up: dict[str, JaggedTensor]) -> torch.Tensor:
        """[T, M, B, D] from the target item [B, D] and the sequences' :meth:`lookup`."""
        seq, valid = padded_sequences(looked_up, self.sequence_keys)
        return self.tim(seq, valid, target)

    def forward(
        self, x: torch.Tensor, target: torch.Tensor, looked_up: dict[str, JaggedTensor]
    ) -> torch.Tensor:
        interests = self.interests(target, looked_up)
        T, M, B, D = interests.shape
        raw = torch.cat(
            [x.unsqueeze(0).expand(T, -1, -1), interests.permute(0, 2, 1, 3).reshape(T, B, M * D)],
            dim=-1,
        )
        return self.trm(raw)
