"""Exactness on compositions of ordinary ops (issue "Never silently wrong").

Each test is a reproducer that once crashed or computed something else: group counts
that are not products, a grouped conv added to an unequal concat, functional grouped
convs, sizes computed at run time, normalizations and reductions over a pruned axis,
RMSNorm through export, attention over pruned tokens, other batch sizes. ``agree`` keeps
unit 0 of every group (the harshest plan) unless told otherwise, and checks that prune
and simulate agree at the example's batch size and at another one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import Branchy

import depgraph
from depgraph import fuzz

IMG, TOK = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(
    2, 5, 8, generator=torch.Generator().manual_seed(1)
)


class Lambda(nn.Module):
    """A model whose forward is ``f(self, x)``, with the given modules and parameters."""

    def __init__(self, f: Callable[..., Any], **parts: Any) -> None:
        super().__init__()
        self.f = f
        for name, part in parts.items():
            setattr(self, name, part)

    def forward(self, x: torch.Tensor) -> Any:
        return self.f(self, x)


def agree(model: nn.Module, x: torch.Tensor, tracer: str = "auto", keep: Any = None) -> tuple[Any, nn.Module]:
    """Analyze, prune and simulate with ``keep`` (unit 0 of every group by default); assert
    prune == simulate at ``x`` and at a batch one larger. Returns (analysis, pruned)."""
    torch.manual_seed(0)
    model.eval()
    a = depgraph.analyze(model, x, tracer=tracer)
    plan = depgraph.Plan.from_keep(a, keep if keep is not None else {g.index: [0] for g in a.groups})
    pruned, simulated = depgraph.prune(model, plan), depgraph.simulate(model, plan)
    for batch in (x, torch.cat([x, x[:1] * 0.5])):
        with torch.no_grad():
            p, s = pruned(batch), simulated(batch)
        scale = max(s.nan_to_num(0).abs().max().item(), 1e-3)
        assert torch.allclose(p, s, atol=1e-5 * scale, equal_nan=True), (p - s).abs().max()
    return a, pruned


def members(a: Any, group: int) -> list[tuple[str, int, list[int]]]:
    """(name, dim, indices of unit 0) of each weight member of a group."""
    return [(m.name, m.dim, m.indices([0]).tolist()) for m in a.groups[group].members if m.name.endswith("weight")]


# -- group counts that are not products ----------------------------------------------------


def test_group_norm_with_one_channel_per_group_keeps_a_group_per_kept_channel() -> None:
    a, pruned = agree(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(4, 4), nn.Conv2d(4, 2, 1)), IMG)
    assert pruned[1].num_groups == pruned[1].num_channels == 1


def test_grouped_conv_transpose_keeps_its_groups_in_step() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 4, 3, groups=4), nn.Conv2d(4, 2, 1))
    _, pruned = agree(model, IMG)
    assert (pruned[1].groups, pruned[1].in_channels, pruned[1].out_channels) == (1, 1, 1)


def test_group_norm_after_a_concat_counts_the_kept_groups_of_both_parts() -> None:
    model = Lambda(lambda s, x: s.o(s.n(torch.cat([s.a(x), s.b(x)], 1))), a=nn.Conv2d(3, 4, 1),
                   b=nn.Conv2d(3, 4, 1), n=nn.GroupNorm(4, 8), o=nn.Conv2d(8, 2, 1))
    agree(model, IMG)
    # groups: each part's two groups (a's, b's), and the width within a group, shared by all four;
    # keeping unit 0 of each leaves one group of one channel from each part
    a = depgraph.analyze(model.eval(), IMG)
    assert sorted((g.size, len(g.members)) for g in a.groups) == [(2, 5), (2, 5), (2, 7)]  # a, b, n, o; both
    pruned = depgraph.prune(model, depgraph.Plan.from_keep(a, {g.index: [0] for g in a.groups}))
    assert (pruned.n.num_groups, pruned.n.num_channels) == (2, 2)


def test_channel_shuffle_after_a_concat() -> None:
    model = Lambda(lambda s, x: s.o(torch.channel_shuffle(torch.cat([s.a(x), s.b(x)], 1), 2)),
                   a=nn.Conv2d(3, 4, 1), b=nn.Conv2d(3, 6, 1), o=nn.Conv2d(10, 2, 1))
    agree(model, IMG)


def shuffled(s: Any, x: torch.Tensor) -> torch.Tensor:
    """ShuffleNet's channel shuffle, written with views of the batch size read from the input."""
    out = torch.cat([s.a(x), s.b(x)], 1)
    n, c, h, w = out.shape
    return s.o(out.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w))


@pytest.mark.parametrize("batch", [1, 2])
def test_a_view_shuffle_of_a_concat_groups_alike_at_every_batch_size(batch: int) -> None:
    # the batch axis leads both views: the concat after it distributes as it does at batch 1
    model = Lambda(shuffled, a=nn.Conv2d(3, 4, 1), b=nn.Conv2d(3, 4, 1), o=nn.Conv2d(8, 2, 1))
    a, _ = agree(model, IMG[:batch])
    assert len(a.groups) == 1 and not [p for p in a.pinned if "regroups" in p.reason]
    assert members(a, 0) == [("a.weight", 0, [0]), ("b.weight", 0, [0]), ("o.weight", 1, [0, 1])]


# -- a grouped conv added to an unequal concat ---------------------------------------------


def test_grouped_conv_added_to_an_unequal_concat_joins_every_part_it_meets() -> None:
    model = Lambda(
        lambda s, x: s.o(torch.cat([s.a(x), s.b(x), s.c(x)], 1) + s.g(s.h(x))),
        a=nn.Conv2d(3, 4, 1), b=nn.Conv2d(3, 2, 1), c=nn.Conv2d(3, 2, 1), h=nn.Conv2d(3, 6, 1),
        g=nn.Conv2d(6, 8, 1, groups=2), o=nn.Conv2d(8, 3, 1),
    )
    a = depgraph.analyze(model, IMG)
    # g's output channel j of group 0 meets a's channel j; of group 1, b's (j < 2) or c's:
    # so a's channels 0-1 go with b's, 2-3 with c's, each with g's rows in both groups
    by_b = next(g.index for g in a.groups if any(m.name == "b.weight" for m in g.members))
    by_c = next(g.index for g in a.groups if any(m.name == "c.weight" for m in g.members))
    assert members(a, by_b) == [("a.weight", 0, [0]), ("b.weight", 0, [0]), ("g.weight", 0, [0, 4]),
                                ("o.weight", 1, [0, 4])]
    assert members(a, by_c) == [("a.weight", 0, [2]), ("c.weight", 0, [0]), ("g.weight", 0, [2, 6]),
                                ("o.weight", 1, [2, 6])]
    agree(model, IMG)


# -- functional grouped convs ---------------------------------------------------------------


def test_functional_grouped_conv_with_a_literal_groups_is_rewritten() -> None:
    model = Lambda(lambda s, x: s.o(F.conv2d(s.h(x), s.w, None, 1, 0, 1, 2)), h=nn.Conv2d(3, 8, 1),
                   w=nn.Parameter(torch.randn(8, 4, 1, 1)), o=nn.Conv2d(8, 2, 1))
    _, pruned = agree(model, IMG)
    assert isinstance(pruned, torch.fx.GraphModule) and "2)" not in pruned.code.split("conv2d")[1].split("\n")[0]


def test_functional_depthwise_conv_with_groups_read_from_the_shape_keeps_the_class() -> None:
    model = Lambda(lambda s, x: (lambda y: s.o(F.conv2d(y, s.w, None, 1, 1, 1, y.shape[1])))(s.h(x)),
                   h=nn.Conv2d(3, 8, 1), w=nn.Parameter(torch.randn(8, 1, 3, 3)), o=nn.Conv2d(8, 2, 1))
    _, pruned = agree(model, IMG)
    assert type(pruned) is Lambda  # y.shape[1] gives the kept count: nothing to rewrite


# -- sizes computed at run time -------------------------------------------------------------


def _attention(scale: Callable[[torch.Tensor], Any]) -> nn.Module:
    return Lambda(lambda s, x: (lambda q, k: s.o((q @ k.transpose(-1, -2) * scale(q)).softmax(-1) @ k))(s.q(x), s.k(x)),
                  q=nn.Linear(8, 6), k=nn.Linear(8, 6), o=nn.Linear(6, 4))


@pytest.mark.parametrize("scale", [lambda q: q.shape[-1] ** -0.5, lambda q: 1 / math.sqrt(q.size(-1))],
                         ids=["shape_pow", "math_sqrt"])
def test_attention_scale_computed_from_the_pruned_width(scale: Callable[[torch.Tensor], Any]) -> None:
    _, pruned = agree(_attention(scale), TOK)
    x = TOK[:1]
    q, k = pruned.q(x), pruned.k(x)
    expected = pruned.o((q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1) @ k)
    torch.testing.assert_close(pruned(x), expected)  # the pruned model computes it from its own width


def test_functional_layer_norm_with_a_shape_read_at_run_time() -> None:
    model = Lambda(lambda s, x: s.o(F.layer_norm(s.h(x), s.h(x).shape[-1:], s.w)), h=nn.Linear(8, 6),
                   w=nn.Parameter(torch.randn(6)), o=nn.Linear(6, 4))
    agree(model, TOK)


# -- normalizations and reductions over a pruned axis ------------------------------------------


def test_layer_norm_over_channels_and_positions() -> None:
    agree(nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 6, 6]), nn.Conv2d(4, 2, 1)), IMG)


def _reduced(reduce: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    return Lambda(lambda s, x: (lambda y: s.o(y) + reduce(y))(s.h(x)), h=nn.Linear(8, 6), o=nn.Linear(6, 1))


MASKED = {
    "prod": lambda y: torch.tanh(y).prod(-1, keepdim=True),
    "nanmean": lambda y: y.nanmean(-1, keepdim=True),
    "var_mean": lambda y: sum(torch.var_mean(y, -1, keepdim=True)),
    "std_mean": lambda y: sum(torch.std_mean(y, -1, keepdim=True)),
    "all": lambda y: (y > -3).all(-1, keepdim=True).float(),
    "amin": lambda y: y.amin(-1, keepdim=True),
    "logsumexp": lambda y: y.logsumexp(-1, keepdim=True),
    "softmin": lambda y: F.softmin(y, -1).sum(-1, keepdim=True) * y.mean(-1, keepdim=True),
}


@pytest.mark.parametrize("name", sorted(MASKED))
def test_reductions_over_a_pruned_axis_count_kept_entries_only(name: str) -> None:
    agree(_reduced(MASKED[name]), TOK, keep=None if name != "std_mean" else {0: [0, 2, 3]})


POSITIONAL = {
    "median": lambda y: y.median(-1, keepdim=True).values,
    "nanmedian": lambda y: y.nanmedian(-1, keepdim=True).values,
    "mode": lambda y: y.mode(-1, keepdim=True).values,
    "kthvalue": lambda y: y.kthvalue(2, -1, keepdim=True).values,
    "argmax": lambda y: y.argmax(-1, keepdim=True).float(),
    "max_indices": lambda y: y.max(-1, keepdim=True).indices.float(),
}


@pytest.mark.parametrize("name", sorted(POSITIONAL))
def test_order_statistics_pin_the_axis_they_choose_along(name: str) -> None:
    a = depgraph.analyze(_reduced(POSITIONAL[name]).eval(), TOK)
    assert not any(m.name == "h.weight" and m.dim == 0 for g in a.groups for m in g.members)
    assert any(("h.weight", 0) in p.members and "order statistic" in p.reason for p in a.pinned)


def test_batch_norm_in_training_mode_over_a_pruned_axis() -> None:
    """Weight standardization (timm's ScaledStdConv2d): F.batch_norm over a conv's weight
    reshaped to (1, out, in * k * k) takes statistics over its input channels."""

    def standardized(s: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(s.c.weight.reshape(1, 6, -1), None, None, training=True, momentum=0.0).reshape_as(s.c.weight)
        return s.o(F.conv2d(s.h(x), w))

    agree(Lambda(standardized, h=nn.Conv2d(3, 4, 1), c=nn.Conv2d(4, 6, 3), o=nn.Conv2d(6, 2, 1)), IMG)


def test_batch_statistics_over_one_pruned_axis_keep_two_of_its_units() -> None:
    """A 1x1 conv's weight standardized over its input channels alone: keeping one input
    channel would leave one value per channel (batch norm fails in training mode), so the
    group that prunes them must keep two, and plans and the solver honour it."""

    def standardized(s: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(s.c.weight.reshape(1, 6, -1), None, None, training=True, momentum=0.0).reshape_as(s.c.weight)
        return s.o(F.conv2d(s.h(x), w))

    model = Lambda(standardized, h=nn.Conv2d(3, 4, 1), c=nn.Conv2d(4, 6, 1), o=nn.Conv2d(6, 2, 1)).eval()
    a = depgraph.analyze(model, IMG)
    group = next(g for g in a.groups if ("h.weight", 0) in {(m.name, m.dim) for m in g.members})
    assert group.min_keep == 2
    assert group.min_reason == "batch norm in training mode needs more than one value per channel"
    with pytest.raises(depgraph.PlanError, match="must keep at least 2: batch norm in training mode"):
        depgraph.Plan.from_keep(a, {group.index: [0]})
    assert depgraph.solve(a, 0.9).keep[group.index].numel() == 2
    agree(model, IMG, keep={g.index: list(range(g.min_keep)) for g in a.groups})


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_a_batch_folded_with_concatenated_tokens(tracer: str) -> None:
    """Tokens concatenated to a sequence, then the batch folded into the token axis: at
    another batch size the folded axis (batch times tokens plus sequence, two sizes that
    may change) is masked from the input's runtime sizes."""

    def forward(s: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([s.register.expand(x.shape[0], -1, -1), x], 1)
        b, n = x.shape[0], x.shape[1]
        return s.o(torch.relu(s.p(x.reshape(b * n, 8))).reshape(b, n, 4).mean(1))

    model = Lambda(forward, register=nn.Parameter(torch.randn(1, 3, 8)), p=nn.Linear(8, 4), o=nn.Linear(4, 2))
    a, _ = agree(model, TOK, tracer=tracer)
    assert any(m.name == "register" and m.dim == 1 for g in a.groups for m in g.members)


def test_a_constant_the_forward_creates_keeps_its_values_through_export() -> None:
    """``x[..., [0, 0, 1]]`` makes an index tensor on the input's device, which export keeps
    as a constant. prune and simulate analyze the model again; a model without parameters
    was then exported on meta inputs and its constant had no values (both returned zeros,
    and agreed: fuzz seed 4066). Now they get inputs on the model's device (the CPU)."""
    model = Lambda(lambda s, x: x[..., [0, 0, 1]] * 2).eval()
    a = depgraph.analyze(model, TOK, tracer="export")
    plan = depgraph.Plan.from_keep(a, {})
    for result in (depgraph.prune(model, plan), depgraph.simulate(model, plan)):
        torch.testing.assert_close(result(TOK), model(TOK))


@pytest.mark.parametrize("seed", [889, 4066, 22233, 32848, 34166])
def test_fuzz_seeds_that_once_failed(seed: int) -> None:
    """889: export reads a size from a concatenation that lost tokens (``aten.sym_size``,
    already the pruned size at run time, was rescaled again); 4066: an index tensor the
    forward creates, exported on meta inputs; 22233: a mask placed after a reshape that
    folds the batch with learned tokens; 32848: a reshape of ``batch * (tokens + patches)``
    rows inside an attention, with a token removed, rewritten as ``batch * 8 - 2`` (right only
    at the example's batch) instead of ``batch * 7``; 34166: a removed block inside
    ``x + (f(x) + b)`` whose inner sum a value computed and never used also reads (the sum
    would have become the broadcast ``b``: not a removable block now)."""
    status, failure = fuzz.outcome(fuzz.generate(seed))
    assert status == "passed", failure


def test_rms_norm_through_export() -> None:
    _, pruned = agree(nn.Sequential(nn.Linear(8, 16), nn.RMSNorm(16), nn.Linear(16, 4)), TOK, tracer="export")
    assert pruned[1].normalized_shape == (1,)


# -- attention over pruned tokens -----------------------------------------------------------


def _tokens_then(attend: Callable[..., torch.Tensor], **parts: Any) -> nn.Module:
    def forward(s: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([s.register.expand(x.shape[0], -1, -1), s.inp(x)], 1)
        return s.out(attend(s, x)[:, 3:])

    return Lambda(forward, register=nn.Parameter(torch.randn(1, 3, 8)), inp=nn.Linear(8, 8),
                  out=nn.Linear(8, 2), **parts)


def test_scaled_dot_product_attention_leaves_pruned_tokens_out_of_its_keys() -> None:
    model = _tokens_then(lambda s, x: F.scaled_dot_product_attention(x[:, None], x[:, None], x[:, None])[:, 0])
    a, _ = agree(model, TOK)
    assert any(m.name == "register" and m.dim == 1 for g in a.groups for m in g.members)


def test_multihead_attention_leaves_pruned_tokens_out_of_its_keys() -> None:
    model = _tokens_then(lambda s, x: s.mha(x, x, x, need_weights=False)[0],
                         mha=nn.MultiheadAttention(8, 2, batch_first=True))
    a, _ = agree(model, TOK)
    assert any(m.name == "register" and m.dim == 1 for g in a.groups for m in g.members)


# -- other batch sizes ------------------------------------------------------------------------


def test_heads_folded_into_the_batch_run_at_another_batch_size() -> None:
    def forward(s: nn.Module, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], x.shape[1]
        q = s.q(x).reshape(b, n, 2, 3).transpose(1, 2).reshape(b * 2, n, 3)
        return s.o(torch.softmax(q @ q.transpose(1, 2), -1).bmm(q).reshape(b, 2, n, 3).transpose(1, 2).reshape(b, n, 6))

    for tracer in ("fx", "export"):
        a, pruned = agree(Lambda(forward, q=nn.Linear(8, 6), o=nn.Linear(6, 8)), TOK, tracer=tracer)
        assert any(m.name == "q.weight" for g in a.groups for m in g.members)


def test_an_exported_model_analyzed_at_batch_one_runs_at_batch_three() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    a = depgraph.analyze(model.eval(), IMG[:1], tracer="export")
    assert a.notes == ["exported with these input dimensions static (a pruned graph accepts other sizes of the "
                       "other dimensions only): input [1, 2, 3]"]
    pruned = depgraph.prune(model, depgraph.solve(a, 0.5))
    assert pruned(torch.randn(3, 3, 8, 8)).shape == (3, 4)


def test_a_recorded_graph_refuses_other_shapes_with_a_clear_error() -> None:
    model = Branchy().eval()
    a = depgraph.analyze(model, TOK, tracer="record")
    simulated = depgraph.simulate(model, depgraph.Plan.from_keep(a, {0: [0, 1]}))
    assert simulated(TOK).shape == (2, 5, 2)
    with pytest.raises(depgraph.TraceError, match=r"recorded on inputs of shapes \[\(2, 5, 8\)\]"):
        simulated(torch.randn(3, 5, 8))


def test_a_whole_slice_over_a_pruned_axis_keeps_the_class() -> None:
    """``h[:, :]`` takes every kept index after pruning as before: it stays as written, so the
    pruned model is the model's own class (not a graph with ``h[:, 0:3]``)."""

    class Whole(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x)[:, :] + self.a(x)[..., 0:6])

    model = Whole().eval()
    a = depgraph.analyze(model, torch.zeros(3, 4))
    plan = depgraph.Plan.from_keep(a, {0: [0, 2, 5]})
    pruned = depgraph.prune(model, plan)
    x = torch.randn(5, 4)
    assert type(pruned) is Whole
    torch.testing.assert_close(pruned(x), depgraph.simulate(model, plan)(x))
