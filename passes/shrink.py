"""Shrink: make a model physically smaller along pruned axes.

Needs: a GraphModule whose ``node.meta[VALUE]`` is set, the resolved axes of every
parameter (by canonical name) and node (by name), and the removed units per atom.
Does, in place on the GraphModule and the modules it holds: slices every parameter
and buffer along its pruned axes; updates the attributes that module forwards read
(``in_channels``, ``groups``, ``num_features``, ``normalized_shape``, ...); rewrites
shape literals in the graph (``view(b, n, 12, 64)`` -> ``view(b, n, 8, 64)``, split
sizes, slice bounds). Returns whether the graph itself had to change, in which case
the caller must run the GraphModule rather than the original class.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from .dims import Atom, Concat, Expr, Product, Sizes, atoms_of
from .errors import PlanError
from .meta import VALUE, TensorMeta
from .mha import PrunedMultiheadAttention
from .rules.context import Literal, Measured
from .scalars import UNKNOWN, pruned_value, reads_pruned_size

__all__ = ["replace_module", "shrink", "Sizes"]


def shrink(
    gm: fx.GraphModule,
    params: dict[str, tuple[Expr, ...]],
    nodes: dict[str, Any],
    removed: dict[Atom, torch.Tensor],
    root: nn.Module | None = None,
    literals: dict[str, list[tuple[Literal, Measured]]] | None = None,
    others: Sequence[Any] = (),
) -> bool:
    """Shrink ``gm`` in place; return True if graph literals were rewritten.

    ``root`` is the module ``gm`` was traced from: sliced tensors are set there too
    (fx copies attributes reached by ``get_attr`` onto the GraphModule itself).
    ``literals`` (by node name) are the sizes the rules said measure axes
    (:meth:`passes.rules.Context.measure`): each becomes the kept count. ``others`` are
    graphs of the same model in the other train/eval mode (with ``graph``, ``nodes`` and
    ``literals``): their modules' attributes are updated too."""
    sizes = Sizes(removed)
    _slice_state([gm, *(o.graph for o in others)], params, sizes, root)
    for other in others:
        _rewrite_graph(other.graph, other.nodes, other.literals, sizes, root)
    return _rewrite_graph(gm, nodes, literals or {}, sizes, root)


def _rewrite_graph(
    gm: fx.GraphModule, nodes: dict[str, Any], literals: dict[str, list[tuple[Literal, Measured]]], sizes: Sizes,
    root: nn.Module | None,
) -> bool:
    """Module attributes, literals and shape arguments of one graph; whether the graph changed."""
    changed = False
    for node in gm.graph.nodes:
        for where, measured in literals.get(node.name, ()):
            changed |= _rewrite_literal(gm, node, where, measured, nodes, sizes)
        if node.op == "call_module":
            updater = MODULE_UPDATES.get(type(gm.get_submodule(str(node.target))))
            replacement = updater(gm.get_submodule(str(node.target)), node, nodes, sizes) if updater else None
            if replacement is not None:
                for module in (gm, root) if root is not None else (gm,):
                    replace_module(module, str(node.target), replacement)
        elif node.op in ("call_function", "call_method"):
            packet = getattr(node.target, "overloadpacket", None)
            rewrite = GRAPH_REWRITES.get(node.target) or GRAPH_REWRITES.get(packet)
            if rewrite is not None:
                changed |= bool(rewrite(node, nodes, sizes))
    if changed:
        gm.recompile()
    return changed


def _slice_state(
    graphs: list[fx.GraphModule], params: dict[str, tuple[Expr, ...]], sizes: Sizes, root: nn.Module | None
) -> None:
    """Slice every pruned parameter and buffer, and set the sliced tensor wherever it is held:
    the graphs (fx copies what ``get_attr`` reads onto them) and ``root``."""
    holders = [*graphs, root] if root is not None else graphs
    aliases: dict[int, list[str]] = {}
    for holder in holders:
        state = (*holder.named_parameters(remove_duplicate=False), *holder.named_buffers(remove_duplicate=False))
        for name, t in state:
            names = aliases.setdefault(id(t), [])
            if name not in names:
                names.append(name)
    by_name = {name: names for names in aliases.values() for name in names}
    for name, axes in params.items():
        if not any(sizes.touches(e) for e in axes):
            continue
        names = by_name.get(name, [name])
        old = next(t for t in (_find(h, name) for h in holders) if t is not None)
        new = old.detach()
        for dim, expr in enumerate(axes):
            if sizes.touches(expr):
                new = new.index_select(dim, sizes.mask(expr).nonzero().flatten().to(new.device))
        value = new.clone()
        if isinstance(old, nn.Parameter):
            value = nn.Parameter(value, requires_grad=old.requires_grad)
        for holder in holders:
            for alias in names:
                _set(holder, alias, value)


def _find(module: nn.Module, name: str) -> torch.Tensor | None:
    owner, _, attr = name.rpartition(".")
    try:
        return getattr(module.get_submodule(owner), attr, None)
    except AttributeError:
        return None


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    try:
        holder = module.get_submodule(owner)
    except AttributeError:
        return  # fx dropped a module the graph does not use
    if hasattr(holder, attr):
        setattr(holder, attr, value)


def replace_module(module: nn.Module, name: str, replacement: nn.Module) -> None:
    """Put ``replacement`` at ``name`` in ``module`` (nothing when the owner is gone)."""
    owner, _, attr = name.rpartition(".")
    try:
        setattr(module.get_submodule(owner), attr, replacement)
    except AttributeError:
        return  # fx dropped a module the graph does not call


def _rewrite_literal(
    gm: fx.GraphModule, node: fx.Node, where: Literal, measured: Measured, nodes: dict[str, Any], sizes: Sizes
) -> bool:
    """Give the size at ``where`` in ``node``'s call the kept count of what it measures;
    whether the graph changed (a module attribute set is not a change of the graph). A size
    computed in the graph is left alone when the pruned model computes the kept count."""
    many = isinstance(measured, tuple)
    exprs = measured if isinstance(measured, tuple) else (measured,)
    if not any(sizes.touches(e) for e in exprs):
        return False
    kept = [sizes.size(e) for e in exprs]
    want: Any = tuple(kept) if many else kept[0]
    if where.attr:
        module = gm.get_submodule(str(node.target))
        setattr(module, where.name, type(getattr(module, where.name))(want) if many else want)
        return False
    present = where.index is not None and where.index < len(node.args)
    current = node.args[where.index] if present else node.kwargs.get(where.name)  # type: ignore[index]
    if current is None or _same(pruned_value(current, nodes, sizes), want):
        return False
    if present:
        node.args = (*node.args[: where.index], want, *node.args[where.index + 1 :])  # type: ignore[misc]
    else:
        node.kwargs = {**node.kwargs, where.name: want}
    return True


def _same(value: Any, want: Any) -> bool:
    """Whether a (pruned) argument value equals the wanted size or sizes."""
    if value is UNKNOWN:
        return False
    if isinstance(want, tuple):
        return isinstance(value, (tuple, list)) and tuple(value) == want
    if isinstance(value, (tuple, list)) and len(value) == 1:
        return value[0] == want
    return value == want


# -- module attributes ---------------------------------------------------------------


def _in_axes(node: fx.Node, nodes: dict[str, Any]) -> tuple[Expr, ...]:
    return nodes[node.args[0].name]


def _from_op(m: nn.Module, node: fx.Node, attr: str, argument: str) -> None:
    """Set ``m.attr`` from the op ``node`` of an ATen graph that reads ``m``'s parameters
    (its argument ``argument``, rewritten by shrink). In an fx graph ``node`` calls ``m``,
    whose attribute shrink already set."""
    if node.op == "call_function" and hasattr(node.target, "_schema"):
        value = _schema_arg(node, argument, getattr(m, attr))[1]
        if isinstance(value, int):
            setattr(m, attr, value)


def _conv(m: nn.Module, node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> None:
    x = _in_axes(node, nodes)
    ch = 1 if len(x) == m.weight.ndim else 0
    m.in_channels = sizes.size(x[ch])
    _from_op(m, node, "groups", "groups")
    if isinstance(m, nn.modules.conv._ConvTransposeNd):  # weight: (in, out/groups, k...)
        m.out_channels = m.weight.shape[1] * m.groups
    else:
        m.out_channels = m.weight.shape[0]


def _linear(m: nn.Module, node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> None:
    m.out_features, m.in_features = m.weight.shape


def _batch_norm(m: nn.Module, node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> None:
    x = _in_axes(node, nodes)
    m.num_features = sizes.size(x[1 if len(x) > 1 else 0])


def _instance_norm(m: nn.Module, node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> None:
    x = _in_axes(node, nodes)
    spatial = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}[type(m)]
    m.num_features = sizes.size(x[len(x) - spatial - 1])


def _layer_norm(m: nn.Module, node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> None:
    x = _in_axes(node, nodes)
    k = len(m.normalized_shape)
    m.normalized_shape = tuple(sizes.size(e) for e in x[len(x) - k :])


def _group_norm(m: nn.Module, node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> None:
    x = _in_axes(node, nodes)
    _from_op(m, node, "num_groups", "group" if "native" in str(node.target) else "num_groups")
    m.num_channels = sizes.size(x[1])


def _embedding(m: nn.Module, node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


def _prelu(m: nn.Module, node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> None:
    m.num_parameters = m.weight.numel()


def _recurrent(m: nn.Module, node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> None:
    """nn.LSTM/GRU/RNN: sizes from layer 0's weights, then refresh ``_flat_weights`` (the
    tensors forward hands to the kernel) and, on cuDNN, their flat buffer."""
    m.input_size = m.weight_ih_l0.shape[1]
    m.hidden_size = (m.weight_hr_l0 if m.proj_size else m.weight_hh_l0).shape[1]
    m.proj_size = m.weight_hr_l0.shape[0] if m.proj_size else 0
    if m.proj_size == m.hidden_size:
        raise PlanError(
            f"cannot prune LSTM '{node.target}' to {m.hidden_size} hidden and {m.proj_size} projection units: "
            "its kernel reads proj_size == hidden_size as no projection. Keep a different number of units "
            "in one of the two groups"
        )
    m._init_flat_weights()


def _multihead_attention(m: nn.Module, node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> nn.Module | None:
    """nn.MultiheadAttention whose heads or widths shrank: a PrunedMultiheadAttention with
    the same (sliced) parameters; a PrunedMultiheadAttention is rebuilt the same way."""
    m.out_proj.out_features, m.out_proj.in_features = m.out_proj.weight.shape
    replacement = PrunedMultiheadAttention(m)
    before = (m.embed_dim, m.kdim, m.vdim, m.num_heads)
    after = (replacement.embed_dim, replacement.kdim, replacement.vdim, replacement.num_heads)
    return replacement if after != before or isinstance(m, PrunedMultiheadAttention) else None


MODULE_UPDATES: dict[type, Callable[..., nn.Module | None]] = {
    **dict.fromkeys(
        (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), _conv
    ),
    nn.Linear: _linear,
    **dict.fromkeys((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm), _batch_norm),
    **dict.fromkeys((nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), _instance_norm),
    **dict.fromkeys((nn.LayerNorm, nn.RMSNorm), _layer_norm),
    nn.GroupNorm: _group_norm,
    nn.Embedding: _embedding,
    nn.PReLU: _prelu,
    **dict.fromkeys((nn.LSTM, nn.GRU, nn.RNN), _recurrent),
    **dict.fromkeys((nn.MultiheadAttention, PrunedMultiheadAttention), _multihead_attention),
}
"""Attribute updates per module class; add an entry when a module rule is added. An update
that returns a module has it replace the pruned one (in the graph module and the model)."""


# -- graph literals -------------------------------------------------------------------


def _out_axes(node: fx.Node, nodes: dict[str, Any]) -> Any:
    return nodes[node.name]


def _shape_args(node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> bool:
    """view/reshape/expand: each size becomes the kept size of the output axis it shapes.

    A size computed in the graph (``b, n, d = x.shape`` then ``reshape(b * h, n, d)``) is
    left alone when the pruned model computes the kept size, and otherwise rescaled in the
    graph (:func:`_kept_size`), so that a batch size read at run time stays so."""
    if "shape" in node.kwargs or "size" in node.kwargs:
        return False
    out = _out_axes(node, nodes)
    last = node.args[-1] if len(node.args) == 2 else None
    whole = isinstance(last, fx.Node) and isinstance(last.meta.get(VALUE), tuple)
    packed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    if whole:  # view(other.shape): one value for the whole shape
        want = tuple(sizes.size(e) for e in out)
        if _same(pruned_value(node.args[1], nodes, sizes), want):
            return False
        node.args = (node.args[0], want)
        return True
    shape = list(node.args[1] if packed else node.args[1:])
    wrong = [i for i, (s, e) in enumerate(zip(shape, out)) if s != -1 and not _same(pruned_value(s, nodes, sizes),
                                                                                      sizes.size(e))]
    if not wrong:
        return False
    new = list(shape)
    for i in wrong:
        new[i] = _kept_size(node, shape[i], out[i], nodes, sizes)
    node.args = (node.args[0], tuple(new)) if packed else (node.args[0], *new)
    return True


def _kept_size(node: fx.Node, old: Any, expr: Expr, nodes: dict[str, Any], sizes: Sizes) -> Any:
    """The size argument, standing before ``node``, for the kept part of axis ``expr``, whose
    argument was ``old``: the kept count when ``old`` is a literal or the axis holds pruned
    atoms only; for a size computed in the graph over an axis that also holds parts that
    lose nothing (a batch, read at run time), the same computation rescaled: divided by the
    pruned factors' sizes and multiplied by their kept counts (a product), or less the
    removed count (a concatenation). A computed size that reads a pruned size itself (``c //
    g``) counts channels: the kept count, as a literal."""
    kept = sizes.size(expr)
    if not isinstance(old, fx.Node) or all(a in sizes.removed for a in atoms_of(expr)):
        return kept
    if reads_pruned_size(old, nodes, sizes):  # ``c // g`` of a pruned c: a count of channels, static
        return kept
    graph = node.graph
    with graph.inserting_before(node):
        if isinstance(expr, Product):
            touched = [f for f in expr.factors if sizes.touches(f)]
            return _rescaled(graph, old, math.prod(f.size for f in touched), math.prod(sizes.size(f) for f in touched))
        if isinstance(expr, Concat):
            common = _common_size(expr, sizes)
            if common > 1:  # [a*b | c*b], b read at run time (a batch): b * (kept a + kept c)
                return _rescaled(graph, old, expr.size // common, kept // common)
            return graph.call_function(operator.sub, (old, expr.size - kept))
    return kept


def _rescaled(graph: fx.Graph, old: fx.Node, whole: int, kept: int) -> fx.Node:
    """``old // whole * kept``: a run-time size whose static part ``whole`` keeps ``kept``."""
    return graph.call_function(operator.mul, (graph.call_function(operator.floordiv, (old, whole)), kept))


def _common_size(expr: Concat, sizes: Sizes) -> int:
    """The size of the factors every part of ``expr`` has that pruning leaves whole: a size
    computed at run time over such an axis (``batch * (tokens + patches)``) scales with them,
    so the removed count is not a constant to subtract."""
    def factors(e: Expr) -> list[Expr]:
        return [f for sub in e.factors for f in factors(sub)] if isinstance(e, Product) else [e]

    shared = set.intersection(*(set(factors(p)) for p in expr.parts))
    return math.prod(f.size for f in shared if not sizes.touches(f))


def _unflatten(node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> bool:
    x, out = nodes[node.args[0].name], _out_axes(node, nodes)
    dim = node.args[1] % len(x)
    sizes_arg = list(node.args[2])
    new = [sizes.size(out[dim + i]) if s != -1 else s for i, s in enumerate(sizes_arg)]
    if new == sizes_arg:
        return False
    node.args = (node.args[0], node.args[1], tuple(new))
    return True


def _split(node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> bool:
    """split/chunk/tensor_split: sizes of the pieces follow the parts of the split axis."""
    x = nodes[node.args[0].name]
    value = node.meta[VALUE]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim %= len(x)
    pieces = _out_axes(node, nodes)
    new = [sizes.size(p[dim]) for p in pieces]
    old = [v.shape[dim] for v in value]
    if new == old:
        return False
    kind = node.target if isinstance(node.target, str) else node.target.__name__
    count = node.args[1] if len(node.args) > 1 else next(iter(node.kwargs.values()), None)
    if isinstance(count, int) and kind in ("chunk", "tensor_split") and _pieces(kind, sum(new), count) == new:
        return False  # chunk(3) of the kept channels still gives the kept pieces
    if kind == "split" and len(node.args) > 1:  # the sizes change, the call stays as written (dim=...)
        one = isinstance(count, int) and _pieces(kind, sum(new), new[0]) == new  # split(64) -> split(45)
        node.args = (node.args[0], new[0] if one else new, *node.args[2:])
        return True
    node.target = "split" if node.op == "call_method" else torch.split
    node.args = (node.args[0], new, dim)
    node.kwargs = {}
    return True


def _pieces(kind: str, total: int, count: int) -> list[int]:
    """Sizes of the pieces ``chunk``/``tensor_split``/``split`` make of ``total`` with an int ``count``."""
    return [len(piece) for piece in getattr(torch.arange(total), kind)(count)]


def _getitem(node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> bool:
    """Slices of a tensor: bounds count only the kept indices before them."""
    source, index = node.args
    x = nodes.get(source.name) if isinstance(source, fx.Node) else None
    if not isinstance(x, tuple) or not isinstance(source.meta.get(VALUE), TensorMeta):
        return False
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (fx.Node, list)) for i in items):
        return False
    new: list[Any] = []
    k, changed = 0, False
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    for i in items:
        if i is not None and i is not Ellipsis:
            if isinstance(i, slice) and sizes.touches(x[k]) and not _whole(i, x[k].size):
                i, changed = _rebound(i, sizes.mask(x[k])), True
            k += 1
        elif i is Ellipsis:
            k += len(x) - used
        new.append(i)
    if not changed:
        return False
    node.args = (source, tuple(new) if isinstance(index, tuple) else new[0])
    return True


def _whole(s: slice, size: int) -> bool:
    """Whether ``s`` takes every index of an axis of ``size`` in order (``[:]``): it still does
    after pruning, so it stays as written."""
    return s.indices(size) == (0, size, 1)


def _rebound(s: slice, mask: torch.Tensor) -> slice:
    start, stop, step = s.indices(len(mask))
    kept_before = torch.cat([torch.zeros(1, dtype=torch.long), mask.long().cumsum(0)])
    return slice(int(kept_before[start]), int(kept_before[stop]), None if step == 1 else step)


def _narrow(node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> bool:
    x = nodes[node.args[0].name]
    dim, start, length = node.args[1] % len(x), node.args[2], node.args[3]
    if not sizes.touches(x[dim]) or isinstance(start, fx.Node) or isinstance(length, fx.Node):
        return False
    s = _rebound(slice(start % x[dim].size, start % x[dim].size + length), sizes.mask(x[dim]))
    node.args = (node.args[0], node.args[1], s.start, s.stop - s.start)
    return True


def _sdpa(node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> bool:
    """Keep attention's scale at 1/sqrt(original head_dim) when head_dim is pruned."""
    q = nodes[node.args[0].name]
    if node.kwargs.get("scale") is not None or not sizes.touches(q[-1]):
        return False
    node.kwargs = {**node.kwargs, "scale": 1.0 / math.sqrt(q[-1].size)}
    return True


# -- ATen graphs (torch.export): literals of ATen ops -----------------------------------


def _schema_arg(node: fx.Node, name: str, default: Any = None) -> tuple[int, Any]:
    """Position of the ATen op's argument ``name`` and its value (``default`` if not given)."""
    for i, a in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if a.name == name:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(name, default)
            return i, value
    return -1, default


def _set_arg(node: fx.Node, index: int, name: str, value: Any) -> None:
    if index < len(node.args):
        node.args = (*node.args[:index], value, *node.args[index + 1 :])
    else:
        node.kwargs = {**node.kwargs, name: value}


def _aten_split(node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> bool:
    """aten.split/split_with_sizes/chunk/tensor_split: an aten.split_with_sizes with the
    sizes of the kept parts."""
    if not _split(node, nodes, sizes):
        return False
    node.target = torch.ops.aten.split_with_sizes.default
    return True


def _aten_slice(node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> bool:
    """aten.slice(x, dim, start, end, step): bounds count only the kept indices before them."""
    x = nodes[node.args[0].name]
    dim = _schema_arg(node, "dim", 0)[1] % len(x)
    bounds = [_schema_arg(node, name, default)[1] for name, default in (("start", None), ("end", None), ("step", 1))]
    if not sizes.touches(x[dim]) or any(isinstance(b, fx.Node) for b in bounds) or _whole(slice(*bounds), x[dim].size):
        return False
    s = _rebound(slice(*bounds), sizes.mask(x[dim]))
    node.args, node.kwargs = (node.args[0], dim, s.start, s.stop, s.step or 1), {}
    return True


_ATEN = torch.ops.aten

GRAPH_REWRITES: dict[object, Callable[[fx.Node, dict[str, Any], Sizes], bool]] = {
    **dict.fromkeys(("view", "reshape", "expand", "broadcast_to", torch.reshape, torch.broadcast_to), _shape_args),
    **dict.fromkeys(("unflatten", torch.unflatten), _unflatten),
    **dict.fromkeys(("split", "chunk", "tensor_split", torch.split, torch.chunk, torch.tensor_split), _split),
    operator.getitem: _getitem,
    **dict.fromkeys(("narrow", torch.narrow), _narrow),
    F.scaled_dot_product_attention: _sdpa,
    # ATen op packets (graphs from torch.export); shrink also looks an overload up by its packet
    **dict.fromkeys((_ATEN.view, _ATEN._unsafe_view, _ATEN.reshape, _ATEN.expand), _shape_args),
    _ATEN.unflatten: _unflatten,
    **dict.fromkeys((_ATEN.split, _ATEN.split_with_sizes, _ATEN.chunk, _ATEN.tensor_split), _aten_split),
    _ATEN.slice: _aten_slice,
    _ATEN.narrow: _narrow,
    _ATEN.scaled_dot_product_attention: _sdpa,
}
"""Literal rewrites per op; add an entry when a rule relates a literal to an axis."""

