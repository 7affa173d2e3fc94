"""The ATen rules and the fallback that lowers ops with no torch-level rule (passes/rules/aten.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from oracle import check_group
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

import depgraph
from depgraph import Analysis
from passes.dims import Unifier
from passes.meta import VALUE
from passes.rules import RULES, Unsupported, aten, relate
from passes.rules.aten import ATEN_RULES, UNFOLLOWED
from passes.rules.pointwise import identity, pointwise
from passes.rules.shape_ops import reshape
from passes.shapes import describe

A = torch.ops.aten


def _groups(a: Analysis) -> list[tuple[int, list[tuple[str, int, list[int]]]]]:
    return [(g.size, [(m.name, m.dim, m.indices([0]).tolist()) for m in g.members]) for g in a.groups]


def _reasons(a: Analysis) -> dict[tuple[str, int], str]:
    return {member: p.reason for p in a.pinned for member in p.members}


# -- user functions: fx keeps them whole, no table will ever have them ---------------


def gated(x: torch.Tensor) -> torch.Tensor:
    """A gate whose split point follows the input: each unit is a pair (i, n + i)."""
    n = x.shape[-1] // 2
    return x[..., :n] * torch.sigmoid(x[..., n:])


def gated_at_4(x: torch.Tensor) -> torch.Tensor:
    """The same gate for an 8-wide input, with its split point written as a literal."""
    return x[..., :4] * torch.sigmoid(x[..., 4:])


def static_nonzero(x: torch.Tensor) -> torch.Tensor:
    """Lowers to aten.nonzero_static, which has no ATen rule."""
    return x * torch.nonzero_static(x, size=2).sum()


for _name in ("gated", "gated_at_4", "static_nonzero"):
    fx.wrap(_name)


class Around(nn.Module):
    """Linear(4 -> 8) -> op -> Linear(width -> 3), for an op that makes ``width`` channels.

    A wrapped function must be called by its global name (``lambda x: gated(x)``): fx
    patches the name, not the function object."""

    def __init__(self, op: Any, width: int = 4) -> None:
        super().__init__()
        self.a, self.b, self.op = nn.Linear(4, 8), nn.Linear(width, 3), op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.op(self.a(x)))


PAIRED = [(4, [("a.weight", 0, [0, 4]), ("a.bias", 0, [0, 4]), ("b.weight", 1, [0])])]


@pytest.fixture(autouse=True)
def _cold_cache() -> Any:
    aten.clear_cache()
    yield
    aten.clear_cache()


# -- the table -----------------------------------------------------------------------


def test_lookups_by_overload_find_the_packet_rule_or_the_pointwise_tag() -> None:
    assert ATEN_RULES.get(A.view.default) is reshape
    assert ATEN_RULES.get(A.clone.default) is identity  # tagged pointwise, but has its own entry
    assert ATEN_RULES.get(A.sigmoid.default) is pointwise
    assert ATEN_RULES.get(A.where.self) is pointwise
    assert ATEN_RULES.get(A.nonzero.default) is None and A.nonzero.default not in ATEN_RULES
    assert ATEN_RULES.get(A.hardswish.default) is None  # not tagged: lowering decomposes it


def _relate_aten(fn: Any, *shapes: tuple[int, ...]) -> tuple[Unifier, list[tuple[Any, ...]], Any]:
    """Trace ``fn`` to post-dispatch ATen (the form torch.export gives) and relate it
    with ATEN_RULES on fresh, unpinned input axes."""
    metas = [torch.empty(s, device="meta") for s in shapes]
    gm = make_fx(fn)(*metas)
    for n in gm.graph.nodes:
        n.meta[VALUE] = describe(n.meta.get("val"))
    u = Unifier()
    inputs = [tuple(u.new(n) for n in s) for s in shapes]
    return u, inputs, relate(gm, u, rules=ATEN_RULES, inputs=inputs).result


def test_post_dispatch_conv_batch_norm_and_linear_relate_their_channels() -> None:
    def net(x, w1, b1, g, beta, mean, var, w2, b2):  # type: ignore[no-untyped-def]
        y = F.conv2d(x, w1, b1)
        y = F.batch_norm(y, mean, var, g, beta, training=True)
        return F.linear(F.relu(y).flatten(1), w2, b2)

    u, (x, w1, b1, g, beta, mean, var, w2, b2), out = _relate_aten(
        net, (2, 3, 5, 5), (6, 3, 3, 3), (6,), (6,), (6,), (6,), (6,), (4, 6 * 9), (4,)
    )
    same = {u.resolve(e) for e in (w1[0], b1[0], g[0], beta[0], mean[0], var[0])}
    assert same == {u.resolve(w1[0])}
    assert u.resolve(x[1]) == u.resolve(w1[1])
    flat = u.resolve(w2[1])  # Product(conv channels, 3, 3)
    assert flat.factors[0] == u.resolve(w1[0]) and [f.size for f in flat.factors] == [6, 3, 3]
    assert u.resolve(out[1]) == u.resolve(w2[0]) == u.resolve(b2[0])
    assert u.pin_reason(u.resolve(w1[2])) == "kernel size of a convolution"


def test_post_dispatch_layer_norm_and_bmm_relate_their_axes() -> None:
    def net(x, w, b, y):  # type: ignore[no-untyped-def]
        return torch.bmm(F.layer_norm(x, (8,), w, b), y)

    u, (x, w, b, y), out = _relate_aten(net, (2, 5, 8), (8,), (8,), (2, 8, 3))
    assert u.resolve(x[2]) == u.resolve(w[0]) == u.resolve(b[0]) == u.resolve(y[1])
    assert u.resolve(out[0]) == u.resolve(x[0]) == u.resolve(y[0])
    assert u.resolve(out[2]) == u.resolve(y[2])


# -- lowering functions and methods ----------------------------------------------------


def test_glu_lowers_to_a_split_in_halves_that_are_pruned_in_pairs() -> None:
    assert F.glu not in RULES, "F.glu has a torch-level rule now: pick an op that has none"
    model = Around(lambda x: F.glu(x, -1))
    a = depgraph.analyze(model, torch.randn(2, 4))
    assert _groups(a) == PAIRED
    assert a.unsupported == []


def test_a_method_with_no_rule_lowers_to_its_pointwise_aten_op() -> None:
    assert "sinc" not in RULES, "Tensor.sinc has a torch-level rule now: pick a method that has none"
    a = depgraph.analyze(Around(lambda x: x.sinc(), width=8), torch.randn(2, 4))
    assert _groups(a) == [(8, [("a.weight", 0, [0]), ("a.bias", 0, [0]), ("b.weight", 1, [0])])]
    assert a.unsupported == []


def test_a_user_function_that_reads_its_split_point_from_the_input_is_prunable() -> None:
    model, x = Around(lambda x: gated(x)), torch.randn(2, 4)
    a = depgraph.analyze(model, x)
    assert _groups(a) == PAIRED
    assert a.unsupported == []
    check_group(model, x, a, a.groups[0])  # shrunk copies run (complete) and need every member


def test_a_user_function_with_a_literal_split_point_pins_the_axis() -> None:
    a = depgraph.analyze(Around(lambda x: gated_at_4(x)), torch.randn(2, 4))
    assert _groups(a) == []
    assert a.unsupported == []
    assert _reasons(a)[("a.weight", 0)] == UNFOLLOWED


# -- lowering leaf modules -----------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


BLOCK_GROUP = [(6, [("block.lin.weight", 0, [0]), ("block.lin.bias", 0, [0]), ("head.weight", 1, [0])])]


class WithLeaf(nn.Module):
    def __init__(self, block: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.block, self.head = block, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def test_a_leaf_module_relates_its_own_parameters() -> None:
    a = depgraph.analyze(WithLeaf(Block(), nn.Linear(6, 2)), torch.randn(2, 4), leaf_modules=["block"])
    assert _groups(a) == BLOCK_GROUP
    assert a.unsupported == []
    assert _reasons(a)[("block.lin.weight", 1)] == "axis of a model input"


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("training", [True, False])
def test_a_leaf_conv_bn_block_groups_the_statistics_too(training: bool) -> None:
    model = WithLeaf(ConvBN(), nn.Conv2d(8, 4, 1)).train(training)
    a = depgraph.analyze(model, torch.randn(2, 3, 8, 8), leaf_modules=["block"])
    names = ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
    assert _groups(a) == [(8, [*((f"block.{n}", 0, [0]) for n in names), ("head.weight", 1, [0])])]
    assert a.unsupported == []


class Attention(nn.Module):
    """Self-attention over (batch, tokens, 8) with 2 heads, written two ways: with the
    head count and width as literals (``literal=True``), or read from the input with an
    explicit scale."""

    def __init__(self, literal: bool) -> None:
        super().__init__()
        self.qkv, self.proj, self.literal = nn.Linear(8, 24), nn.Linear(8, 8), literal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        if self.literal:
            q, k, v = self.qkv(x).view(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4)
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        q, k, v = self.qkv(x).view(b, n, 3, 2, -1).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v, scale=0.5).transpose(1, 2).flatten(2))


def test_a_leaf_attention_prunes_what_its_code_follows() -> None:
    model = WithLeaf(Attention(literal=False), nn.Linear(8, 3))
    a = depgraph.analyze(model, torch.randn(2, 5, 8), leaf_modules=["block"])
    qkv_rows = [0, 4, 8, 12, 16, 20]  # unit 0 of head_dim, in q, k, v and in both heads
    assert _groups(a) == [
        (4, [("block.qkv.weight", 0, qkv_rows), ("block.qkv.bias", 0, qkv_rows),
             ("block.proj.weight", 1, [0, 4])]),
        (8, [("block.proj.weight", 0, [0]), ("block.proj.bias", 0, [0]), ("head.weight", 1, [0])]),
    ]
    assert a.unsupported == []
    heads = [p for p in a.pinned if p.size == 2]  # view(b, n, 3, 2, -1) would give 2 heads of 3
    assert [(p.reason, p.members) for p in heads] == [
        (UNFOLLOWED, (("block.qkv.weight", 0), ("block.qkv.bias", 0), ("block.proj.weight", 1)))
    ]


def test_a_leaf_attention_with_literal_sizes_and_the_default_scale_pins_heads_and_head_dim() -> None:
    model = WithLeaf(Attention(literal=True), nn.Linear(8, 3))
    a = depgraph.analyze(model, torch.randn(2, 5, 8), leaf_modules=["block"])
    assert _groups(a) == [(8, [("block.proj.weight", 0, [0]), ("block.proj.bias", 0, [0]),
                               ("head.weight", 1, [0])])]
    assert a.unsupported == []
    reasons = {p.size: p.reason for p in a.pinned if ("block.proj.weight", 1) in p.members}
    assert reasons[2] == UNFOLLOWED  # view(b, n, 3, 2, 4): the head count is a literal
    assert "default scale" in reasons[4]  # head_dim sets 1/sqrt(E), and no shrink rewrites it here


# -- when lowering fails ----------------------------------------------------------------


class Nonzero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return static_nonzero(self.lin(x))


def test_an_op_that_lowers_to_an_op_with_no_rule_is_pinned_and_listed() -> None:
    a = depgraph.analyze(Around(lambda x: static_nonzero(x), width=8), torch.randn(2, 4))
    assert _groups(a) == []
    op = f"{__name__}.static_nonzero"
    assert a.unsupported == [Unsupported("static_nonzero", op, f"no rule for {op}")]
    reasons = _reasons(a)
    assert reasons[("a.weight", 0)] == f"input of {op}, which has no rule"
    assert reasons[("b.weight", 1)] == f"output of {op}, which has no rule"


def test_a_leaf_module_that_fails_to_lower_pins_its_own_parameters() -> None:
    # no partial registration leaks from the failed lowering: the module's parameters
    # are pinned, with the unsupported module as the reason
    a = depgraph.analyze(WithLeaf(Nonzero(), nn.Linear(8, 3)), torch.randn(2, 8), leaf_modules=["block"])
    assert _groups(a) == []
    assert [(u.node, u.op) for u in a.unsupported] == [("block", "Nonzero module 'block'")]
    block = {member: why for member, why in _reasons(a).items() if member[0].startswith("block.")}
    assert block and set(block.values()) == {"Nonzero module 'block' has no rule"}


def test_an_op_make_fx_cannot_trace_is_pinned_and_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("data-dependent")

    monkeypatch.setattr(aten, "make_fx", refuse)
    a = depgraph.analyze(Around(lambda x: gated(x)), torch.randn(2, 4))
    assert _groups(a) == []
    assert [u.op for u in a.unsupported] == [f"{__name__}.gated"]


# -- the cache ---------------------------------------------------------------------------


class Twice(nn.Module):
    """gated on three 8-wide activations and one 12-wide one."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2, self.a3 = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(4, 8)
        self.w, self.b = nn.Linear(4, 12), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.b(gated(self.a1(x))), self.b(gated(self.a2(x))), gated(self.a3(x)), gated(self.w(x))


def _count_traces(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return make_fx(*args, **kwargs)

    monkeypatch.setattr(aten, "make_fx", counting)
    return calls


def test_lowering_is_cached_by_signature_and_each_use_gets_fresh_atoms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _count_traces(monkeypatch)
    a = depgraph.analyze(Twice(), torch.randn(2, 4))
    # two signatures (8 and 12 wide), each traced once as is and once with its free atom resized
    assert calls[0] == 4
    paired = [("a1.weight", 0, [0, 4]), ("a1.bias", 0, [0, 4]), ("b.weight", 1, [0]),
              ("a2.weight", 0, [0, 4]), ("a2.bias", 0, [0, 4])]
    # a1 and a2 are joined by b; the output pin on a3's use of gated does not reach them: each use
    # of the cached graph gets its own atoms
    assert _groups(a) == [(4, paired)]
    depgraph.analyze(Twice(), torch.randn(2, 4))
    assert calls[0] == 4


def test_a_leaf_module_called_twice_is_traced_once_per_analysis(monkeypatch: pytest.MonkeyPatch) -> None:
    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block, self.head = Block(), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.block(x) + self.block(x + 1))

    calls = _count_traces(monkeypatch)
    model = Reuse()
    a = depgraph.analyze(model, torch.randn(2, 4), leaf_modules=["block"])
    assert calls[0] == 2  # traced as is, and with its 6 outputs resized
    assert _groups(a) == BLOCK_GROUP
    depgraph.analyze(model, torch.randn(2, 4), leaf_modules=["block"])
    assert calls[0] == 4  # modules are cached per traced graph: their attributes may change
