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
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .dims import Atom, Expr, Product, kept_mask
from .errors import PlanError
from .meta import VALUE, TensorMeta
from .mha import PrunedMultiheadAttention

__all__ = ["replace_module", "shrink", "Sizes"]


class Sizes:
    """Kept-index masks of resolved expressions under one set of removed units (cached)."""

    def __init__(self, removed: dict[Atom, torch.Tensor]) -> None:
        self.removed = removed
        self._masks: dict[Expr, torch.Tensor] = {}

    def mask(self, expr: Expr) -> torch.Tensor:
        m = self._masks.get(expr)
        if m is None:
            m = self._masks[expr] = kept_mask(expr, self.removed)
        return m

    def size(self, expr: Expr) -> int:
        return int(self.mask(expr).sum()) if self.touches(expr) else expr.size

    def touches(self, expr: Expr) -> bool:
        """Whether the expression loses any index."""
        return any(a in self.removed for a in _atoms(expr))


def _atoms(expr: Expr) -> list[Atom]:
    if isinstance(expr, Atom):
        return [expr]
    subs = expr.factors if isinstance(expr, Product) else expr.parts
    return [a for s in subs for a in _atoms(s)]


def shrink(
    gm: fx.GraphModule,
    params: dict[str, tuple[Expr, ...]],
    nodes: dict[str, Any],
    removed: dict[Atom, torch.Tensor],
    root: nn.Module | None = None,
) -> bool:
    """Shrink ``gm`` in place; return True if graph literals were rewritten.

    ``root`` is the module ``gm`` was traced from: sliced tensors are set there too
    (fx copies attributes reached by ``get_attr`` onto the GraphModule itself)."""
    sizes = Sizes(removed)
    _slice_state(gm, params, sizes, root)
    changed = False
    for node in gm.graph.nodes:
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
    gm: fx.GraphModule, params: dict[str, tuple[Expr, ...]], sizes: Sizes, root: nn.Module | None
) -> None:
    aliases: dict[int, list[str]] = {}
    for name, t in (*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)):
        aliases.setdefault(id(t), []).append(name)
    by_name = {names[0]: names for names in aliases.values()}
    for name, axes in params.items():
        if not any(sizes.touches(e) for e in axes):
            continue
        names = by_name.get(name, [name])
        old = _get(gm, names[0])
        new = old.detach()
        for dim, expr in enumerate(axes):
            if sizes.touches(expr):
                new = new.index_select(dim, sizes.mask(expr).nonzero().flatten().to(new.device))
        value = new.clone()
        if isinstance(old, nn.Parameter):
            value = nn.Parameter(value, requires_grad=old.requires_grad)
        for module in (gm, root) if root is not None else (gm,):
            for alias in names:
                _set(module, alias, value)


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


def _get(gm: fx.GraphModule, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(owner), attr)


# -- module attributes ---------------------------------------------------------------


def _in_axes(node: fx.Node, nodes: dict[str, Any]) -> tuple[Expr, ...]:
    return nodes[node.args[0].name]


def _conv(m: nn.Module, node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> None:
    x = _in_axes(node, nodes)
    ch = 1 if len(x) == m.weight.ndim else 0
    m.in_channels = sizes.size(x[ch])
    if isinstance(m, nn.modules.conv._ConvTransposeNd):  # weight: (in, out/groups, k...)
        m.groups = _groups_from(x[ch], m.groups, sizes)
        m.out_channels = m.weight.shape[1] * m.groups
    else:
        m.groups = m.in_channels // m.weight.shape[1]
        m.out_channels = m.weight.shape[0]


def _groups_from(expr: Expr, groups: int, sizes: Sizes) -> int:
    """Kept groups when ``expr`` = Product(groups, per-group): the leading factors of that size."""
    if isinstance(expr, Product):
        lead: list[Expr] = []
        for f in expr.factors:
            lead.append(f)
            if math.prod(x.size for x in lead) == groups:
                return sizes.size(Product(tuple(lead)) if len(lead) > 1 else lead[0])
    return groups


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
    m.num_groups = _groups_from(x[1], m.num_groups, sizes)
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
    """view/reshape/expand: sizes of pruned output axes become the new literal sizes.

    This covers sizes computed in the graph too (``b, n, d = x.shape`` then
    ``reshape(b, n, d)``): ``d`` may measure another axis than the one it shapes."""
    out = _out_axes(node, nodes)
    packed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    shape = list(node.args[1] if packed else node.args[1:])
    if "shape" in node.kwargs or "size" in node.kwargs:
        return False
    new = [
        sizes.size(e) if s != -1 and (sizes.touches(e) or _measures_pruned(s, nodes, sizes)) else s
        for s, e in zip(shape, out)
    ]
    if new == shape:
        return False
    node.args = (node.args[0], tuple(new)) if packed else (node.args[0], *new)
    return True


def _measures_pruned(value: Any, nodes: dict[str, Any], sizes: Sizes) -> bool:
    """Whether a size computed in the graph (``x.shape[i]``, ``x.size(i)``, arithmetic on
    them) reads a pruned axis, so that it changes value once the model shrinks."""
    if not isinstance(value, fx.Node):
        return False
    if isinstance(value.meta.get(VALUE), TensorMeta):  # numel(), a tensor used as a size
        axes = nodes.get(value.name)
        return isinstance(axes, tuple) and any(sizes.touches(e) for e in axes)
    if value.op == "call_method" and value.target == "size" and len(value.args) > 1:
        axes = nodes.get(value.args[0].name)
        return isinstance(axes, tuple) and sizes.touches(axes[value.args[1]])
    if value.op == "call_function" and value.target is operator.getitem:
        source, index = value.args
        if isinstance(source, fx.Node) and isinstance(index, int) and _reads_shape(source):
            axes = nodes.get(source.args[0].name)
            return isinstance(axes, tuple) and sizes.touches(axes[index])
    if _reads_shape(value):
        axes = nodes.get(value.args[0].name)
        return isinstance(axes, tuple) and any(sizes.touches(e) for e in axes)
    return any(_measures_pruned(a, nodes, sizes) for a in value.all_input_nodes)


def _reads_shape(node: fx.Node) -> bool:
    """``x.shape`` / ``x.size()`` (a whole shape)."""
    if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
        return True
    return node.op == "call_method" and node.target == "size" and len(node.args) == 1


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
    node.target = "split" if node.op == "call_method" else torch.split
    node.args = (node.args[0], new, dim)
    node.kwargs = {}
    return True


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
            if isinstance(i, slice) and sizes.touches(x[k]):
                i, changed = _rebound(i, sizes.mask(x[k])), True
            k += 1
        elif i is Ellipsis:
            k += len(x) - used
        new.append(i)
    if not changed:
        return False
    node.args = (source, tuple(new) if isinstance(index, tuple) else new[0])
    return True


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


def _layer_norm_args(node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> bool:
    x = nodes[node.args[0].name]
    shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
    shape = [shape] if isinstance(shape, int) else list(shape)
    new = [sizes.size(e) for e in x[len(x) - len(shape) :]]
    if new == shape:
        return False
    if len(node.args) > 1:
        node.args = (node.args[0], tuple(new), *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "normalized_shape": tuple(new)}
    return True


def _group_norm_args(node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> bool:
    x = nodes[node.args[0].name]
    groups = node.args[1] if len(node.args) > 1 else node.kwargs["num_groups"]
    new = _groups_from(x[1], groups, sizes)
    if new == groups:
        return False
    if len(node.args) > 1:
        node.args = (node.args[0], new, *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "num_groups": new}
    return True


def _channel_shuffle(node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> bool:
    x = nodes[node.args[0].name]
    groups = node.args[1]
    new = _groups_from(x[1], groups, sizes)
    if new == groups:
        return False
    node.args = (node.args[0], new, *node.args[2:])
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
    if not sizes.touches(x[dim]) or any(isinstance(b, fx.Node) for b in bounds):
        return False
    s = _rebound(slice(*bounds), sizes.mask(x[dim]))
    node.args, node.kwargs = (node.args[0], dim, s.start, s.stop, s.step or 1), {}
    return True


def _aten_conv(node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> bool:
    """aten.conv*d/conv_transpose*d/convolution: ``groups`` follows the kept channels, as
    the Conv module update computes it."""
    index, groups = _schema_arg(node, "groups", 1)
    x, w = nodes[node.args[0].name], nodes[node.args[1].name]
    ch = 1 if len(x) == len(w) else 0
    if _schema_arg(node, "transposed", False)[1] or "transpose" in str(node.target):
        new = _groups_from(x[ch], groups, sizes)
    else:
        new = sizes.size(x[ch]) // sizes.size(w[1])
    if new == groups:
        return False
    _set_arg(node, index, "groups", new)
    return True


_ATEN = torch.ops.aten

GRAPH_REWRITES: dict[object, Callable[[fx.Node, dict[str, Any], Sizes], bool]] = {
    **dict.fromkeys(("view", "reshape", "expand", "broadcast_to", torch.reshape, torch.broadcast_to), _shape_args),
    **dict.fromkeys((torch.channel_shuffle, torch.native_channel_shuffle, F.channel_shuffle), _channel_shuffle),
    **dict.fromkeys(("unflatten", torch.unflatten), _unflatten),
    **dict.fromkeys(("split", "chunk", "tensor_split", torch.split, torch.chunk, torch.tensor_split), _split),
    operator.getitem: _getitem,
    **dict.fromkeys(("narrow", torch.narrow), _narrow),
    F.scaled_dot_product_attention: _sdpa,
    F.layer_norm: _layer_norm_args,
    F.group_norm: _group_norm_args,
    # ATen op packets (graphs from torch.export); shrink also looks an overload up by its packet
    **dict.fromkeys((_ATEN.view, _ATEN._unsafe_view, _ATEN.reshape, _ATEN.expand), _shape_args),
    _ATEN.unflatten: _unflatten,
    **dict.fromkeys((_ATEN.split, _ATEN.split_with_sizes, _ATEN.chunk, _ATEN.tensor_split), _aten_split),
    _ATEN.slice: _aten_slice,
    _ATEN.narrow: _narrow,
    **dict.fromkeys((_ATEN.channel_shuffle, _ATEN.native_channel_shuffle), _channel_shuffle),
    _ATEN.scaled_dot_product_attention: _sdpa,
    _ATEN.layer_norm: _layer_norm_args,
    _ATEN.group_norm: _group_norm_args,
    **dict.fromkeys((_ATEN.conv1d, _ATEN.conv2d, _ATEN.conv3d, _ATEN.conv_transpose1d, _ATEN.conv_transpose2d,
                     _ATEN.conv_transpose3d, _ATEN.convolution, _ATEN._convolution), _aten_conv),
}
"""Literal rewrites per op; add an entry when a rule relates a literal to an axis."""

