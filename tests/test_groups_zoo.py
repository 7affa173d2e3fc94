"""Exact groups of every zoo model, worked out by hand from the axis algebra (DESIGN.md).

Each group is written as ``(size, [(member name, dim, flat indices removed by unit 0)])``,
groups and members in order of first appearance (parameters in graph order). A comment
above each group says why it is what it is. The model inputs' and outputs' axes are
pinned in every model, so they appear in no group.
"""

from __future__ import annotations

import pytest
import torch
from zoo import ZOO

import depgraph
from depgraph import Pinned

Expected = list[tuple[int, list[tuple[str, int, list[int]]]]]


def _range(*args: int) -> list[int]:
    return list(range(*args))


EXPECTED: dict[str, Expected] = {
    "conv_bn_relu": [
        # conv1's 8 outputs = BN's channel axis (all four per-channel tensors) = conv2's inputs
        (8, [("conv1.weight", 0, [0]), ("conv1.bias", 0, [0]), ("bn.weight", 0, [0]), ("bn.bias", 0, [0]),
             ("bn.running_mean", 0, [0]), ("bn.running_var", 0, [0]), ("conv2.weight", 1, [0])]),
    ],
    "classifier": [
        # conv's 8 outputs, through BN, pooling (keeps channels) and flatten of (8, 1, 1), into fc's columns
        (8, [("conv.weight", 0, [0]), ("conv.bias", 0, [0]), ("bn.weight", 0, [0]), ("bn.bias", 0, [0]),
             ("bn.running_mean", 0, [0]), ("bn.running_var", 0, [0]), ("fc.weight", 1, [0])]),
    ],
    "residual": [
        # the stream: stem's and conv_b's outputs are added, so equal; conv_a and head read it
        (8, [("stem.weight", 0, [0]), ("stem.bias", 0, [0]), ("conv_a.weight", 1, [0]),
             ("conv_b.weight", 0, [0]), ("conv_b.bias", 0, [0]), ("head.weight", 1, [0])]),
        # the branch's inner width: conv_a's outputs = conv_b's inputs
        (6, [("conv_a.weight", 0, [0]), ("conv_a.bias", 0, [0]), ("conv_b.weight", 1, [0])]),
    ],
    "concat": [
        # c's input axis = Concat(a.out, b.out): a's channels are c's columns 0..5
        (6, [("a.weight", 0, [0]), ("a.bias", 0, [0]), ("c.weight", 1, [0])]),
        # ... and b's channels are c's columns 6..13
        (8, [("b.weight", 0, [0]), ("b.bias", 0, [0]), ("c.weight", 1, [6])]),
    ],
    "depthwise": [
        # dw input = Product(G=6, 1) = expand's outputs; dw output = Product(G, m=2): a group is 2 outputs
        (6, [("expand.weight", 0, [0]), ("expand.bias", 0, [0]), ("dw.weight", 0, [0, 1]),
             ("dw.bias", 0, [0, 1]), ("project.weight", 1, [0, 1])]),
        # the multiplier m: slot 0 of every group (stride 2 in Product(G, m))
        (2, [("dw.weight", 0, _range(0, 12, 2)), ("dw.bias", 0, _range(0, 12, 2)),
             ("project.weight", 1, _range(0, 12, 2))]),
    ],
    "grouped_conv": [
        # conv groups G=4: reduce.out = Product(G, 2 in/group), grouped.out = Product(G, 3 out/group);
        # grouped.weight[1] is the per-group input width only, so it is no member
        (4, [("reduce.weight", 0, [0, 1]), ("reduce.bias", 0, [0, 1]), ("grouped.weight", 0, [0, 1, 2]),
             ("grouped.bias", 0, [0, 1, 2]), ("restore.weight", 1, [0, 1, 2])]),
        # per-group input slot: the same local index in every group of reduce's outputs
        (2, [("reduce.weight", 0, _range(0, 8, 2)), ("reduce.bias", 0, _range(0, 8, 2)),
             ("grouped.weight", 1, [0])]),
        # per-group output slot: the same local index in every group of grouped's outputs
        (3, [("grouped.weight", 0, _range(0, 12, 3)), ("grouped.bias", 0, _range(0, 12, 3)),
             ("restore.weight", 1, _range(0, 12, 3))]),
    ],
    "flatten_linear": [
        # flatten: fc1's input = Product(C=6, H=4, W=4); channel 0 is fc1's columns 0..15
        (6, [("conv.weight", 0, [0]), ("conv.bias", 0, [0]), ("fc1.weight", 1, _range(16))]),
        # fc1's outputs = fc2's inputs
        (8, [("fc1.weight", 0, [0]), ("fc1.bias", 0, [0]), ("fc2.weight", 1, [0])]),
    ],
    "channel_shuffle": [
        # view(b, 2, 4, ..) splits conv1's outputs into Product(g=2, c=4); transpose and view back
        # make conv2's inputs Product(c, g). Unit 0 of g: conv1 rows 0..3, conv2 columns 0, 2, 4, 6
        (2, [("conv1.weight", 0, _range(4)), ("conv1.bias", 0, _range(4)),
             ("conv2.weight", 1, _range(0, 8, 2))]),
        # unit 0 of c: conv1 rows 0 and 4, conv2 columns 0 and 1
        (4, [("conv1.weight", 0, [0, 4]), ("conv1.bias", 0, [0, 4]), ("conv2.weight", 1, [0, 1])]),
    ],
    "no_rule": [
        # conv1's outputs feed the op with no rule and conv2's inputs come out of it: both pinned;
        # only conv2's outputs = conv3's inputs remain
        (6, [("conv2.weight", 0, [0]), ("conv2.bias", 0, [0]), ("conv3.weight", 1, [0])]),
    ],
    "attention": [
        # view(b, n, 4, 8): each projection's outputs = Product(heads, head_dim); q kᵀ and att v
        # batch over heads, so q, k, v (and o's inputs, via the reshape back) share the heads
        (4, [("q.weight", 0, _range(8)), ("q.bias", 0, _range(8)), ("k.weight", 0, _range(8)),
             ("k.bias", 0, _range(8)), ("v.weight", 0, _range(8)), ("v.bias", 0, _range(8)),
             ("o.weight", 1, _range(8))]),
        # q kᵀ contracts head_dim: q's and k's head_dim are one atom (slot 0 of every head)
        (8, [("q.weight", 0, _range(0, 32, 8)), ("q.bias", 0, _range(0, 32, 8)),
             ("k.weight", 0, _range(0, 32, 8)), ("k.bias", 0, _range(0, 32, 8))]),
        # v's head_dim survives att v and is o's inputs' inner factor
        (8, [("v.weight", 0, _range(0, 32, 8)), ("v.bias", 0, _range(0, 32, 8)),
             ("o.weight", 1, _range(0, 32, 8))]),
    ],
    "gqa": [
        # repeat_interleave(2, dim=1): k's and v's heads become Product(kv=2, rep=2) = q's 4 heads,
        # so q's outputs = Product(kv, rep, 8); kv head 0 is q heads 0 and 1, k and v head 0
        (2, [("q.weight", 0, _range(16)), ("q.bias", 0, _range(16)), ("k.weight", 0, _range(8)),
             ("k.bias", 0, _range(8)), ("v.weight", 0, _range(8)), ("v.bias", 0, _range(8)),
             ("o.weight", 1, _range(16))]),
        # (rep, the number of query heads per kv head, is pinned by the repeat_interleave rule: its
        # unit 0, q heads 0 and 2, could go if the count 2 were rewritten; see PINNED)
        # q kᵀ contracts head_dim: q's and k's head_dim are one atom
        (8, [("q.weight", 0, _range(0, 32, 8)), ("q.bias", 0, _range(0, 32, 8)),
             ("k.weight", 0, [0, 8]), ("k.bias", 0, [0, 8])]),
        # v's head_dim goes on into o's inputs (Product(kv, rep, 8))
        (8, [("v.weight", 0, [0, 8]), ("v.bias", 0, [0, 8]), ("o.weight", 1, _range(0, 32, 8))]),
    ],
    "fused_qkv_chunk": [
        # chunk: qkv's outputs = Concat(q, k, v), each Product(heads, head_dim), heads shared
        (4, [("qkv.weight", 0, [*range(8), *range(32, 40), *range(64, 72)]),
             ("qkv.bias", 0, [*range(8), *range(32, 40), *range(64, 72)]), ("o.weight", 1, _range(8))]),
        # q's and k's head_dim (contracted together): slot 0 of every head in the first two parts
        (8, [("qkv.weight", 0, _range(0, 64, 8)), ("qkv.bias", 0, _range(0, 64, 8))]),
        # v's head_dim, in the third part, and o's inputs
        (8, [("qkv.weight", 0, _range(64, 96, 8)), ("qkv.bias", 0, _range(64, 96, 8)),
             ("o.weight", 1, _range(0, 32, 8))]),
    ],
    "fused_qkv_reshape": [
        # reshape(b, n, 3, 4, 8): qkv's outputs = Product(3, heads, head_dim); the 3 is pinned by
        # unbind; head 0 is 8 rows in each of q, k, v
        (4, [("qkv.weight", 0, [*range(8), *range(32, 40), *range(64, 72)]),
             ("qkv.bias", 0, [*range(8), *range(32, 40), *range(64, 72)]), ("o.weight", 1, _range(8))]),
        # one head_dim atom for q, k and v alike (the reshape makes them the same factor)
        (8, [("qkv.weight", 0, _range(0, 96, 8)), ("qkv.bias", 0, _range(0, 96, 8)),
             ("o.weight", 1, _range(0, 32, 8))]),
    ],
    "int_index": [
        # the embedding width rides through the token mixer (a batch axis for it) into head;
        # mix's 5 output tokens are pinned by h[:, 0]
        (12, [("embed.weight", 0, [0]), ("embed.bias", 0, [0]), ("head.weight", 1, [0])]),
    ],
    "layer_scale": [
        # gamma * fc2(..) is added to the stream: gamma (read before fc1 runs) and fc2's outputs are
        # the stream's axis, which embed writes and fc1 and head read (mean over tokens keeps it)
        (12, [("embed.weight", 0, [0]), ("embed.bias", 0, [0]), ("block.gamma", 0, [0]),
              ("block.fc1.weight", 1, [0]), ("block.fc2.weight", 0, [0]), ("block.fc2.bias", 0, [0]),
              ("head.weight", 1, [0])]),
        # the MLP's hidden width
        (16, [("block.fc1.weight", 0, [0]), ("block.fc1.bias", 0, [0]), ("block.fc2.weight", 1, [0])]),
    ],
    "cls_token": [
        # cat on tokens equates every other axis: the cls token's channels = the patches' channels;
        # the position embedding is added to them, LayerNorm and head read them. Tokens are pinned
        # (conv spatial axes, and x[:, 0]).
        (12, [("patch.weight", 0, [0]), ("patch.bias", 0, [0]), ("cls_token", 2, [0]),
              ("pos_embed", 2, [0]), ("norm.weight", 0, [0]), ("norm.bias", 0, [0]),
              ("head.weight", 1, [0])]),
    ],
}

PINNED: dict[str, list[Pinned]] = {
    "classifier": [
        Pinned(4, "axis of a model input", (("conv.weight", 1),)),
        Pinned(5, "axis of a model output", (("fc.weight", 0), ("fc.bias", 0))),
    ],
    "no_rule": [
        Pinned(8, "input of torch._ops.zoo.channel_sort.default, which has no rule",
               (("conv1.weight", 0), ("conv1.bias", 0))),
        Pinned(8, "output of torch._ops.zoo.channel_sort.default, which has no rule", (("conv2.weight", 1),)),
    ],
    "int_index": [Pinned(5, "selected by an integer index", (("mix.weight", 0), ("mix.bias", 0)))],
    "gqa": [Pinned(2, "number of copies made by repeat, tile or repeat_interleave",
                   (("q.weight", 0), ("q.bias", 0), ("o.weight", 1)))],
    "fused_qkv_reshape": [Pinned(3, "selected by an integer index", (("qkv.weight", 0), ("qkv.bias", 0)))],
}
"""Pinned atoms that are the point of a case (a subset of ``Analysis.pinned``)."""

UNSUPPORTED: dict[str, list[str]] = {"no_rule": ["channel_sort_default"]}
"""Nodes listed in ``Analysis.unsupported``; every other zoo model has none."""


def _groups(a: depgraph.Analysis) -> Expected:
    return [(g.size, [(m.name, m.dim, m.indices([0]).tolist()) for m in g.members]) for g in a.groups]


@pytest.fixture(scope="module", params=list(ZOO))
def analyzed(request: pytest.FixtureRequest) -> tuple[str, depgraph.Analysis]:
    factory, inputs = ZOO[request.param]
    return request.param, depgraph.analyze(factory(), inputs())


def test_every_zoo_model_has_an_expectation() -> None:
    assert list(EXPECTED) == list(ZOO)


def test_groups(analyzed: tuple[str, depgraph.Analysis]) -> None:
    name, a = analyzed
    assert _groups(a) == EXPECTED[name]


def test_unsupported(analyzed: tuple[str, depgraph.Analysis]) -> None:
    name, a = analyzed
    assert [u.node for u in a.unsupported] == UNSUPPORTED.get(name, [])


def test_pinned(analyzed: tuple[str, depgraph.Analysis]) -> None:
    name, a = analyzed
    missing = [p for p in PINNED.get(name, []) if p not in a.pinned]
    assert missing == []


def test_no_rule_names_the_op() -> None:
    factory, inputs = ZOO["no_rule"]
    (u,) = depgraph.analyze(factory(), inputs()).unsupported
    assert "channel_sort" in u.op and u.reason.startswith("no rule for")


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_runs_and_is_deterministic(name: str) -> None:
    factory, inputs = ZOO[name]
    rng = torch.get_rng_state()
    first, second = factory(), factory()
    assert torch.equal(torch.get_rng_state(), rng)
    for (k, v), (k2, v2) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    assert torch.equal(first(*inputs()), second(*inputs()))
