"""Shape-moving and reduction rules, on tiny hand-built models.

Every test states the exact groups the algebra implies: ``(size, [(member, dim, indices
removed by unit 0)])``. Most models are ``b(op(a(x)))`` with ``a = Linear(4, 6)``, so the
group under test is a's 6 output units reaching b's columns through the op; convolution
models are the same with 1x1 convolutions. Each test also checks that every op had a
rule, that every node's axes have the node's shape, and runs the shape oracle on every
group it can verify (complete: shrinking all members runs; minimal: leaving any out fails).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from axes import assert_axes_match_shapes
from equivalence import check_plan
from oracle import Unverifiable, check_group
from torch import Tensor, nn

import depgraph
from passes.rules.reduce import POOLED, SORTED
from passes.rules.shape_ops import (
    ADVANCED,
    COMPUTED,
    INT_INDEX,
    LITERAL,
    PADDED,
    REFLECTED,
    REORDERED,
    REPEATED,
    SHUFFLED,
    STEPPED,
)

Groups = list[tuple[int, list[tuple[str, int, list[int]]]]]
X2 = torch.randn(2, 4)
X4 = torch.randn(1, 4, 8, 8)


class Net(nn.Module):
    """``forward(x) = fn(self, x)``, with the given layers (or plain functions) as attributes."""

    def __init__(self, fn: Callable[[Any, Tensor], Tensor], **layers: Any) -> None:
        super().__init__()
        self.fn = fn
        for name, layer in layers.items():
            setattr(self, name, layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self, x)


def _through(s: Any, x: Tensor) -> Tensor:
    return s.b(s.op(s.a(x)))


def linear(op: Any, b_in: int = 6, a_out: int = 6) -> Net:
    """``b(op(a(x)))`` with ``a = Linear(4, a_out)``, ``b = Linear(b_in, 2)``; ``op`` is a
    function or a module."""
    return Net(_through, op=op, a=nn.Linear(4, a_out), b=nn.Linear(b_in, 2))


def conv(op: Any, a_out: int = 6, b_in: int = 6) -> Net:
    """``b(op(a(x)))`` with ``a = Conv2d(4, a_out, 1)``, ``b = Conv2d(b_in, 2, 1)``."""
    return Net(_through, op=op, a=nn.Conv2d(4, a_out, 1), b=nn.Conv2d(b_in, 2, 1))


def chain(cols: list[int], size: int = 6) -> tuple[int, list[tuple[str, int, list[int]]]]:
    """The group of a's output units: a's rows and bias, and b's columns ``cols``."""
    return (size, [("a.weight", 0, [0]), ("a.bias", 0, [0]), ("b.weight", 1, cols)])


def groups(a: depgraph.Analysis) -> Groups:
    return [(g.size, [(m.name, m.dim, m.indices([0]).tolist()) for m in g.members]) for g in a.groups]


def reason(a: depgraph.Analysis, name: str, dim: int) -> str | None:
    """Why the parameter axis ``name[dim]`` is pinned (the first pinned atom touching it)."""
    return next((p.reason for p in a.pinned if (name, dim) in p.members), None)


def analyze(model: nn.Module, x: Tensor, oracle: bool = True) -> depgraph.Analysis:
    """Analyze; assert every op had a rule, every node's axes have its shape, and (with
    ``oracle``) every group the shape oracle can verify passes it. ``oracle=False`` is for
    ops with a literal that prune rewrites but the oracle does not (it would report the
    correct group as incomplete)."""
    a = depgraph.analyze(model, (x,))
    assert a.unsupported == []
    assert_axes_match_shapes(a)
    for g in a.groups if oracle else ():
        with contextlib.suppress(Unverifiable):
            check_group(model, (x,), a, g)
    return a




def check(model: nn.Module, x: Tensor, expected: Groups, oracle: bool = True) -> depgraph.Analysis:
    a = analyze(model, x, oracle)
    assert groups(a) == expected
    return a


# -- expand, repeat, tile, repeat_interleave --------------------------------------------------


def test_expand_size_one_axis_makes_copies_that_are_a_group() -> None:
    # (2, 6, 1) -> (2, 6, 3) -> (2, 18) = Product(a, copies): a's unit 0 is b's columns 0..2;
    # copy 0 is b's columns 0, 3, ..., 15 (fewer copies: shrink rewrites expand's literal)
    model = linear(lambda y: y[:, :, None].expand(-1, -1, 3).reshape(2, 18), b_in=18).eval()
    a = check(model, X2, [chain([0, 1, 2]), (3, [("b.weight", 1, list(range(0, 18, 3)))])])
    check_plan(model, (X2,), depgraph.Plan.from_keep(a, {0: [1, 4], 1: [0, 2]}))


@pytest.mark.parametrize("op", [
    lambda y: y.expand(3, 2, -1).sum(0), lambda y: y.expand(3, 2, 6)[0], lambda y: y.expand_as(y),
    lambda y: y.mean(1, keepdim=True).expand_as(y),
], ids=["new-leading-axis", "literal-sizes", "expand_as-self", "expand_as-size-one"])
def test_expand_keeps_axes_of_unchanged_size(op: Callable[[Tensor], Tensor]) -> None:
    check(linear(op), X2, [chain([0])])


def test_broadcast_to_grows_an_axis_of_copies() -> None:
    # the grown axis (5 copies) reaches b's columns; a's axis is summed away, a prunable reduction
    check(linear(lambda y: torch.broadcast_to(y[:, None], (2, 5, -1)).sum(-1), b_in=5), X2,
          [(6, [("a.weight", 0, [0]), ("a.bias", 0, [0])]), (5, [("b.weight", 1, [0])])])


def test_expand_as_ties_the_kept_axes_to_the_other_tensor() -> None:
    m = Net(lambda s, x: s.b(s.a(x).expand_as(s.c(x)[None]).sum(0)),
            a=nn.Linear(4, 6), c=nn.Linear(4, 6), b=nn.Linear(6, 2))
    check(m, X2, [(6, [("a.weight", 0, [0]), ("a.bias", 0, [0]), ("c.weight", 0, [0]),
                       ("c.bias", 0, [0]), ("b.weight", 1, [0])])])


def test_grouped_query_heads_expand_then_reshape() -> None:
    # a: 2 kv heads x 4 dims, each kv head copied 3 times: 24 = Product(kv, 3, hd)
    m = Net(lambda s, x: s.b(torch.cat([s.a(x).view(1, 5, 2, 1, 4).expand(1, 5, 2, 3, 4)
                                        .reshape(1, 5, 24), s.c(x)], -1)),
            a=nn.Linear(8, 8), b=nn.Linear(48, 2), c=nn.Linear(8, 24))
    check(m, torch.randn(1, 5, 8), [
        (2, [("a.weight", 0, [0, 1, 2, 3]), ("a.bias", 0, [0, 1, 2, 3]), ("b.weight", 1, list(range(12)))]),
        (4, [("a.weight", 0, [0, 4]), ("a.bias", 0, [0, 4]), ("b.weight", 1, [0, 4, 8, 12, 16, 20])]),
        (24, [("c.weight", 0, [0]), ("c.bias", 0, [0]), ("b.weight", 1, [24])]),
        (3, [("b.weight", 1, [0, 1, 2, 3, 12, 13, 14, 15])]),  # copy 0 of both kv heads
    ])


@pytest.mark.parametrize("op", [
    lambda y: y.repeat(1, 2), lambda y: torch.tile(y, (2,)), lambda y: y.tile(1, 2),
    lambda y: y.repeat(1, 1, 2)[0],
], ids=["repeat", "torch.tile", "tile", "repeat-new-axis"])
def test_repeat_and_tile_are_row_major_copies(op: Callable[[Tensor], Tensor]) -> None:
    a = check(linear(op, a_out=3), X2, [chain([0, 3], size=3)])
    assert [p.reason for p in a.pinned if p.members == (("b.weight", 1),)] == [REPEATED]


@pytest.mark.parametrize("op", [
    lambda y: y.repeat_interleave(2, dim=1), lambda y: torch.repeat_interleave(y, 2, -1),
    lambda y: y.repeat_interleave(2).view(2, 6),
], ids=["method", "torch-negative-dim", "flattened"])
def test_repeat_interleave_copies_each_unit_in_place(op: Callable[[Tensor], Tensor]) -> None:
    check(linear(op, a_out=3), X2, [chain([0, 1], size=3)])


def test_repeat_interleave_by_a_tensor_pins_that_axis_only() -> None:
    counts = torch.tensor([1, 2])
    check(linear(lambda y: y.repeat_interleave(counts, dim=0, output_size=3)), X2, [chain([0])])
    counts = torch.tensor([1, 2, 1, 1, 1, 1])
    a = check(linear(lambda y: y.repeat_interleave(counts, dim=1, output_size=7), b_in=7), X2, [])
    assert reason(a, "a.weight", 0) == "repeated by counts held in a tensor"


# -- pixel shuffle, channel shuffle ----------------------------------------------------------


@pytest.mark.parametrize("op", [nn.PixelShuffle(2), lambda y: F.pixel_shuffle(y, 2)],
                         ids=["module", "function"])
def test_pixel_shuffle_channel_is_product_of_channel_and_factors(op: Any) -> None:
    # 8 = Product(C=2, ri=2, rj=2): output channel 0 is a's rows 0..3
    a = check(conv(op, a_out=8, b_in=2), X4,
              [(2, [("a.weight", 0, [0, 1, 2, 3]), ("a.bias", 0, [0, 1, 2, 3]), ("b.weight", 1, [0])])])
    assert reason(a, "a.weight", 0) == SHUFFLED


@pytest.mark.parametrize("op", [nn.PixelUnshuffle(2), lambda y: F.pixel_unshuffle(y, 2)],
                         ids=["module", "function"])
def test_pixel_unshuffle_channel_is_product_of_channel_and_factors(op: Any) -> None:
    a = check(conv(op, a_out=2, b_in=8), X4,
              [(2, [("a.weight", 0, [0]), ("a.bias", 0, [0]), ("b.weight", 1, [0, 1, 2, 3])])])
    assert reason(a, "b.weight", 1) == SHUFFLED


SHUFFLE = [
    (2, [("a.weight", 0, [0, 1, 2]), ("a.bias", 0, [0, 1, 2]), ("b.weight", 1, [0, 2, 4])]),
    (3, [("a.weight", 0, [0, 3]), ("a.bias", 0, [0, 3]), ("b.weight", 1, [0, 1])]),
]
"""Channel shuffle of 6 = Product(g=2, c=3) into Product(c, g): whole groups, and the same
channel of every group."""


@pytest.mark.parametrize("op", [
    lambda y: y.view(1, 2, 3, 8, 8).transpose(1, 2).contiguous().view(1, 6, 8, 8),
    lambda y: y.reshape(1, 2, -1, 8, 8).permute(0, 2, 1, 3, 4).flatten(1, 2),
    nn.ChannelShuffle(2),
], ids=["view-transpose-view", "reshape-permute-flatten", "module"])
def test_channel_shuffle_is_prunable(op: Any) -> None:
    # the oracle does not rewrite channel_shuffle's literal group count
    check(conv(op), X4, SHUFFLE, oracle=not isinstance(op, nn.ChannelShuffle))


# -- interpolate, pad, pooling ---------------------------------------------------------------


@pytest.mark.parametrize("op", [
    nn.Upsample(scale_factor=2), nn.UpsamplingBilinear2d(scale_factor=2),
    lambda y: F.interpolate(y, size=(3, 5), mode="bilinear"),
], ids=["Upsample", "UpsamplingBilinear2d", "interpolate"])
def test_resizing_keeps_batch_and_channels(op: Any) -> None:
    check(conv(op), X4, [chain([0])])


def test_resizing_a_feature_axis_pins_it() -> None:
    a = check(linear(lambda y: F.interpolate(y[:, None], size=6)[:, 0]), X2, [])
    assert reason(a, "a.weight", 0) == POOLED


def test_constant_pad_of_the_channel_axis_is_a_concat() -> None:
    # channels 2 -> 1 + 2 + 2 = 5: a's channel 0 is b's column 1
    a = check(conv(lambda y: F.pad(y, (0, 0, 0, 0, 1, 2)), a_out=2, b_in=5), X4, [chain([1], size=2)])
    assert reason(a, "b.weight", 1) == PADDED


def test_negative_pad_crops() -> None:
    # (-1, 2): a's unit 0 is cropped, two zeros are appended; the 5 kept units start b's columns
    a = check(linear(lambda y: F.pad(y, (-1, 2)), b_in=7), X2,
              [(5, [("a.weight", 0, [1]), ("a.bias", 0, [1]), ("b.weight", 1, [0])])])
    assert reason(a, "b.weight", 1) == PADDED


@pytest.mark.parametrize("op", [
    nn.ZeroPad2d(1), nn.ReflectionPad2d(1), nn.ReplicationPad2d((1, 0, 0, 1)), nn.ConstantPad2d(1, 2.0),
], ids=["ZeroPad2d", "ReflectionPad2d", "ReplicationPad2d", "ConstantPad2d"])
def test_spatial_padding_passes_channels_through(op: nn.Module) -> None:
    check(conv(op), X4, [chain([0])])


def test_reflect_pad_of_a_feature_axis_pins_it() -> None:
    a = check(linear(lambda y: F.pad(y[None], (1, 1), mode="reflect")[0], b_in=8), X2, [])
    assert reason(a, "a.weight", 0) == REFLECTED


def test_pad_by_computed_amounts_pins_the_axis() -> None:
    a = check(linear(lambda y: F.pad(y, (0, y.size(1) - 4)), b_in=8), X2, [])
    assert reason(a, "a.weight", 0) == COMPUTED


@pytest.mark.parametrize("op", [
    nn.MaxPool2d(2), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d((2, 3)),
    nn.LPPool2d(2, 2), nn.FractionalMaxPool2d(2, output_size=3),
    lambda y: F.max_pool2d(y, 2, return_indices=True)[0],
    lambda y: F.adaptive_max_pool2d(y, 2, return_indices=True)[1].float(),
    lambda y: F.max_pool3d(y[:, :, None], (1, 2, 2)).squeeze(2),
    lambda y: F.avg_pool1d(y.flatten(2), 4).view(1, 6, 4, 4),
], ids=["MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "LPPool2d",
        "FractionalMaxPool2d", "return_indices", "adaptive-indices", "max_pool3d", "avg_pool1d"])
def test_pooling_keeps_batch_and_channels(op: Any) -> None:
    check(conv(op), X4, [chain([0])])


def test_max_unpool_takes_pooling_indices() -> None:
    def fn(s: Any, x: Tensor) -> Tensor:
        y, i = s.pool(s.a(x))
        return s.b(s.unpool(y, i))

    m = Net(fn, a=nn.Conv2d(4, 6, 1), b=nn.Conv2d(6, 2, 1),
            pool=nn.MaxPool2d(2, return_indices=True), unpool=nn.MaxUnpool2d(2))
    check(m, X4, [chain([0])])


@pytest.mark.parametrize("op", [nn.MaxPool1d(2), nn.AvgPool1d(2), nn.AdaptiveAvgPool1d(3)],
                         ids=["MaxPool1d", "AvgPool1d", "AdaptiveAvgPool1d"])
def test_pooling_an_unbatched_input_keeps_its_channels(op: nn.Module) -> None:
    m = Net(_through, op=op, a=nn.Conv1d(4, 6, 1), b=nn.Conv1d(6, 2, 1))
    check(m, torch.randn(4, 8), [chain([0])])


def test_unbatched_max_pool2d_function() -> None:
    check(conv(lambda y: F.max_pool2d(y, 2)), torch.randn(4, 8, 8), [chain([0])])


def test_pooling_a_feature_axis_pins_it() -> None:
    a = check(linear(lambda y: F.max_pool1d(y[:, None], 2)[:, 0], b_in=3), X2, [])
    assert reason(a, "a.weight", 0) == POOLED


# -- reductions, softmax, sorting ----------------------------------------------------------


@pytest.mark.parametrize("op", [
    lambda y: y[None].sum(0), lambda y: y[None].mean(dim=0), lambda y: y[None, None].sum([0, -3]),
    lambda y: y[None].sum((0,), keepdim=True)[0], lambda y: torch.amax(y[:, None], dim=(0, 1))[None],
    lambda y: y[None].sum(axis=0), lambda y: y.max(0).values[None], lambda y: y.max(dim=0)[0][None],
    lambda y: torch.min(y, 0, True).values, lambda y: y.median(0).values[None],
    lambda y: torch.var(y, dim=0, correction=0, keepdim=True), lambda y: y.var(0, True, True),
    lambda y: y.std(0)[None], lambda y: torch.var_mean(y, 0)[1][None],
    lambda y: y.norm(2, 0)[None], lambda y: torch.norm(y, dim=0, keepdim=True),
    lambda y: torch.linalg.vector_norm(y, 2, 0)[None], lambda y: y.T.kthvalue(1).values[None],
    lambda y: y.T.mode().values[None], lambda y: torch.aminmax(y, dim=0).max[None],
    lambda y: y.logsumexp(0, keepdim=True), lambda y: y.argmax(0, keepdim=True).float(),
    lambda y: y / y.max(), lambda y: y - y.mean(), lambda y: y / y.var(False),
], ids=["sum", "mean-kw", "sum-list-neg", "sum-keepdim", "amax-tuple", "sum-axis", "max.values",
        "max[0]", "min-keepdim", "median", "var-correction", "var-positional", "std",
        "var_mean", "norm-p-dim", "torch.norm", "vector_norm", "kthvalue", "mode", "aminmax",
        "logsumexp", "argmax", "max-all", "mean-all", "var-unbiased-only"])
def test_reductions_over_other_axes_keep_the_group(op: Callable[[Tensor], Tensor]) -> None:
    check(linear(op), X2, [chain([0])])


def test_max_unpacked_into_values_and_indices() -> None:
    def unpack(y: Tensor) -> Tensor:
        values, indices = y[None].max(0)
        return values + indices

    check(linear(unpack), X2, [chain([0])])


@pytest.mark.parametrize("op", [
    lambda y: y.sum(-1, keepdim=True), lambda y: y.mean(1)[:, None], lambda y: y.amax(dim=[1], keepdim=True),
], ids=["sum-keepdim", "mean", "amax-list"])
def test_a_reduced_axis_stays_prunable(op: Callable[[Tensor], Tensor]) -> None:
    # a's units are summed away: removing one removes its contribution; b reads a size-1 axis
    check(linear(op, b_in=1), X2, [(6, [("a.weight", 0, [0]), ("a.bias", 0, [0])])])


@pytest.mark.parametrize("op", [
    lambda y: y.softmax(-1), lambda y: F.softmax(y, dim=1), lambda y: torch.log_softmax(y, 1),
    nn.Softmax(dim=1), nn.LogSoftmax(1), lambda y: y.cumsum(1),
], ids=["method", "F.softmax", "torch.log_softmax", "Softmax", "LogSoftmax", "cumsum"])
def test_softmax_keeps_axes(op: Any) -> None:
    check(linear(op), X2, [chain([0])])


def test_softmax2d_module() -> None:
    check(conv(nn.Softmax2d()), X4, [chain([0])])


def test_sorting_pins_the_sorted_axis() -> None:
    a = check(linear(lambda y: y.sort(dim=1).values), X2, [])
    assert reason(a, "a.weight", 0) == SORTED
    check(linear(lambda y: y.topk(1, dim=0)[0] + torch.argsort(y, 0)), X2, [chain([0])])


# -- factories --------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.rand_like, torch.randn_like,
    lambda y: torch.full_like(y, 2.0), lambda y: torch.randint_like(y, 3),
], ids=["zeros", "ones", "empty", "rand", "randn", "full", "randint"])
def test_like_factories_have_the_input_axes(op: Callable[[Tensor], Tensor]) -> None:
    check(linear(lambda y: y + op(y)), X2, [chain([0])])


@pytest.mark.parametrize("op", [
    lambda y: torch.zeros(2, 6, device=y.device), lambda y: torch.ones(6, device=y.device),
    lambda y: torch.full((1, 6), 2.0, device=y.device), lambda y: torch.empty(6, device=y.device),
    lambda y: torch.randn(2, 6, device=y.device), lambda y: torch.arange(6, device=y.device),
    lambda y: y.new_zeros(2, 6), lambda y: y.new_ones(6), lambda y: y.new_full((6,), 1.0),
    lambda y: y.new_empty(1, 6), lambda y: y.new_tensor([1.0] * 6),
], ids=["zeros", "ones", "full", "empty", "randn", "arange", "new_zeros", "new_ones", "new_full",
        "new_empty", "new_tensor"])
def test_literal_factories_pin_what_they_meet(op: Callable[[Tensor], Tensor]) -> None:
    a = check(linear(lambda y: y + op(y)), X2, [])
    assert reason(a, "a.weight", 0) == LITERAL


# -- reordering -------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [
    lambda y: y.flip(1), lambda y: torch.flip(y, dims=[-1]), torch.fliplr, lambda y: y.roll(1, 1),
    lambda y: torch.roll(y, 2), lambda y: torch.rot90(y, 2, [0, 1]),
], ids=["flip", "torch.flip", "fliplr", "roll", "roll-flat", "rot90"])
def test_reordering_the_feature_axis_pins_it(op: Callable[[Tensor], Tensor]) -> None:
    a = check(linear(op), X2, [])
    assert reason(a, "a.weight", 0) == REORDERED


@pytest.mark.parametrize("op", [
    lambda y: y.flip(0), torch.flipud, lambda y: y.roll(1, 0), lambda y: torch.roll(y, 1, dims=0),
], ids=["flip", "flipud", "roll", "roll-kw"])
def test_reordering_the_batch_axis_keeps_the_group(op: Callable[[Tensor], Tensor]) -> None:
    check(linear(op), X2, [chain([0])])


def test_rot90_of_spatial_axes() -> None:
    check(conv(lambda y: torch.rot90(y, 1, [2, 3])), X4, [chain([0])])


# -- reshapes and copies -----------------------------------------------------------------------


@pytest.mark.parametrize("op", [
    lambda y: y.unflatten(1, (2, 3)).sum(-1), lambda y: torch.unflatten(y, -1, (2, -1)).mean(2),
    nn.Sequential(nn.Unflatten(1, (2, 3)), nn.Flatten()),
], ids=["method", "torch", "module"])
def test_unflatten_is_a_reshape(op: Any) -> None:
    # 6 = Product(2, 3); the 3 are reduced (method, torch) or not (module: b reads all 6)
    expected = [
        (2, [("a.weight", 0, [0, 1, 2]), ("a.bias", 0, [0, 1, 2]), ("b.weight", 1, [0])]),
        (3, [("a.weight", 0, [0, 3]), ("a.bias", 0, [0, 3])]),
    ]
    if isinstance(op, nn.Module):
        expected = [(2, expected[0][1][:2] + [("b.weight", 1, [0, 1, 2])]),
                    (3, expected[1][1] + [("b.weight", 1, [0, 3])])]
    # the oracle does not rewrite unflatten's literal sizes
    check(linear(op, b_in=2 if not isinstance(op, nn.Module) else 6), X2, expected, oracle=False)


def test_copies_keep_axes() -> None:
    check(linear(lambda y: y.clone().contiguous().detach()), X2, [chain([0])])


# -- indexing ---------------------------------------------------------------------------------


def test_getitem_slices_are_concat_parts() -> None:
    # [:, 2:] of 6 = Concat(2, 4); [..., -3:-1] = Concat(3, 2, 1) (the single unit is no group)
    check(linear(lambda y: y[:, 2:], b_in=4), X2,
          [(2, [("a.weight", 0, [0]), ("a.bias", 0, [0])]),
           (4, [("a.weight", 0, [2]), ("a.bias", 0, [2]), ("b.weight", 1, [0])])])
    check(linear(lambda y: y[..., -3:-1], b_in=2), X2,
          [(3, [("a.weight", 0, [0]), ("a.bias", 0, [0])]),
           (2, [("a.weight", 0, [3]), ("a.bias", 0, [3]), ("b.weight", 1, [0])])])


@pytest.mark.parametrize("op", [
    lambda y: y[None, ..., None][0, :, :, 0], lambda y: y[-1][None], lambda y: y[:, :],
    lambda y: y[:, :100], lambda y: y[0:1], lambda y: y[torch.arange(2, device=y.device)],
    lambda y: y[[1, 0, 1]], lambda y: y[..., None][[0, 1], ..., 0],
], ids=["none-ellipsis", "negative-int", "full", "past-the-end", "batch-slice", "tensor-on-batch",
        "list-on-batch", "list-ellipsis"])
def test_getitem_of_other_axes_keeps_the_group(op: Callable[[Tensor], Tensor]) -> None:
    check(linear(op), X2, [chain([0])])


def test_getitem_of_one_feature_pins_it_and_its_copies_are_a_group() -> None:
    a = check(linear(lambda y: y[:, 0, None].expand(2, 6)), X2, [(6, [("b.weight", 1, [0])])])
    assert reason(a, "a.weight", 0) == INT_INDEX


@pytest.mark.parametrize("op, b_in, why", [
    (lambda y: y[:, 1::2], 3, STEPPED),
    (lambda y: y[:, [0, 1]], 2, ADVANCED),
    (lambda y: y[:, y.size(1) // 2 :], 3, COMPUTED),
    (lambda y: y.narrow(1, 0, y.size(1) - 3), 3, COMPUTED),
], ids=["step", "list", "computed-bound", "narrow-computed"])
def test_getitem_that_pins_the_feature_axis(op: Callable[[Tensor], Tensor], b_in: int, why: str) -> None:
    a = check(linear(op, b_in=b_in), X2, [])
    assert reason(a, "a.weight", 0) == why


def test_getitem_advanced_index_placement() -> None:
    # ints select first, so the list's dim of y[0, :, [0, 1]] stays in place: (3, 2, 6)
    m = Net(_through, op=lambda y: y[0, :, [0, 1]], a=nn.Linear(5, 6), b=nn.Linear(6, 2))
    check(m, torch.randn(2, 3, 4, 5), [chain([0])])
    # lists on dims 2 and 4 are not adjacent: their dim goes first, (2, 2, 6, 4)
    m = Net(_through, op=lambda y: y.permute(0, 4, 1, 2, 3)[:, :, [0, 1], :, [0, 1]].transpose(2, 3),
            a=nn.Linear(4, 6), b=nn.Linear(6, 2))
    check(m, torch.randn(2, 3, 4, 5, 4), [chain([0])])


# -- narrow, split, chunk, unbind, stack, cat --------------------------------------------------


@pytest.mark.parametrize("op, b_in, expected", [
    (lambda y: y.narrow(1, 1, 3), 3, [(3, [("a.weight", 0, [1]), ("a.bias", 0, [1]), ("b.weight", 1, [0])]),
                                      (2, [("a.weight", 0, [4]), ("a.bias", 0, [4])])]),
    (lambda y: torch.narrow(y, -1, -2, 2), 2, [(4, [("a.weight", 0, [0]), ("a.bias", 0, [0])]),
                                               (2, [("a.weight", 0, [4]), ("a.bias", 0, [4]),
                                                    ("b.weight", 1, [0])])]),
    (lambda y: y.split([2, 4], dim=1)[1], 4, [(2, [("a.weight", 0, [0]), ("a.bias", 0, [0])]),
                                              (4, [("a.weight", 0, [2]), ("a.bias", 0, [2]),
                                                   ("b.weight", 1, [0])])]),
    (lambda y: torch.split(y, 4, -1)[1], 2, [(4, [("a.weight", 0, [0]), ("a.bias", 0, [0])]),
                                             (2, [("a.weight", 0, [4]), ("a.bias", 0, [4]),
                                                  ("b.weight", 1, [0])])]),
    (lambda y: y.chunk(3, 1)[2], 2, [(2, [("a.weight", 0, [0]), ("a.bias", 0, [0])]),
                                     (2, [("a.weight", 0, [2]), ("a.bias", 0, [2])]),
                                     (2, [("a.weight", 0, [4]), ("a.bias", 0, [4]),
                                          ("b.weight", 1, [0])])]),
    (lambda y: y.tensor_split([1, 4], dim=1)[1], 3, [(3, [("a.weight", 0, [1]), ("a.bias", 0, [1]),
                                                          ("b.weight", 1, [0])]),
                                                     (2, [("a.weight", 0, [4]), ("a.bias", 0, [4])])]),
    (lambda y: y.unbind(0)[0][None], 6, [chain([0])]),
], ids=["narrow", "narrow-negative", "split-list", "split-int", "chunk", "tensor_split", "unbind"])
def test_splits_are_concat_parts(
    op: Callable[[Tensor], Tensor], b_in: int, expected: Groups, request: pytest.FixtureRequest
) -> None:
    # the first part of narrow(1, 1, 3) and of tensor_split at 1 is a single unit: no group.
    # The oracle does not rewrite narrow's literal offsets.
    check(linear(op, b_in=b_in), X2, expected, oracle="narrow" not in request.node.callspec.id)


def test_unbind_of_the_feature_axis_pins_it() -> None:
    a = check(linear(lambda y: y.T.unbind(0)[0][:, None].expand(2, 6)), X2, [(6, [("b.weight", 1, [0])])])
    assert reason(a, "a.weight", 0) == INT_INDEX


def test_stack_shares_axes_and_pins_the_new_one() -> None:
    m = Net(lambda s, x: s.b(torch.stack([s.a(x), s.c(x)], dim=-1).flatten(1)),
            a=nn.Linear(4, 3), c=nn.Linear(4, 3), b=nn.Linear(6, 2))
    check(m, X2, [(3, [("a.weight", 0, [0]), ("a.bias", 0, [0]), ("c.weight", 0, [0]),
                       ("c.bias", 0, [0]), ("b.weight", 1, [0, 1])])])


def test_cat_with_negative_dim() -> None:
    m = Net(lambda s, x: s.b(torch.cat([s.a(x), s.c(x)], dim=-1)),
            a=nn.Linear(4, 3), c=nn.Linear(4, 2), b=nn.Linear(5, 2))
    check(m, X2, [chain([0], 3), (2, [("c.weight", 0, [0]), ("c.bias", 0, [0]), ("b.weight", 1, [3])])])
