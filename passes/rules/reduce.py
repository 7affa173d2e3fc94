"""Pooling, resizing, padding, reductions and softmax.

Pooling and resizing keep the batch and channel axes and pin the new spatial axes.
Reductions drop (or keep as size 1) the axes they reduce; a reduced axis stays
prunable: removing a unit removes its contribution (simulation uses masked
statistics so that the two agree).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from ..dims import ONE
from .context import Axes, Context, arg, broadcast

__all__ = ["RULES"]

RESIZED = "spatial size computed by pooling, resizing or padding"


def spatial(cx: Context, node: fx.Node, keep: int = 2) -> Axes:
    """Keep the leading ``keep`` axes (batch, channels); pin fresh trailing axes.

    An unbatched input (one fewer axis than the op expects) keeps one axis."""
    x = cx.of(node.args[0])
    out = cx.out(node).shape
    spatial_dims = _SPATIAL.get(node.target, len(out) - keep)
    keep = len(out) - spatial_dims
    return (*x[:keep], *cx.fresh(out[keep:], RESIZED))


def reduction(cx: Context, node: fx.Node) -> Axes:
    """sum/mean/amax/...(dim, keepdim): reduced axes vanish or become size 1."""
    x = cx.of(node.args[0])
    dim = arg(node, 1, "dim")
    if cx.is_tensor(dim):  # torch.max(a, b) and friends are elementwise
        return broadcast(cx, node, [node.args[0], dim])
    if dim is None or (not isinstance(dim, (int, list, tuple))):
        return () if not cx.out(node).shape else cx.fresh(cx.out(node).shape, RESIZED)
    dims = {d % len(x) for d in ([dim] if isinstance(dim, int) else dim)}
    keep = arg(node, 2, "keepdim", False)
    out = [ONE if i in dims else e for i, e in enumerate(x) if keep or i not in dims]
    result = tuple(out)
    value = cx.value(node)
    return [result, result] if isinstance(value, tuple) else result


def same(cx: Context, node: fx.Node) -> Axes:
    """softmax, log_softmax, cumsum, normalize...: the output has the input's axes."""
    return cx.of(node.args[0])


_SPATIAL = {
    F.max_pool1d: 1, F.avg_pool1d: 1, F.adaptive_avg_pool1d: 1, F.adaptive_max_pool1d: 1,
    F.max_pool2d: 2, F.avg_pool2d: 2, F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2,
    F.lp_pool2d: 2, F.max_pool3d: 3, F.avg_pool3d: 3, F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool3d: 3, F.lp_pool1d: 1,
}

RULES: dict[object, object] = {fn: spatial for fn in _SPATIAL}
RULES.update({torch.max_pool1d: spatial, torch.max_pool2d: spatial, torch.avg_pool1d: spatial})
for _name in "sum mean amax amin max min var std norm prod logsumexp nansum nanmean all any argmax argmin median".split():
    RULES[_name] = reduction
    if hasattr(torch, _name):
        RULES[getattr(torch, _name)] = reduction
for _fn in (F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax, "softmax",
            "log_softmax", torch.cumsum, "cumsum", F.normalize, F.local_response_norm):
    RULES[_fn] = same
