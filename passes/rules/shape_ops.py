"""Ops that move, merge, split or select axes without computing on values.

Reshapes are one rule: the product of all input axes equals the product of all
output axes, and the unifier aligns them (so ``view(b, n, 12, 64)`` refines the
hidden axis into heads and head_dim). Concatenation makes a ``Concat``; split and
chunk refine the input axis into one.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx

from ..dims import ONE, Concat, Expr, Product
from .context import Axes, Context, arg

__all__ = ["RULES"]

INT_INDEX = "selected by an integer index"
STACKED = "axis created by stacking or expanding"
ADVANCED = "indexed by a tensor (advanced indexing)"


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def reshape(cx: Context, node: fx.Node) -> Axes:
    """view/reshape/unflatten and friends: Product(input axes) = Product(output axes)."""
    out = cx.fresh(cx.out(node).shape)
    cx.unify(Product(cx.of(node.args[0])), Product(out))
    return out


def flatten(cx: Context, node: fx.Node) -> Axes:
    """flatten(start, end): the merged axis is the Product of the axes it merges."""
    x = cx.of(node.args[0])
    if not x:
        return (ONE,)
    start = _dim(arg(node, 1, "start_dim", 0), len(x))
    end = _dim(arg(node, 2, "end_dim", -1), len(x))
    return (*x[:start], Product(x[start : end + 1]), *x[end + 1 :])


def permute(cx: Context, node: fx.Node) -> Axes:
    x = cx.of(node.args[0])
    dims = node.args[1:] if not isinstance(arg(node, 1, "dims"), (list, tuple)) else arg(node, 1, "dims")
    return tuple(x[_dim(d, len(x))] for d in dims)


def transpose(cx: Context, node: fx.Node) -> Axes:
    x = list(cx.of(node.args[0]))
    if len(x) < 2:
        return tuple(x)
    a, b = _dim(arg(node, 1, "dim0", 0), len(x)), _dim(arg(node, 2, "dim1", 1), len(x))
    x[a], x[b] = x[b], x[a]
    return tuple(x)


def t(cx: Context, node: fx.Node) -> Axes:
    return tuple(reversed(cx.of(node.args[0])))


def movedim(cx: Context, node: fx.Node) -> Axes:
    x = cx.of(node.args[0])
    src, dst = arg(node, 1, "source"), arg(node, 2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src, dst = [_dim(d, len(x)) for d in src], [_dim(d, len(x)) for d in dst]
    rest = iter(x[i] for i in range(len(x)) if i not in src)
    placed = dict(zip(dst, (x[s] for s in src)))
    return tuple(placed[i] if i in placed else next(rest) for i in range(len(x)))


def unsqueeze(cx: Context, node: fx.Node) -> Axes:
    x = list(cx.of(node.args[0]))
    x.insert(_dim(arg(node, 1, "dim"), len(x) + 1), ONE)
    return tuple(x)


def squeeze(cx: Context, node: fx.Node) -> Axes:
    x, shape = cx.of(node.args[0]), cx.shape(node.args[0])
    dim = arg(node, 1, "dim")
    if dim is None:
        drop = {i for i, n in enumerate(shape) if n == 1}
    else:
        dims = [dim] if isinstance(dim, int) else dim
        drop = {_dim(d, len(x)) for d in dims if shape[_dim(d, len(x))] == 1}
    return tuple(e for i, e in enumerate(x) if i not in drop)


def cat(cx: Context, node: fx.Node) -> Axes:
    """cat: the joined axis is Concat(inputs' axes); every other axis is shared."""
    inputs = [a for a in arg(node, 0, "tensors") if cx.shape(a) != (0,)]
    first = cx.of(inputs[0])
    d = _dim(arg(node, 1, "dim", 0), len(first))
    for other in inputs[1:]:
        axes = cx.of(other)
        cx.unify_all(first[:d] + first[d + 1 :], axes[:d] + axes[d + 1 :])
    return (*first[:d], Concat(tuple(cx.of(a)[d] for a in inputs)), *first[d + 1 :])


def stack(cx: Context, node: fx.Node) -> Axes:
    """stack: inputs share all axes; the new axis is pinned."""
    inputs = arg(node, 0, "tensors")
    first = cx.of(inputs[0])
    for other in inputs[1:]:
        cx.unify_all(first, cx.of(other))
    d = _dim(arg(node, 1, "dim", 0), len(first) + 1)
    return (*first[:d], cx.new(len(inputs), STACKED), *first[d:])


def _split_parts(cx: Context, node: fx.Node, sizes: list[int], d: int) -> Axes:
    x = cx.of(node.args[0])
    parts = tuple(cx.new(n) for n in sizes)
    cx.unify(x[d], Concat(parts) if len(parts) > 1 else parts[0])
    return [(*x[:d], p, *x[d + 1 :]) for p in parts]


def split(cx: Context, node: fx.Node) -> Axes:
    """split/chunk/tensor_split by sizes: the axis is the Concat of the pieces."""
    x = cx.of(node.args[0])
    d = _dim(arg(node, 2, "dim", 0), len(x))
    return _split_parts(cx, node, [p.shape[d] for p in cx.value(node)], d)


def unbind(cx: Context, node: fx.Node) -> Axes:
    """unbind(dim): each output drops the axis, which is pinned (selected by integer)."""
    x = cx.of(node.args[0])
    d = _dim(arg(node, 1, "dim", 0), len(x))
    cx.u.pin(x[d], INT_INDEX)
    return [x[:d] + x[d + 1 :] for _ in cx.value(node)]


def narrow(cx: Context, node: fx.Node) -> Axes:
    """narrow(dim, start, length): the axis is Concat(before, kept, after)."""
    x = cx.of(node.args[0])
    d = _dim(arg(node, 1, "dim"), len(x))
    start, length = arg(node, 2, "start"), arg(node, 3, "length")
    start = _dim(start, x[d].size)
    return (*x[:d], _slice_axis(cx, x[d], start, start + length, 1), *x[d + 1 :])


def _slice_axis(cx: Context, axis: Expr, start: int, stop: int, step: int) -> Expr:
    n = axis.size
    if (start, stop, step) == (0, n, 1):
        return axis
    if step != 1 or stop <= start:
        cx.u.pin(axis, "sliced with a step or to nothing")
        return cx.new(max(0, len(range(start, stop, step))), "sliced with a step or to nothing")
    pieces = [(start, "before"), (stop - start, "kept"), (n - stop, "after")]
    parts = tuple(cx.new(size) for size, _ in pieces if size > 0)
    cx.unify(axis, Concat(parts) if len(parts) > 1 else parts[0])
    return parts[1] if start > 0 else parts[0]


def getitem(cx: Context, node: fx.Node) -> Axes:
    """Indexing a tuple/list output, or a tensor with ints, slices, None and Ellipsis."""
    source, index = node.args
    axes = cx.axes.get(source) if isinstance(source, fx.Node) else None
    if not isinstance(axes, tuple):
        if isinstance(axes, (list, dict)):
            return axes[index]
        return None if not cx.is_tensor(node) else cx.pinned_like(cx.value(node), INT_INDEX)
    return _index_tensor(cx, node, axes, index if isinstance(index, tuple) else (index,))


def _index_tensor(cx: Context, node: fx.Node, x: tuple[Expr, ...], index: tuple[Any, ...]) -> Axes:
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) or i is True or i is False for i in index):
        cx.pin(x, ADVANCED)
        return cx.pinned_like(cx.value(node), ADVANCED)
    used = sum(1 for i in index if i is not None and i is not Ellipsis)
    out: list[Expr] = []
    k = 0
    for i in index:
        if i is Ellipsis:
            out.extend(x[k : k + len(x) - used])
            k += len(x) - used
        elif i is None:
            out.append(ONE)
        elif isinstance(i, int):
            cx.u.pin(x[k], INT_INDEX)
            k += 1
        else:
            start, stop, step = i.indices(x[k].size)
            out.append(_slice_axis(cx, x[k], start, stop, step))
            k += 1
    return (*out, *x[k:])


def no_axes(cx: Context, node: fx.Node) -> Axes:
    """size(), dim(), .shape and similar: no tensor comes out."""
    return None


def getattr_rule(cx: Context, node: fx.Node) -> Axes:
    """``getattr(x, "shape")`` and friends; ``x.T``/``x.mT`` transpose."""
    name = node.args[1]
    if name in ("T", "mT") and cx.is_tensor(node.args[0]):
        x = cx.of(node.args[0])
        return tuple(reversed(x)) if name == "T" else (*x[:-2], x[-1], x[-2])
    if cx.is_tensor(node):
        return cx.of(node.args[0])
    return None


RULES: dict[object, object] = {
    "view": reshape, "reshape": reshape, torch.reshape: reshape, "view_as": reshape,
    "reshape_as": reshape, "unflatten": reshape, torch.unflatten: reshape,
    "flatten": flatten, torch.flatten: flatten,
    "permute": permute, torch.permute: permute,
    "transpose": transpose, torch.transpose: transpose, "swapaxes": transpose,
    torch.swapaxes: transpose, "t": t, torch.t: t,
    "movedim": movedim, torch.movedim: movedim, "moveaxis": movedim, torch.moveaxis: movedim,
    "unsqueeze": unsqueeze, torch.unsqueeze: unsqueeze,
    "squeeze": squeeze, torch.squeeze: squeeze,
    torch.cat: cat, torch.concat: cat, torch.concatenate: cat,
    torch.stack: stack,
    "split": split, torch.split: split, "chunk": split, torch.chunk: split,
    "tensor_split": split, torch.tensor_split: split,
    "unbind": unbind, torch.unbind: unbind,
    "narrow": narrow, torch.narrow: narrow,
    operator.getitem: getitem,
    "size": no_axes, "dim": no_axes, "numel": no_axes, "ndimension": no_axes,
    "nelement": no_axes, "__len__": no_axes, len: no_axes, math.prod: no_axes,
    getattr: getattr_rule,
}
