"""The shape oracle (tests/oracle.py) on every group of the zoo and of small torchvision
models, and on hand-made wrong groups to show that it can fail."""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from equivalence import check_plan, random_keep
from oracle import Unverifiable, check_group
from torch import Tensor, nn
from zoo import ZOO

import depgraph
from depgraph import Analysis, Group, Member, Plan
from passes.dims import Atom


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Small CPU forwards are ~50x slower with 2 threads on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _oracle(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Analysis, dict[int, str]]:
    """Check every group; return the analysis and, for each unverifiable group, the node
    named by its reason. A group that is not complete or not minimal fails the test."""
    analysis = depgraph.analyze(model, inputs)
    unverifiable: dict[int, str] = {}
    for group in analysis.groups:
        try:
            check_group(model, inputs, analysis, group)
        except Unverifiable as exc:
            match = re.match(r"node '([^']+)'", str(exc))
            assert match, str(exc)
            unverifiable[group.index] = match.group(1)
    return analysis, unverifiable


# -- the zoo ------------------------------------------------------------------------

ZOO_UNVERIFIABLE: dict[str, dict[int, str]] = {
    # view(b, 2, c // 2, h, w): the literal 2 measures the outer shuffle factor
    "channel_shuffle": {0: "view"},
    # view(b, n, 4, 8): heads (dim 2) and head_dim (dim 3) are literals
    "attention": {0: "view", 1: "view", 2: "view_2"},
    "gqa": {0: "view", 1: "view", 2: "view_2"},
    # heads: literal view; q/k head_dim and v head_dim: chunk(3) would no longer cut at 32 and 64
    "fused_qkv_chunk": {0: "view", 1: "chunk", 2: "chunk"},
    # reshape(b, n, 3, 4, 8): heads and head_dim are literals
    "fused_qkv_reshape": {0: "reshape", 1: "reshape"},
}
"""Zoo models with groups the oracle cannot check (group index -> node that fixes a size);
every other zoo model must have every group checked."""


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_groups_are_complete_and_minimal(name: str) -> None:
    analysis, unverifiable = _oracle(ZOO[name].factory(), ZOO[name].example_inputs())
    assert analysis.groups
    assert unverifiable == ZOO_UNVERIFIABLE.get(name, {})


# -- small torchvision models at 64x64 ---------------------------------------------

TORCHVISION_UNVERIFIABLE = {
    "resnet18": 0,
    "mobilenet_v3_small": 0,
    # the first block of each stage writes Concat(branch1, branch2) into the stream, which the
    # next block chunks in two: a group of one branch loses units from one half only
    "shufflenet_v2_x0_5": 12,
    "squeezenet1_1": 0,
    "efficientnet_b0": 0,
}


@pytest.mark.parametrize("name", list(TORCHVISION_UNVERIFIABLE))
def test_torchvision_groups_are_complete_and_minimal(name: str) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(tvm, name)(weights=None)
    inputs = (torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)),)
    analysis, unverifiable = _oracle(model, inputs)
    assert len(unverifiable) == TORCHVISION_UNVERIFIABLE[name], unverifiable
    assert all(node.startswith("chunk") for node in unverifiable.values())


# -- the oracle itself can fail --------------------------------------------------------


def _conv_bn_relu() -> tuple[nn.Module, tuple[Tensor, ...], Analysis]:
    model, inputs = ZOO["conv_bn_relu"].factory(), ZOO["conv_bn_relu"].example_inputs()
    return model, inputs, depgraph.analyze(model, inputs)


def _with_members(group: Group, members: list[Member]) -> Group:
    return dataclasses.replace(group, members=tuple(members))


def test_a_group_missing_a_member_is_not_complete() -> None:
    model, inputs, analysis = _conv_bn_relu()
    group = analysis.groups[0]
    partial = _with_members(group, [m for m in group.members if m.name != "conv2.weight"])
    message = r"group 0 is not complete: .*expected input\[2, 7, 8, 8\] to have 8 channels"
    with pytest.raises(AssertionError, match=message):
        check_group(model, inputs, analysis, partial)


def test_a_group_with_an_unused_member_is_not_minimal() -> None:
    model, inputs, analysis = _conv_bn_relu()
    model.spare = nn.Parameter(torch.zeros(8))
    group = analysis.groups[0]
    extra = Member("spare", 0, group.atom, group.atom)
    with pytest.raises(AssertionError, match="group 0 is not minimal: spare dim 0 left out"):
        check_group(model, inputs, analysis, _with_members(group, [*group.members, extra]))


def test_a_group_that_changes_the_output_shape_is_not_complete() -> None:
    model, inputs, analysis = _conv_bn_relu()
    classes = Atom(999, 6)
    fake = Group(0, 6, tuple(Member(f"conv2.{p}", 0, classes, classes) for p in ("weight", "bias")))
    with pytest.raises(AssertionError, match=r"output shapes \(2, 5, 8, 8\) != \(2, 6, 8, 8\)"):
        check_group(model, inputs, analysis, fake)


def test_conv_groups_are_rewritten_only_when_whole_conv_groups_go() -> None:
    model, inputs = ZOO["grouped_conv"].factory(), ZOO["grouped_conv"].example_inputs()
    analysis = depgraph.analyze(model, inputs)
    whole = analysis.groups[0]  # the 4 conv groups: passes only if groups=4 becomes 3
    assert [m.indices([0]).tolist() for m in whole.members if m.name == "grouped.weight"] == [[0, 1, 2]]
    check_group(model, inputs, analysis, whole)
    assert model.grouped.groups == 4  # the caller's model is untouched
    row = Atom(999, 12)  # one row of conv group 0 only: 11 rows cannot form 4 equal groups
    uneven = Group(0, 12, (Member("grouped.weight", 0, row, row), Member("grouped.bias", 0, row, row),
                           Member("restore.weight", 1, row, row)))
    with pytest.raises(AssertionError, match="not complete"):
        check_group(model, inputs, analysis, uneven)


def test_group_norm_groups_are_rewritten() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.Conv2d(8, 2, 1))
    inputs = (torch.randn(1, 3, 4, 4),)
    analysis, unverifiable = _oracle(model, inputs)
    # channels = Product(4 norm groups, 2 per group): both atoms are groups
    assert [(g.size, g.layers) for g in analysis.groups] == [(4, ["0", "1", "2"]), (2, ["0", "1", "2"])]
    assert unverifiable == {}


def test_layer_norm_without_weights_is_unverifiable() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8),
                          nn.LayerNorm(8, elementwise_affine=False), nn.Linear(8, 4))
    analysis, unverifiable = _oracle(model, (torch.randn(2, 8),))
    assert [g.size for g in analysis.groups] == [16, 8]
    assert unverifiable == {1: "_3"}
    with pytest.raises(Unverifiable, match="LayerNorm module '3' reads sizes from attributes"):
        check_group(model, (torch.randn(2, 8),), analysis, analysis.groups[1])


class _Halves(nn.Module):
    """A linear's output cut in two halves, either with chunk (sizes follow the input) or
    with a fixed slice; ``glu`` multiplies the halves (so they are one group), otherwise
    each half feeds its own linear (two groups)."""

    def __init__(self, fixed: bool, glu: bool) -> None:
        super().__init__()
        self.fixed, self.glu = fixed, glu
        self.up = nn.Linear(4, 8)
        self.left, self.right = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.up(x)
        a, b = (y[:, :4], y[:, 4:]) if self.fixed else y.chunk(2, dim=1)
        return self.left(F.relu(a) * b) if self.glu else self.left(a) + self.right(b)


@pytest.mark.parametrize(
    ("fixed", "glu", "unverifiable"),
    [
        (False, True, {}),  # unit i removes rows i and 4 + i: both chunks lose one
        (False, False, {0: "chunk", 1: "chunk"}),  # a unit of one half only: chunk cuts elsewhere
        (True, True, {0: "getitem"}),  # y[:, :4] keeps 4 of the 6 rows left
    ],
)
def test_splits_of_a_pruned_axis(fixed: bool, glu: bool, unverifiable: dict[int, str]) -> None:
    analysis, found = _oracle(_Halves(fixed, glu), (torch.randn(3, 4),))
    assert found == unverifiable
    assert len(analysis.groups) == (1 if glu else 2)


def test_check_group_leaves_the_model_unchanged() -> None:
    model, inputs, analysis = _conv_bn_relu()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = [id(p) for p in model.parameters()]
    check_group(model, inputs, analysis, analysis.groups[0])
    assert model.training
    assert [id(p) for p in model.parameters()] == ids
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _CrossAttention(nn.Module):
    """Queries from one linear, keys and values (kdim = vdim = 12) from another."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv = nn.Linear(8, 16), nn.Linear(8, 12)
        self.attn = nn.MultiheadAttention(16, 4, kdim=12, vdim=12, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        kv = self.kv(x)
        return self.out(self.attn(self.q(x), kv, kv)[0])


def test_multihead_attention_groups_are_left_to_the_equivalence_check() -> None:
    model, x = _CrossAttention().eval(), torch.randn(2, 5, 8)
    analysis, unverifiable = _oracle(model, (x,))
    # key/value width, query width, heads, output width: every one reaches the module, which
    # prune replaces (its forward ties the query width to num_heads * head_dim), so the
    # oracle, which only slices, cannot check them; simulate-equals-prune does
    assert [(g.size, g.layers) for g in analysis.groups] == [
        (12, ["kv", "attn"]), (16, ["q", "attn"]), (4, ["attn", "attn.out_proj"]), (16, ["attn.out_proj", "out"]),
    ]
    assert unverifiable == {0: "attn", 1: "attn", 2: "attn", 3: "attn"}
    check_plan(model, (x,), Plan.from_keep(analysis, random_keep(analysis, 0)))
