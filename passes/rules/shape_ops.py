"""Ops that move, merge, split, select, copy or create axes without computing on values.

Reshapes are one rule: the product of all input axes equals the product of all
output axes, and the unifier aligns them (so ``view(b, n, 12, 64)`` refines the
hidden axis into heads and head_dim). Concatenation and padding make a ``Concat``;
split, chunk, narrow and slicing refine the input axis into one. Copies (expand,
repeat, tile, repeat_interleave, pixel shuffle) make a ``Product`` with a pinned
atom counting the copies. Factories with literal sizes make fresh pinned axes.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from ..dims import ONE, Concat, Expr, Product
from .context import Axes, Context, Literal, arg

__all__ = ["RULES"]

INT_INDEX = "selected by an integer index"
STACKED = "axis created by stacking"
REPEATED = "number of copies made by repeat, tile or repeat_interleave"
SHUFFLED = "sub-pixel factor of a pixel shuffle"
ADVANCED = "indexed by a tensor (advanced indexing)"
STEPPED = "sliced with a step"
EMPTY = "sliced to nothing"
COMPUTED = "sliced or padded by amounts computed in the graph (they change when the axis is pruned)"
PADDED = "padding added by F.pad"
REFLECTED = "padded with copies of its own values (reflect, replicate or circular)"
REORDERED = "positions along this axis are reordered (flip, roll, rot90)"
LITERAL = "size given as a literal"
UNCLEAR = "an indexing pattern the rule does not understand"


def _dim(d: Any, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _dim_arg(node: fx.Node, index: int, default: int) -> Any:
    """The ``dim`` argument of ``node`` (or its numpy-style alias ``axis``)."""
    return arg(node, index, "dim", node.kwargs.get("axis", default))


def _dims(d: Any, ndim: int) -> list[int]:
    """An int or a sequence of ints, as non-negative dims."""
    return [_dim(i, ndim) for i in ([d] if isinstance(d, int) else d)]


# -- reshapes and permutations --------------------------------------------------------


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
    src = _dims(arg(node, 1, "source"), len(x))
    dst = _dims(arg(node, 2, "destination"), len(x))
    rest = iter(x[i] for i in range(len(x)) if i not in src)
    placed = dict(zip(dst, (x[s] for s in src), strict=True))
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
        drop = {d for d in _dims(dim, len(x)) if shape[d] == 1}
    return tuple(e for i, e in enumerate(x) if i not in drop)


def channel_shuffle(cx: Context, node: fx.Node) -> Axes:
    """channel_shuffle(x, g): channels Product(g, c) come out as Product(c, g); ``g``
    measures the groups."""
    x = cx.of(node.args[0])
    groups = cx.value(arg(node, 1, "groups"))
    g, per_group = cx.new(groups), cx.new(x[1].size // groups)
    cx.unify(x[1], Product((g, per_group)))
    cx.measure(node, Literal(1, "groups"), g)
    return (x[0], Product((per_group, g)), *x[2:])


# -- joining and splitting ----------------------------------------------------------


def cat(cx: Context, node: fx.Node) -> Axes:
    """cat: the joined axis is Concat(inputs' axes); every other axis is shared."""
    inputs = [a for a in arg(node, 0, "tensors") if cx.shape(a) != (0,)]
    if not inputs:  # only legacy empty (0,) tensors: nothing to relate
        return cx.fresh(cx.out(node).shape, "concatenation of empty tensors")
    first = cx.of(inputs[0])
    d = _dim(_dim_arg(node, 1, 0), len(first))
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
    d = _dim(_dim_arg(node, 1, 0), len(first) + 1)
    return (*first[:d], cx.new(len(inputs), STACKED), *first[d:])


def split(cx: Context, node: fx.Node) -> Axes:
    """split/chunk/tensor_split: the axis is the Concat of the pieces (sizes read from the outputs)."""
    x = cx.of(node.args[0])
    d = _dim(_dim_arg(node, 2, 0), len(x))
    parts = tuple(cx.new(p.shape[d]) for p in cx.value(node))
    cx.unify(x[d], Concat(parts) if len(parts) > 1 else parts[0])
    return [(*x[:d], p, *x[d + 1 :]) for p in parts]


def unbind(cx: Context, node: fx.Node) -> Axes:
    """unbind(dim): each output drops the axis, which is pinned (selected by integer)."""
    x = cx.of(node.args[0])
    d = _dim(_dim_arg(node, 1, 0), len(x))
    cx.u.pin(x[d], INT_INDEX)
    return [x[:d] + x[d + 1 :] for _ in cx.value(node)]


def narrow(cx: Context, node: fx.Node) -> Axes:
    """narrow(dim, start, length): the axis is Concat(before, kept, after)."""
    x = cx.of(node.args[0])
    d = _dim(arg(node, 1, "dim"), len(x))
    start, length = arg(node, 2, "start"), arg(node, 3, "length")
    if isinstance(start, fx.Node) or isinstance(length, fx.Node):
        return (*x[:d], _pinned_slice(cx, x[d], cx.out(node).shape[d], COMPUTED), *x[d + 1 :])
    start = _dim(start, x[d].size)
    return (*x[:d], _slice_axis(cx, x[d], start, start + length, 1), *x[d + 1 :])


def _slice_axis(cx: Context, axis: Expr, start: int, stop: int, step: int) -> Expr:
    """The axis ``axis[start:stop:step]`` (bounds already clamped by ``slice.indices``): the
    middle part of Concat(before, kept, after). Step and empty slices are pinned."""
    n, count = axis.size, len(range(start, stop, step))
    if count == n and step == 1:
        return axis
    if step != 1 or count == 0:
        reason = STEPPED if count else EMPTY
        cx.u.pin(axis, reason)
        return cx.new(count, reason)
    kept = cx.new(count)
    before = (cx.new(start),) if start else ()
    after = (cx.new(n - start - count),) if start + count < n else ()
    cx.unify(axis, Concat((*before, kept, *after)))
    return kept


def _pinned_slice(cx: Context, axis: Expr, count: int, reason: str) -> Expr:
    """A part of ``axis`` whose place the rules cannot follow: both are pinned."""
    cx.u.pin(axis, reason)
    return cx.new(count, reason)


# -- indexing ------------------------------------------------------------------------


def getitem(cx: Context, node: fx.Node) -> Axes:
    """Indexing a tuple/list output, or a tensor with ints, slices, None, Ellipsis and tensors."""
    source, index = node.args
    axes = cx.axes.get(source) if isinstance(source, fx.Node) else None
    if not isinstance(axes, tuple):
        if isinstance(axes, (list, dict)):
            return axes[index]  # type: ignore[index]
        return None if not cx.is_tensor(node) else cx.pinned_like(cx.value(node), INT_INDEX)
    items = tuple(_index_item(cx, i) for i in (index if isinstance(index, tuple) else (index,)))
    result = _index_tensor(cx, node, axes, items)
    if result is None or tuple(e.size for e in result) != cx.out(node).shape:
        cx.pin(axes, UNCLEAR)
        return cx.pinned_like(cx.value(node), UNCLEAR)
    return result


def _index_item(cx: Context, item: Any) -> Any:
    """An index item with a graph-computed int (``x[:, n]``) replaced by its value."""
    if isinstance(item, fx.Node) and not cx.is_tensor(item):
        return cx.value(item)
    return item


def _consumed(cx: Context, item: Any) -> int:
    """How many axes of the indexed tensor an index item consumes."""
    if item is None or item is Ellipsis:
        return 0
    if isinstance(item, fx.Node):
        meta = cx.value(item)
        return meta.ndim if meta.dtype in (torch.bool, torch.uint8) else 1
    return 1


def _index_tensor(
    cx: Context, node: fx.Node, x: tuple[Expr, ...], items: tuple[Any, ...]
) -> tuple[Expr, ...] | None:
    """Axes of ``x[items]`` following torch's order: ints select first, slices and None
    are basic, and the dims of tensor (advanced) indices replace their run of places if
    the run is contiguous, else go first. Returns None for items it does not handle."""
    if any(isinstance(i, bool) or not _is_index(cx, i) for i in items):
        return None
    explicit = sum(_consumed(cx, i) for i in items)
    frame: list[Expr | None] = []  # None marks a place taken by an advanced index
    k = 0
    for i in items:
        if i is Ellipsis:
            frame.extend(x[k : k + len(x) - explicit])
            k += len(x) - explicit
        elif i is None:
            frame.append(ONE)
        elif isinstance(i, int):
            cx.u.pin(x[k], INT_INDEX)
            k += 1
        elif isinstance(i, slice):
            frame.append(_slice(cx, x[k], i))
            k += 1
        else:
            n = _consumed(cx, i)
            cx.pin(x[k : k + n], ADVANCED)
            if isinstance(i, fx.Node):
                cx.pin(cx.of(i), ADVANCED)
            frame.extend([None] * n)
            k += n
    frame.extend(x[k:])
    return _place_advanced(cx, node, frame)


def _slice(cx: Context, axis: Expr, item: slice) -> Expr:
    """``axis[item]``; bounds computed in the graph (``x[:, : n // 2]``) pin the axis, as
    they change when the axis is pruned."""
    bounds = (item.start, item.stop, item.step)
    indices = slice(*(cx.value(b) for b in bounds)).indices(axis.size)
    if any(isinstance(b, fx.Node) for b in bounds):
        return _pinned_slice(cx, axis, len(range(*indices)), COMPUTED)
    return _slice_axis(cx, axis, *indices)


def _is_index(cx: Context, item: Any) -> bool:
    if isinstance(item, fx.Node):
        return cx.is_tensor(item)
    if isinstance(item, list):
        return all(isinstance(v, int) for v in item)
    if isinstance(item, slice):
        bounds = (cx.value(b) for b in (item.start, item.stop, item.step))
        return all(b is None or isinstance(b, int) for b in bounds)
    return item is None or item is Ellipsis or isinstance(item, int)


def _place_advanced(cx: Context, node: fx.Node, frame: list[Expr | None]) -> tuple[Expr, ...]:
    marks = [j for j, e in enumerate(frame) if e is None]
    basic = [e for e in frame if e is not None]
    if not marks:
        return tuple(basic)
    shape = cx.out(node).shape
    at = marks[0] if marks[-1] - marks[0] == len(marks) - 1 else 0
    made = cx.fresh(shape[at : at + len(shape) - len(basic)], ADVANCED)
    return (*basic[:at], *made, *basic[at:])


# -- copies: expand, repeat, tile, repeat_interleave, pixel shuffle -----------------------


def expand(cx: Context, node: fx.Node) -> Axes:
    """expand/broadcast_to: an axis kept at its size stays; an axis grown from size 1 and
    a new leading axis get fresh atoms, their units identical copies. Unpinned: where
    they meet a parameter (the query heads that share a key/value head in grouped-query
    attention, ``k[:, :, None].expand(b, kv, rep, n, d)``), fewer copies is a prune, and
    shrink rewrites the literal size."""
    x, shape, out = cx.of(node.args[0]), cx.shape(node.args[0]), cx.out(node).shape
    lead = len(out) - len(shape)
    axes = list(cx.fresh(out[:lead]))
    for e, n, m in zip(x, shape, out[lead:], strict=True):
        axes.append(e if n == m else cx.new(m))
    return tuple(axes)


def expand_as(cx: Context, node: fx.Node) -> Axes:
    """x.expand_as(other): broadcasting x to other's axes; aligned axes of equal size are equal."""
    x, shape = cx.of(node.args[0]), cx.shape(node.args[0])
    other = cx.of(arg(node, 1, "other"))
    lead = len(other) - len(x)
    for e, n, o in zip(x, shape, other[lead:], strict=True):
        if n != 1:
            cx.unify(e, o)
    return other


def repeat(cx: Context, node: fx.Node) -> Axes:
    """repeat/tile: a repeated axis is Product(copies, axis) (row-major tiling), the copies
    pinned; new leading axes are pinned."""
    x, shape, out = cx.of(node.args[0]), cx.shape(node.args[0]), cx.out(node).shape
    lead = len(out) - len(shape)
    axes = list(cx.fresh(out[:lead], REPEATED))
    for e, n, m in zip(x, shape, out[lead:], strict=True):
        if n == m:
            axes.append(e)
        else:
            copies = cx.new(m // n, REPEATED)
            axes.append(copies if n == 1 else Product((copies, e)))
    return tuple(axes)


def repeat_interleave(cx: Context, node: fx.Node) -> Axes:
    """repeat_interleave(r, dim): the axis is Product(axis, r), r pinned (the flattened
    input when dim is None). Repeats given as a tensor pin the axis."""
    source, repeats, dim = node.args[0], cx.value(arg(node, 1, "repeats")), arg(node, 2, "dim")
    if repeats is None:  # torch.repeat_interleave(counts): indices, not values
        return cx.pinned_like(cx.value(node), REPEATED)
    x = cx.of(source)
    if isinstance(repeats, int):
        copies = cx.new(repeats, REPEATED)
        if dim is None:
            return (Product((*x, copies)),)
        d = _dim(dim, len(x))
        return (*x[:d], Product((x[d], copies)), *x[d + 1 :])
    how = "repeated by counts held in a tensor"
    cx.pin(cx.of(arg(node, 1, "repeats")), how)
    if dim is None:
        cx.pin(x, how)
        return cx.pinned_like(cx.value(node), how)
    d = _dim(dim, len(x))
    cx.u.pin(x[d], how)
    return (*x[:d], cx.new(cx.out(node).shape[d], how), *x[d + 1 :])


def pixel_shuffle(cx: Context, node: fx.Node) -> Axes:
    """pixel_shuffle(x, r): channels Product(C, ri, rj) -> C; H -> Product(H, ri), W -> Product(W, rj)."""
    x, out = cx.of(node.args[0]), cx.out(node).shape
    r = out[-1] // x[-1].size
    ri, rj, channels = cx.new(r, SHUFFLED), cx.new(r, SHUFFLED), cx.new(out[-3])
    cx.unify(x[-3], Product((channels, ri, rj)))
    return (*x[:-3], channels, Product((x[-2], ri)), Product((x[-1], rj)))


def pixel_unshuffle(cx: Context, node: fx.Node) -> Axes:
    """pixel_unshuffle(x, r): H = Product(h, ri), W = Product(w, rj); channels -> Product(C, ri, rj)."""
    x, out = cx.of(node.args[0]), cx.out(node).shape
    r = x[-1].size // out[-1]
    ri, rj, h, w = cx.new(r, SHUFFLED), cx.new(r, SHUFFLED), cx.new(out[-2]), cx.new(out[-1])
    cx.unify(x[-2], Product((h, ri)))
    cx.unify(x[-1], Product((w, rj)))
    return (*x[:-3], Product((x[-3], ri, rj)), h, w)


# -- padding and reordering -----------------------------------------------------------------


def pad(cx: Context, node: fx.Node) -> Axes:
    """F.pad: in constant mode a padded axis is Concat(pinned before, axis, pinned after)
    (negative padding crops); other modes pin the padded axes. Unpadded axes pass through."""
    x, out = list(cx.of(node.args[0])), cx.out(node).shape
    pads = arg(node, 1, "pad")
    amounts = [cx.value(p) for p in pads]
    mode = arg(node, 2, "mode", "constant")
    constant = mode == "constant" or not isinstance(mode, str)  # ATen constant_pad_nd: a value
    for k in range(len(amounts) // 2):
        d = len(x) - 1 - k
        before, after = amounts[2 * k], amounts[2 * k + 1]
        if before == after == 0:
            continue
        if any(isinstance(p, fx.Node) for p in pads[2 * k : 2 * k + 2]):
            x[d] = _pinned_slice(cx, x[d], out[d], COMPUTED)
            continue
        if not constant:
            cx.u.pin(x[d], REFLECTED)
            x[d] = cx.new(out[d], REFLECTED)
            continue
        kept = _slice_axis(cx, x[d], max(0, -before), x[d].size - max(0, -after), 1)
        parts = [cx.new(before, PADDED)] if before > 0 else []
        parts += [kept, cx.new(after, PADDED)] if after > 0 else [kept]
        x[d] = Concat(tuple(parts)) if len(parts) > 1 else kept
    return tuple(x)


def flip(cx: Context, node: fx.Node) -> Axes:
    """flip(dims): flipped axes are pinned (unit i lands at n-1-i); the others pass through."""
    x = cx.of(node.args[0])
    dims = arg(node, 1, "dims")
    dims = (node.args[1:] or (dims,)) if isinstance(dims, int) else dims
    return _reordered(cx, x, _dims(dims, len(x)))


def fliplr(cx: Context, node: fx.Node) -> Axes:
    return _reordered(cx, cx.of(node.args[0]), [1])


def flipud(cx: Context, node: fx.Node) -> Axes:
    return _reordered(cx, cx.of(node.args[0]), [0])


def roll(cx: Context, node: fx.Node) -> Axes:
    """roll(shifts, dims): rolled axes are pinned; with no dims (the flattened tensor is
    rolled) every axis is."""
    x = cx.of(node.args[0])
    dims = arg(node, 2, "dims")
    return _reordered(cx, x, range(len(x)) if dims is None or dims == [] else _dims(dims, len(x)))


def rot90(cx: Context, node: fx.Node) -> Axes:
    """rot90(k, dims): both axes are pinned, and swapped when k is odd."""
    x = list(cx.of(node.args[0]))
    a, b = _dims(arg(node, 2, "dims", (0, 1)), len(x))
    x = list(_reordered(cx, tuple(x), [a, b]))
    if arg(node, 1, "k", 1) % 2:
        x[a], x[b] = x[b], x[a]
    return tuple(x)


def _reordered(cx: Context, x: tuple[Expr, ...], dims: Any) -> tuple[Expr, ...]:
    for d in dims:
        cx.u.pin(x[d], REORDERED)
    return x


# -- factories ------------------------------------------------------------------------------


def like(cx: Context, node: fx.Node) -> Axes:
    """zeros_like/ones_like/full_like/rand_like/...: the output has the input's axes."""
    return cx.of(node.args[0])


def literal(cx: Context, node: fx.Node) -> Axes:
    """torch.zeros/ones/full/arange/..., Tensor.new_zeros/...: fresh pinned axes."""
    return cx.pinned_like(cx.value(node), LITERAL)


# -- non-tensor results ---------------------------------------------------------------------


def no_axes(cx: Context, node: fx.Node) -> Axes:
    """size(), dim(), .shape and similar: no tensor comes out."""
    return None


def getattr_rule(cx: Context, node: fx.Node) -> Axes:
    """``getattr(x, "shape")`` and friends; ``x.T``/``x.mT`` transpose; ``.values`` and
    ``.indices`` of a named tuple (``x.max(1).values``)."""
    source, name = node.args
    axes = cx.axes.get(source) if isinstance(source, fx.Node) else None
    if isinstance(axes, list):
        fields = getattr(getattr(torch.return_types, _op_base_name(source), None), "__match_args__", ())
        if name in fields:
            return axes[fields.index(name)]
        return cx.pinned_like(cx.value(node), f"field {name!r} of a result the rules do not know")
    if name in ("T", "mT") and cx.is_tensor(source):
        x = cx.of(source)
        return tuple(reversed(x)) if name == "T" else (*x[:-2], x[-1], x[-2])
    if cx.is_tensor(node):
        return cx.of(source)
    return None


def _op_base_name(node: Any) -> str:
    target = getattr(node, "target", None)
    return target if isinstance(target, str) else getattr(target, "__name__", "")


_LIKE = ("zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
         "randint_like")
_LITERAL = ("zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange", "linspace",
            "logspace", "eye", "tensor")
_NEW = ("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor")

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
    torch.channel_shuffle: channel_shuffle, torch.native_channel_shuffle: channel_shuffle,
    torch.cat: cat, torch.concat: cat, torch.concatenate: cat,
    torch.stack: stack,
    "split": split, torch.split: split, "chunk": split, torch.chunk: split,
    "tensor_split": split, torch.tensor_split: split,
    "unbind": unbind, torch.unbind: unbind,
    "narrow": narrow, torch.narrow: narrow,
    operator.getitem: getitem,
    "expand": expand, torch.broadcast_to: expand, "broadcast_to": expand, "expand_as": expand_as,
    "repeat": repeat, "tile": repeat, torch.tile: repeat,
    "repeat_interleave": repeat_interleave, torch.repeat_interleave: repeat_interleave,
    F.pixel_shuffle: pixel_shuffle, F.pixel_unshuffle: pixel_unshuffle,
    F.pad: pad,
    "flip": flip, torch.flip: flip, "fliplr": fliplr, torch.fliplr: fliplr, "flipud": flipud,
    torch.flipud: flipud, "roll": roll, torch.roll: roll, "rot90": rot90, torch.rot90: rot90,
    "size": no_axes, "dim": no_axes, "numel": no_axes, "ndimension": no_axes,
    "nelement": no_axes, "__len__": no_axes, len: no_axes, math.prod: no_axes,
    getattr: getattr_rule,
}
RULES.update({getattr(torch, name): like for name in _LIKE})
RULES.update({getattr(torch, name): literal for name in _LITERAL})
RULES.update({name: literal for name in _NEW})
