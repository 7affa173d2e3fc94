"""Rules for matrix products, attention and functional layers, on tiny hand-built models.

Every test states the exact groups the algebra implies: ``(size, [(member, dim, indices
removed by unit 0)])``. Attention models use E = 12 hidden units, H = 3 heads of
hd = 4 (unless said otherwise), so a head is 4 consecutive rows of a projection and a
head_dim slot is every 4th row.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from axes import assert_axes_match_shapes
from equivalence import check_plan
from oracle import check_group
from torch import Tensor, fx, nn

import depgraph
from depgraph import Plan
from passes.mha import PrunedMultiheadAttention

E, H, HD = 12, 3, 4
X = torch.randn(2, 5, E)

Groups = list[tuple[int, list[tuple[str, int, list[int]]]]]


def groups(a: depgraph.Analysis) -> Groups:
    return [(g.size, [(m.name, m.dim, m.indices([0]).tolist()) for m in g.members]) for g in a.groups]


def analyze(model: nn.Module, *inputs: Tensor) -> depgraph.Analysis:
    """Analyze, asserting that every op had a rule and that every node's axes have its shape."""
    a = depgraph.analyze(model, inputs)
    assert a.unsupported == []
    assert_axes_match_shapes(a)
    return a




def pinned_members(a: depgraph.Analysis, words: str) -> set[tuple[str, int]]:
    """Parameter axes pinned with a reason containing ``words``."""
    return {m for p in a.pinned if words in p.reason for m in p.members}


def rows(start: int, stop: int, step: int = 1) -> list[int]:
    return list(range(start, stop, step))


# -- multi-head attention, written out -------------------------------------------------------


def heads(t: Tensor, n_heads: int = H, head_dim: int = HD) -> Tensor:
    """(b, n, n_heads * head_dim) -> (b, n_heads, n, head_dim), with literal sizes."""
    b, n, _ = t.shape
    return t.view(b, n, n_heads, head_dim).transpose(1, 2)


def merge(t: Tensor, width: int = E) -> Tensor:
    """(b, heads, n, head_dim) -> (b, n, width)."""
    b, _, n, _ = t.shape
    return t.transpose(1, 2).reshape(b, n, width)


class Attention(nn.Module):
    """q/k/v projections viewed into heads; ``mode`` picks how attention is computed."""

    def __init__(self, mode: str = "matmul") -> None:
        super().__init__()
        self.mode = mode
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        if self.mode == "matmul":
            y = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1) @ v
        elif self.mode == "einsum":
            scores = torch.einsum("bhnd,bhmd->bhnm", q, k).softmax(-1)
            y = torch.einsum("bhnm,bhmd->bhnd", scores, v)
        elif self.mode == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, scale=0.5)
        return self.o(merge(y))


# The algebra: view(b, n, H, hd) makes each projection's rows Product(heads, hd).
# q @ kᵀ is a batched matmul over (b, heads): q's and k's heads are one atom; it
# contracts hd, so q's hd = k's hd. scores @ v batches over heads again (v's heads =
# q's heads) and contracts the key positions (pinned: they come from the input); v's
# hd is free and reaches o's columns through the merge (o.weight[1] = Product(heads,
# v_hd)). The input width (q/k/v columns) and o's rows are model input/output: pinned.
# So three groups: heads, the q·k head_dim, the v head_dim.
HEADS = (3, [
    ("q.weight", 0, rows(0, 4)), ("q.bias", 0, rows(0, 4)),
    ("k.weight", 0, rows(0, 4)), ("k.bias", 0, rows(0, 4)),
    ("v.weight", 0, rows(0, 4)), ("v.bias", 0, rows(0, 4)),
    ("o.weight", 1, rows(0, 4)),
])
QK_HEAD_DIM = (4, [
    ("q.weight", 0, rows(0, 12, 4)), ("q.bias", 0, rows(0, 12, 4)),
    ("k.weight", 0, rows(0, 12, 4)), ("k.bias", 0, rows(0, 12, 4)),
])
V_HEAD_DIM = (4, [("v.weight", 0, rows(0, 12, 4)), ("v.bias", 0, rows(0, 12, 4)), ("o.weight", 1, rows(0, 12, 4))])


@pytest.mark.parametrize("mode", ["matmul", "einsum", "sdpa", "sdpa_scaled"])
def test_attention_heads_and_head_dims(mode: str) -> None:
    a = analyze(Attention(mode), X)
    assert groups(a) == [HEADS, QK_HEAD_DIM, V_HEAD_DIM]


def test_sdpa_default_scale_survives_pruning_the_query_key_head_dim() -> None:
    # without scale=, SDPA divides by sqrt(E); prune passes the original scale explicitly,
    # so removing q/k head_dim slots computes what the masked model computes.
    model = Attention("sdpa").eval()
    a = analyze(model, X)
    plan = depgraph.Plan.from_keep(a, {1: torch.tensor([0, 2, 3])})
    x = torch.randn(X.shape)
    small = depgraph.prune(model, plan)
    assert small.q.weight.shape == (9, E)
    torch.testing.assert_close(small(x), depgraph.simulate(model, plan)(x))


class RelativeBias(nn.Module):
    """A learned per-head bias (heads, L, S) passed as SDPA's attn_mask."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))
        self.rel = nn.Parameter(torch.zeros(H, 5, 5))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        return self.o(merge(F.scaled_dot_product_attention(q, k, v, attn_mask=self.rel, scale=0.5)))


def test_sdpa_mask_broadcasts_against_heads_and_positions() -> None:
    a = analyze(RelativeBias(), X)
    head_group = (3, [*HEADS[1][:6], ("rel", 0, [0]), HEADS[1][6]])
    assert groups(a) == [head_group, QK_HEAD_DIM, V_HEAD_DIM]
    assert {("rel", 1), ("rel", 2)} <= pinned_members(a, "input")  # query and key positions


class HeadsByInference(nn.Module):
    """Heads found by ``view(b, n, -1, hd)``: pruning a head needs no rewritten literal, so
    the shape oracle can run the shrunk model."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, HD).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, scale=0.5)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


def test_head_group_is_complete_and_minimal() -> None:
    model = HeadsByInference()
    a = analyze(model, X)
    assert groups(a)[0] == HEADS
    check_group(model, (X,), a, a.groups[0])


# -- grouped-query attention -----------------------------------------------------------------

QH, KVH, GHD = 8, 2, 2  # 8 query heads share 2 key/value heads of head_dim 2; width 16


class GroupedQuery(nn.Module):
    def __init__(self, repeat: str) -> None:
        super().__init__()
        self.repeat = repeat
        self.q, self.o = nn.Linear(E, QH * GHD), nn.Linear(QH * GHD, E)
        self.k, self.v = nn.Linear(E, KVH * GHD), nn.Linear(E, KVH * GHD)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = heads(self.q(x), QH, GHD), heads(self.k(x), KVH, GHD), heads(self.v(x), KVH, GHD)
        if self.repeat == "sdpa":
            return self.o(merge(F.scaled_dot_product_attention(q, k, v, scale=0.5, enable_gqa=True), QH * GHD))
        k, v = self.expand(k), self.expand(v)
        return self.o(merge(torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v, QH * GHD))

    def expand(self, t: Tensor) -> Tensor:
        if self.repeat == "repeat_interleave":
            return t.repeat_interleave(QH // KVH, dim=1)
        b, _, n, _ = t.shape
        return t[:, :, None].expand(b, KVH, QH // KVH, n, GHD).reshape(b, QH, n, GHD)


# Query heads = Product(kv_heads, repeat) (repeat_interleave and expand+reshape both put the
# copies after the kv head), so a kv-head unit removes its 4 query heads: 4 * 2 = 8
# consecutive rows of q and 8 columns of o. With expand or SDPA's enable_gqa the repeat is a
# group too (fewer copies; shrink rewrites expand's literal, the kernel reads the shapes):
# its unit r is query head r of every kv head. repeat_interleave keeps it pinned (its count
# is an argument no rewrite changes). head_dim groups are as in plain attention (q·k
# contracts it; v's reaches o through the merge).
REPEAT_GROUP = (4, [("q.weight", 0, [0, 1, 8, 9]), ("q.bias", 0, [0, 1, 8, 9]), ("o.weight", 1, [0, 1, 8, 9])])
GQA_GROUPS = [
    (2, [
        ("q.weight", 0, rows(0, 8)), ("q.bias", 0, rows(0, 8)),
        ("k.weight", 0, [0, 1]), ("k.bias", 0, [0, 1]),
        ("v.weight", 0, [0, 1]), ("v.bias", 0, [0, 1]),
        ("o.weight", 1, rows(0, 8)),
    ]),
    (2, [("q.weight", 0, rows(0, 16, 2)), ("q.bias", 0, rows(0, 16, 2)),
         ("k.weight", 0, [0, 2]), ("k.bias", 0, [0, 2])]),
    (2, [("v.weight", 0, [0, 2]), ("v.bias", 0, [0, 2]), ("o.weight", 1, rows(0, 16, 2))]),
]


@pytest.mark.parametrize("repeat", ["repeat_interleave", "expand", "sdpa"])
def test_grouped_query_attention_prunes_kv_heads_with_their_query_heads(repeat: str) -> None:
    a = analyze(GroupedQuery(repeat), X)
    kv_heads, *head_dims = GQA_GROUPS
    assert groups(a) == (GQA_GROUPS if repeat == "repeat_interleave" else [kv_heads, REPEAT_GROUP, *head_dims])


@pytest.mark.parametrize("repeat", ["expand", "sdpa"])
def test_grouped_query_attention_prunes_query_heads_within_every_kv_head(repeat: str) -> None:
    torch.manual_seed(0)
    model = GroupedQuery(repeat).eval()
    a = analyze(model, X)
    pruned, _ = check_plan(model, (X,), Plan.from_keep(a, {1: [1, 3]}))  # 2 of 4 query heads per kv head
    assert pruned.q.out_features == 8 and pruned.k.out_features == KVH * GHD


# -- fused qkv projections -------------------------------------------------------------------


class FusedQKV(nn.Module):
    def __init__(self, split: str) -> None:
        super().__init__()
        self.split = split
        self.qkv, self.o = nn.Linear(E, 3 * E), nn.Linear(E, E)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        if self.split == "chunk":
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            q, k, v = heads(q), heads(k), heads(v)
        else:
            q, k, v = self.qkv(x).reshape(b, n, 3, H, HD).permute(2, 0, 3, 1, 4).unbind(0)
        return self.o(merge(torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v))


def test_fused_qkv_chunk_keeps_q_k_v_consistent() -> None:
    # qkv rows = Concat(q, k, v), each Product(heads, hd): a head is rows 0-3 of each third.
    a = analyze(FusedQKV("chunk"), X)
    assert groups(a) == [
        (3, [("qkv.weight", 0, [0, 1, 2, 3, 12, 13, 14, 15, 24, 25, 26, 27]),
             ("qkv.bias", 0, [0, 1, 2, 3, 12, 13, 14, 15, 24, 25, 26, 27]), ("o.weight", 1, rows(0, 4))]),
        (4, [("qkv.weight", 0, [0, 4, 8, 12, 16, 20]), ("qkv.bias", 0, [0, 4, 8, 12, 16, 20])]),
        (4, [("qkv.weight", 0, [24, 28, 32]), ("qkv.bias", 0, [24, 28, 32]), ("o.weight", 1, rows(0, 12, 4))]),
    ]


def test_fused_qkv_reshape_shares_one_head_dim_between_q_k_and_v() -> None:
    # reshape(b, n, 3, H, hd): rows = Product(3, heads, hd) with the 3 pinned by unbind;
    # q, k and v are slices of one tensor, so they share the heads AND the head_dim atom.
    a = analyze(FusedQKV("reshape"), X)
    assert groups(a) == [
        (3, [("qkv.weight", 0, [0, 1, 2, 3, 12, 13, 14, 15, 24, 25, 26, 27]),
             ("qkv.bias", 0, [0, 1, 2, 3, 12, 13, 14, 15, 24, 25, 26, 27]), ("o.weight", 1, rows(0, 4))]),
        (4, [("qkv.weight", 0, rows(0, 36, 4)), ("qkv.bias", 0, rows(0, 36, 4)), ("o.weight", 1, rows(0, 12, 4))]),
    ]


# -- nn.MultiheadAttention -------------------------------------------------------------------


class WithMHA(nn.Module):
    """Linear -> nn.MultiheadAttention (self-attention) -> Linear: neither the query's width
    nor the output width is a model input or output."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.embed = nn.Linear(E, E)
        self.attn = nn.MultiheadAttention(E, H, **kwargs)
        self.head = nn.Linear(E, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        return self.head(self.attn(h, h, h)[0])


@pytest.mark.parametrize("kwargs", [{}, {"batch_first": True}, {"bias": False}])
def test_multihead_attention_prunes_query_width_heads_and_output_width(kwargs: dict[str, Any]) -> None:
    a = analyze(WithMHA(**kwargs), X)
    bias = [] if kwargs.get("bias") is False else [("attn.out_proj.bias", 0, [0])]
    head0 = [*rows(0, 4), *rows(12, 16), *rows(24, 28)]
    in_bias = [] if kwargs.get("bias") is False else [("attn.in_proj_bias", 0, head0)]
    assert groups(a) == [
        (E, [("embed.weight", 0, [0]), ("embed.bias", 0, [0]), ("attn.in_proj_weight", 1, [0])]),
        # head 0 (head_dim E / H = 4): its rows of q, k and v in the packed projection, its out_proj columns
        (H, [("attn.in_proj_weight", 0, head0), *in_bias, ("attn.out_proj.weight", 1, rows(0, 4))]),
        (E, [("attn.out_proj.weight", 0, [0]), *bias, ("head.weight", 1, [0])]),
    ]
    assert {("attn.in_proj_weight", 0), ("attn.out_proj.weight", 1)} <= pinned_members(a, "head_dim")


def test_pruned_multihead_attention_is_replaced_and_equals_its_simulation() -> None:
    torch.manual_seed(0)
    model = WithMHA(add_bias_kv=True, add_zero_attn=True).eval()
    a = analyze(model, X)
    pruned, _ = check_plan(model, (X,), Plan.from_keep(a, {0: [0, 5, 7], 1: [2], 2: [1, 2, 3, 11]}))
    attn = pruned.attn
    assert type(pruned) is WithMHA and isinstance(attn, PrunedMultiheadAttention)
    assert (attn.embed_dim, attn.num_heads, attn.head_dim, attn.out_proj.out_features) == (3, 1, HD, 4)
    assert attn.bias_k.shape == (1, 1, HD) and model.attn.num_heads == H
    again = analyze(pruned, X)  # a pruned model is analyzed like the original (one head left: no group)
    assert [g.size for g in again.groups] == [3, 4]


def test_averaged_attention_weights_that_are_used_pin_the_heads() -> None:
    class Averaged(WithMHA):
        def forward(self, x: Tensor) -> Tensor:
            h = self.embed(x)
            y, w = self.attn(h, h, h)
            return self.head(y) * w.mean()

    a = analyze(Averaged(), X)
    assert [g.size for g in a.groups] == [E, E]
    assert ("attn.out_proj.weight", 1) in pinned_members(a, "averaged over heads")


class CrossMHA(nn.Module):
    """Key and value of their own widths (kdim=6, vdim=10), made by Linears; masks, weights
    per head, bias_k/bias_v and a zero-attention position."""

    def __init__(self) -> None:
        super().__init__()
        self.key, self.value = nn.Linear(4, 6), nn.Linear(4, 10)
        self.attn = nn.MultiheadAttention(E, H, kdim=6, vdim=10, add_bias_kv=True, add_zero_attn=True)
        self.head = nn.Linear(E, 5)

    def forward(self, x: Tensor, memory: Tensor, padding: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        y, w = self.attn(x, self.key(memory), self.value(memory), key_padding_mask=padding,
                         attn_mask=mask, average_attn_weights=False)
        return self.head(y), w


def test_multihead_attention_with_separate_key_and_value_widths() -> None:
    # sequence-first: x (L=5, N=2, E), memory (S=7, N=2, 4); weights (N, H, L, S + 2).
    inputs = (torch.randn(5, 2, E), torch.randn(7, 2, 4), torch.zeros(2, 7, dtype=torch.bool),
              torch.zeros(2 * H, 5, 7, dtype=torch.bool))
    a = analyze(CrossMHA(), *inputs)
    assert groups(a) == [
        (6, [("key.weight", 0, [0]), ("key.bias", 0, [0]), ("attn.k_proj_weight", 1, [0])]),
        (10, [("value.weight", 0, [0]), ("value.bias", 0, [0]), ("attn.v_proj_weight", 1, [0])]),
        (E, [("attn.out_proj.weight", 0, [0]), ("attn.out_proj.bias", 0, [0]), ("head.weight", 1, [0])]),
    ]
    # the per-head weights are a model output and attn_mask (N * heads, L, S) an input: heads stay
    assert {("attn.bias_k", 2), ("attn.bias_v", 2), ("attn.q_proj_weight", 0)} <= pinned_members(a, "model input")
    assert {("attn.bias_k", 2), ("attn.q_proj_weight", 0)} <= pinned_members(a, "head_dim")


def test_multihead_attention_without_weights_returns_none() -> None:
    class NoWeights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.head = nn.MultiheadAttention(E, H, batch_first=True), nn.Linear(E, 5)

        def forward(self, x: Tensor) -> tuple[Tensor, Any]:
            y, w = self.attn(x, x, x, need_weights=False)
            return self.head(y), w

    a = analyze(NoWeights(), X)
    assert [g.size for g in a.groups] == [H, E]  # the heads, the output width (x is the model's input)


# -- matrix products and einsum ---------------------------------------------------------------


class Products(nn.Module):
    """matmul with a 2-D weight, a 1-D vector on either side, addmm and baddbmm."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(E, 6))
        self.u = nn.Parameter(torch.randn(6))
        self.w2 = nn.Parameter(torch.randn(2, 6, 5))  # batch 2, for baddbmm
        self.b2 = nn.Parameter(torch.randn(1, 1, 5))
        self.b3 = nn.Parameter(torch.randn(4))
        self.w3 = nn.Parameter(torch.randn(5, 4))
        self.v = nn.Parameter(torch.randn(4))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = x @ self.w1  # (2, 5, 6)
        gate = self.u @ h.transpose(-2, -1)  # (6) @ (2, 6, 5) -> (2, 5)
        h = torch.baddbmm(self.b2, h, self.w2)  # (2, 5, 5)
        h = torch.addmm(self.b3, h.reshape(-1, 5), self.w3)  # (10, 4)
        return torch.mv(h, self.v) * gate.reshape(-1), h.matmul(self.v)


def test_matrix_products_relate_contracted_axes() -> None:
    a = analyze(Products(), X)
    assert groups(a) == [
        (6, [("w1", 1, [0]), ("u", 0, [0]), ("w2", 1, [0])]),
        (5, [("b2", 2, [0]), ("w2", 2, [0]), ("w3", 0, [0])]),
        (4, [("b3", 0, [0]), ("w3", 1, [0]), ("v", 0, [0])]),
    ]
    assert ("w2", 0) in pinned_members(a, "input")  # batch axis of bmm = the input's batch


class Einsums(nn.Module):
    """einsum with an ellipsis, an implicit output, and the sublist form."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(E, 6))
        self.w2 = nn.Parameter(torch.randn(6, 3))
        self.w3 = nn.Parameter(torch.randn(3, 7))
        self.out = nn.Linear(7, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.einsum("...i,ij->...j", [x, self.w1])  # operands as a list; (2, 5, 6)
        h = torch.einsum("bnj,jk", h, self.w2)  # implicit output: alphabetical "bkn"
        h = torch.einsum(h, [0, 2, 1], self.w3, [2, 3], [0, 1, 3])  # "bkn,kc->bnc"
        return self.out(h)


def test_einsum_letters_ellipsis_and_sublists() -> None:
    a = analyze(Einsums(), X)
    assert groups(a) == [
        (6, [("w1", 1, [0]), ("w2", 0, [0])]),
        (3, [("w2", 1, [0]), ("w3", 0, [0])]),
        (7, [("w3", 1, [0]), ("out.weight", 1, [0])]),
    ]


# -- functional layers and norm variants ------------------------------------------------------


class Functional(nn.Module):
    """F.conv2d -> F.conv2d (2 groups) -> F.batch_norm -> F.conv_transpose1d (2 groups) ->
    F.group_norm (2 groups) -> F.instance_norm -> F.layer_norm -> F.rms_norm -> Linear,
    with every parameter used as a graph value."""

    mean: Tensor
    var: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.w0 = nn.Parameter(torch.randn(4, 2, 1, 1))
        self.w1, self.b1 = nn.Parameter(torch.randn(4, 2, 3, 3)), nn.Parameter(torch.randn(4))
        self.g, self.b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))
        self.w2 = nn.Parameter(torch.randn(4, 3, 3))  # transposed: in 4 = 2 groups x 2, out 2 x 3
        self.gn = nn.Parameter(torch.randn(6))
        self.inw = nn.Parameter(torch.randn(6))
        self.ln_w, self.ln_b = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6))
        self.rms = nn.Parameter(torch.randn(6))
        self.out = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = F.conv2d(F.conv2d(x, self.w0), self.w1, self.b1, 1, 1, 1, 2)  # (1, 4, 5, 5)
        y = F.batch_norm(y, self.mean, self.var, self.g, self.b).mean(-1)
        y = F.conv_transpose1d(y, self.w2, groups=2)  # (1, 6, 7)
        y = F.instance_norm(F.group_norm(y, 2, self.gn), weight=self.inw)
        y = F.layer_norm(y.transpose(1, 2), (6,), self.ln_w, self.ln_b)
        return self.out(F.rms_norm(y, (6,), self.rms))


def test_functional_layers() -> None:
    # w0's 4 rows = conv2d's input = Product(groups, 2 per group); its output (4) =
    # Product(groups, 2 per group) = conv_transpose's input; conv_transpose's output (6) =
    # Product(groups, w2[1] = 3) = group_norm's Product(2 groups, 3). One groups atom of 2.
    a = analyze(Functional(), torch.randn(1, 2, 5, 5))
    stats = [("g", 0), ("b", 0), ("mean", 0), ("var", 0)]
    per_channel = [("gn", 0), ("inw", 0), ("ln_w", 0), ("ln_b", 0), ("rms", 0), ("out.weight", 1)]
    assert groups(a) == [
        (2, [("w0", 0, [0, 1]), ("w1", 0, [0, 1]), ("b1", 0, [0, 1]), *((n, d, [0, 1]) for n, d in stats),
             ("w2", 0, [0, 1]), *((n, d, [0, 1, 2]) for n, d in per_channel)]),
        (2, [("w0", 0, [0, 2]), ("w1", 1, [0])]),
        (2, [("w1", 0, [0, 2]), ("b1", 0, [0, 2]), *((n, d, [0, 2]) for n, d in stats), ("w2", 0, [0, 2])]),
        (3, [("w2", 1, [0]), *((n, d, [0, 3]) for n, d in per_channel)]),
    ]


def test_embedding_function_pins_its_vocabulary() -> None:
    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table, self.out = nn.Parameter(torch.randn(10, 6)), nn.Linear(6, 2)

        def forward(self, i: Tensor) -> Tensor:
            return self.out(F.embedding(i, self.table))

    model, idx = Embed(), torch.zeros(2, 3, dtype=torch.long)
    a = analyze(model, idx)
    assert groups(a) == [(6, [("table", 1, [0]), ("out.weight", 1, [0])])]
    assert ("table", 0) in pinned_members(a, "embedding")
    check_group(model, (idx,), a, a.groups[0])


class NormVariants(nn.Module):
    """Norms without affine parameters, without running statistics, without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 1)
        self.bn = nn.BatchNorm1d(4, affine=False)
        self.bn_live = nn.BatchNorm1d(4, track_running_stats=False)
        self.ln = nn.LayerNorm(4, elementwise_affine=False)
        self.ln_nobias = nn.LayerNorm(4, bias=False)
        self.rms = nn.RMSNorm(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn_live(self.bn(self.conv(x))).transpose(1, 2)
        return self.out(self.rms(self.ln_nobias(self.ln(y))))


def test_norm_variants_without_affine_or_statistics() -> None:
    a = analyze(NormVariants(), torch.randn(2, 3, 5))
    assert groups(a) == [(4, [
        ("conv.weight", 0, [0]), ("conv.bias", 0, [0]), ("bn.running_mean", 0, [0]),
        ("bn.running_var", 0, [0]), ("bn_live.weight", 0, [0]), ("bn_live.bias", 0, [0]),
        ("ln_nobias.weight", 0, [0]), ("rms.weight", 0, [0]), ("out.weight", 1, [0]),
    ])]


def test_traced_graph_calls_the_functional_ops_directly() -> None:
    # the rules are keyed by the F.* functions: make sure fx records them as such
    targets = {n.target for n in fx.symbolic_trace(Functional()).graph.nodes if n.op == "call_function"}
    assert {F.conv2d, F.batch_norm, F.conv_transpose1d, F.group_norm, F.layer_norm, F.rms_norm} <= targets
