"""Pooling, resizing, reductions, sorting and softmax.

Pooling and resizing keep the leading axes (batch, channels), pin the axes they pool
or resize (positions along them are mixed) and pin the new spatial axes. Reductions
drop (or keep as size 1) the axes they reduce; a reduced axis stays prunable:
removing a unit removes its contribution (simulation uses masked statistics so that
the two agree). Sorting reorders positions along its axis, which is pinned.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..dims import ONE, Expr
from ..meta import TensorMeta
from .context import Axes, Context, arg, broadcast

__all__ = ["RULES"]

RESIZED = "spatial size computed by pooling or resizing"
POOLED = "pooled or resized along this axis (positions are mixed)"
SORTED = "sorted or selected along this axis (positions are reordered)"
UNKNOWN_DIMS = "a reduction whose reduced axes the rule could not tell"
POSITIONAL = ("reduced by an order statistic or an arg-reduction (median, mode, kthvalue, argmax, indices of max): "
              "its result depends on positions along this axis")
ORDER_STATISTICS = frozenset({"median", "nanmedian", "mode", "kthvalue", "argmax", "argmin", "aminmax"})
"""Reductions whose result (a chosen element, or its position) changes when units are removed
in a way no mask reproduces: the reduced axes are pinned."""


def _first_shape(value: object) -> tuple[int, ...]:
    """Shape of a tensor value, or of the first tensor of a tuple value."""
    first = value[0] if isinstance(value, (tuple, list)) else value
    assert isinstance(first, TensorMeta), f"{value} is not a tensor"
    return first.shape


def _like_value(value: object, axes: tuple[Expr, ...]) -> Axes:
    """``axes`` for a tensor value, one copy per element for a tuple value (values, indices)."""
    return [axes for _ in value] if isinstance(value, (tuple, list)) else axes


def spatial(cx: Context, node: fx.Node) -> Axes:
    """Pooling and resizing: keep the leading axes, pin the pooled axes and the new ones.

    The number of pooled axes comes from the op (2 for ``max_pool2d``), so an unbatched
    input keeps one leading axis; ``return_indices=True`` gives the indices the same axes."""
    x, value = cx.of(node.args[0]), cx.value(node)
    out = _first_shape(value)
    keep = len(out) - _SPATIAL.get(node.target, len(out) - 2)
    cx.pin(x[keep:], POOLED)
    return _like_value(value, (*x[:keep], *cx.fresh(out[keep:], RESIZED)))


def max_unpool(cx: Context, node: fx.Node) -> Axes:
    """max_unpool: as pooling; the indices have the input's axes."""
    x = cx.of(node.args[0])
    keep = len(x) - _SPATIAL[node.target]
    cx.unify_all(x[:keep], cx.of(arg(node, 1, "indices"))[:keep])
    cx.pin(x[keep:], POOLED)
    return (*x[:keep], *cx.fresh(cx.out(node).shape[keep:], RESIZED))


def reduction(cx: Context, node: fx.Node) -> Axes:
    """sum/mean/amax/max/var/norm/...(dim, keepdim): reduced axes vanish or become size 1.

    ``keepdim`` is read from the output's rank; the result is checked against the output's
    shape, and anything that does not match pins the input."""
    source, value = node.args[0], cx.value(node)
    other = arg(node, 1, "other")
    if isinstance(source, fx.Node) and cx.is_tensor(other):  # torch.max(a, b): elementwise
        return broadcast(cx, node, [source, other])
    x, out = cx.of(source), _first_shape(value)
    dims = _reduced(cx, node, len(x))
    keep = len(out) == len(x) and bool(x)
    axes = None if dims is None else tuple(
        ONE if i in dims else e for i, e in enumerate(x) if keep or i not in dims
    )
    if axes is None or tuple(e.size for e in axes) != out:
        cx.pin(x, UNKNOWN_DIMS)
        return cx.pinned_like(value, UNKNOWN_DIMS)
    if _op_name(node) in ORDER_STATISTICS or (_op_name(node) in ("max", "min") and _indices_used(node)):
        assert dims is not None
        cx.pin(tuple(x[d] for d in dims), POSITIONAL)
    return _like_value(value, axes)


def _indices_used(node: fx.Node) -> bool:
    """Whether the indices a max/min over a dim returns (``.indices``, ``[1]``) are read."""
    return any(
        (u.target is operator.getitem and u.args[1] == 1) or (u.target is getattr and u.args[1] == "indices")
        for u in node.users if u.users
    )


def _reduced(cx: Context, node: fx.Node, ndim: int) -> set[int] | None:
    """The axes a reduction reduces: its ``dim`` (or numpy-style ``axis``) argument, every
    axis when it has none, or None when ``dim`` is not ints."""
    position, default = _DIM_ARG.get(_op_name(node), (1, None))
    dim = cx.value(arg(node, position, "dim", node.kwargs.get("axis", default)))
    if isinstance(dim, bool) or dim is None or dim == () or dim == []:  # var(x, True): unbiased
        return set(range(ndim))
    dims = [dim] if isinstance(dim, int) else dim
    if not isinstance(dims, (list, tuple)) or not all(type(d) is int for d in dims):
        return None
    return {d % max(ndim, 1) for d in dims}


def reorder(cx: Context, node: fx.Node) -> Axes:
    """sort/argsort/topk/msort: the sorted axis is pinned (and resized by topk)."""
    x, value = cx.of(node.args[0]), cx.value(node)
    if not x:
        return _like_value(value, ())
    name = _op_name(node)
    d = 0 if name == "msort" else arg(node, 2 if name == "topk" else 1, "dim", -1) % len(x)
    cx.u.pin(x[d], SORTED)
    axes = (*x[:d], cx.new(_first_shape(value)[d], SORTED), *x[d + 1 :])
    return _like_value(value, axes)


def _op_name(node: fx.Node) -> str:
    """The op's name: a method name, or a function's ``__name__`` (without an ATen overload)."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.split(".")[0]


def same(cx: Context, node: fx.Node) -> Axes:
    """softmax, log_softmax, cumsum, normalize...: the output has the input's axes."""
    return cx.of(node.args[0])


_DIM_ARG: dict[str, tuple[int, int | None]] = {
    "norm": (2, None), "linalg_vector_norm": (2, None), "kthvalue": (2, -1), "mode": (1, -1),
}
"""Reductions whose ``dim`` is not positional argument 1, or that reduce the last axis by
default: (position of dim, default dim)."""

_SPATIAL: dict[object, int] = {
    F.max_pool1d: 1, F.avg_pool1d: 1, F.adaptive_avg_pool1d: 1, F.adaptive_max_pool1d: 1,
    F.max_pool2d: 2, F.avg_pool2d: 2, F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2,
    F.max_pool3d: 3, F.avg_pool3d: 3, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool3d: 3,
    F.lp_pool1d: 1, F.lp_pool2d: 2, F.lp_pool3d: 3,
    F.max_pool1d_with_indices: 1, F.max_pool2d_with_indices: 2, F.max_pool3d_with_indices: 3,
    F.adaptive_max_pool1d_with_indices: 1, F.adaptive_max_pool2d_with_indices: 2,
    F.adaptive_max_pool3d_with_indices: 3,
    F.fractional_max_pool2d: 2, F.fractional_max_pool3d: 3,
    F.fractional_max_pool2d_with_indices: 2, F.fractional_max_pool3d_with_indices: 3,
    F.max_unpool1d: 1, F.max_unpool2d: 2, F.max_unpool3d: 3,
    torch.max_pool1d: 1, torch.max_pool2d: 2, torch.max_pool3d: 3,
}
_UNPOOL = (F.max_unpool1d, F.max_unpool2d, F.max_unpool3d)
_RESIZE = (F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear)
_REDUCTIONS = ("sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm", "prod", "logsumexp",
               "nansum", "nanmean", "all", "any", "argmax", "argmin", "median", "nanmedian", "mode",
               "kthvalue", "var_mean", "std_mean", "aminmax", "count_nonzero")
_SAME = (F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax, "softmax",
         "log_softmax", torch.cumsum, "cumsum", F.normalize, F.local_response_norm,
         torch.special.softmax, torch.special.log_softmax, nn.Softmax2d)

RULES: dict[object, object] = {fn: spatial for fn in (*_SPATIAL, *_RESIZE) if fn not in _UNPOOL}
RULES.update({fn: max_unpool for fn in _UNPOOL})
for _name in _REDUCTIONS:
    RULES[_name] = reduction
    if hasattr(torch, _name):
        RULES[getattr(torch, _name)] = reduction
RULES[torch.linalg.vector_norm] = reduction
for _name in ("sort", "argsort", "topk", "msort"):
    RULES[_name] = RULES[getattr(torch, _name)] = reorder
RULES.update({fn: same for fn in _SAME})
