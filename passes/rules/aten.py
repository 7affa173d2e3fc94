"""ATen-level rules, and the fallback that uses them for ops with no torch-level rule.

``ATEN_RULES`` relates graphs of ATen ops (``torch.ops.aten.*``): the mini-graphs
of the fallback below, and whole models traced by an ATen frontend. It is keyed
by op packet (``aten.view``); looking up an overload (``aten.view.default``)
finds its packet's rule, and an overload tagged ``torch.Tag.pointwise`` with no
entry of its own is elementwise. Where an ATen signature matches a torch-level
one, the torch-level rule is reused; the adapters here cover the others.
``EXPORT_RULES`` relates whole graphs from torch.export: ``ATEN_RULES``, export's
input guard module, the calls export makes for regions under ``torch.vmap`` and
``torch.no_grad()`` (opaque: their axes are pinned with the reason), and the fallback
below for every ATen op with no rule.

:func:`lower` is the fallback: an fx node whose op has no rule is traced with
``make_fx`` (pre-dispatch, so composite ops such as ``linear`` or
``scaled_dot_product_attention`` keep their own rule) on meta tensors into an ATen
mini-graph; ops with no ATen rule are split by their core ATen decomposition where
one exists. The mini-graph is related with ``LOWERED_RULES`` against the node's input
axes; a leaf module's parameters and buffers are inputs of its mini-graph, so its
relation reaches them. Sizes are traced as numbers, so a size the op computes from
its inputs and a literal in its code look alike: each free atom at the op's boundary
is checked by tracing the op again with that atom resized, and pinned unless every
node follows. Mini-graphs are cached by signature (op, input shapes and dtypes,
non-tensor arguments); relating one again makes fresh atoms for that use.
"""

from __future__ import annotations

import functools
import math
import operator
import re
import weakref
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch._decomp import core_aten_decompositions
from torch._ops import OpOverload
from torch.fx.experimental.proxy_tensor import make_fx

from ..dims import ONE, Atom, Expr, Product, atoms_of
from ..meta import VALUE, TensorMeta
from ..shapes import describe
from . import attention, layers, pointwise, reduce, shape_ops
from .context import Axes, Context, Literal, Rule, arg

__all__ = ["ATEN_RULES", "EXPORT_RULES", "LOWERED_RULES", "AtenRules", "ExportRules", "clear_cache", "lower"]

aten = torch.ops.aten

STATISTIC = "statistic saved by a normalization or attention kernel"
UNFOLLOWED = "an op lowered to ATen does not follow a change of this axis' size (checked on meta tensors)"


class AtenRules(dict):  # type: ignore[type-arg]
    """Rules keyed by ATen op packet; :meth:`get` also accepts an overload.

    >>> ATEN_RULES.get(torch.ops.aten.view.default) is shape_ops.reshape
    True
    >>> ATEN_RULES.get(torch.ops.aten.sigmoid.default) is pointwise.pointwise
    True
    >>> ATEN_RULES.get(torch.ops.aten.nonzero.default) is None
    True
    """

    def get(self, op: object, default: Any = None) -> Any:
        """The rule of ``op``: a packet, an overload, or a non-ATen target such as getitem."""
        if isinstance(op, OpOverload):
            rule = super().get(op.overloadpacket)
            if rule is None and torch.Tag.pointwise in op.tags:
                rule = pointwise.pointwise
            return default if rule is None else rule
        return super().get(op, default)

    def __contains__(self, op: object) -> bool:
        return self.get(op) is not None


# -- adapters: ATen signatures that differ from the torch-level ones ----------


def _named(node: fx.Node, name: str, default: Any = None) -> Any:
    """Argument ``name`` of an ATen op node, found by its place in the op's schema."""
    schema = node.target._schema  # type: ignore[union-attr]
    for i, a in enumerate(schema.arguments):
        if a.name == name:
            return arg(node, i, name, default)
    return default


def _with_saved(cx: Context, node: fx.Node, out: Axes, keep: tuple[Expr, ...]) -> Axes:
    """``out``, followed (when the op returns a tuple) by axes for its saved statistics:
    ``keep`` where their shape starts with ``keep``'s sizes and ends in size-1 axes,
    else pinned."""
    value = cx.value(node)
    if not isinstance(value, tuple):
        return out
    n, sizes = len(keep), tuple(e.size for e in keep)
    saved: list[Axes] = []
    for v in value[1:]:
        if isinstance(v, TensorMeta) and v.shape[:n] == sizes and all(s == 1 for s in v.shape[n:]):
            saved.append((*keep, *(ONE for _ in v.shape[n:])))
        else:
            saved.append(cx.pinned_like(v, STATISTIC))
    return [out, *saved]


def slice_rule(cx: Context, node: fx.Node) -> Axes:
    """slice(self, dim, start, end, step): the kept stretch of the axis is a part of it."""
    x = cx.of(node.args[0])
    d = shape_ops._dim(arg(node, 1, "dim", 0), len(x))
    start, end = cx.value(arg(node, 2, "start")), cx.value(arg(node, 3, "end"))
    kept = slice(start, end, cx.value(arg(node, 4, "step", 1)))
    return (*x[:d], shape_ops._slice_axis(cx, x[d], *kept.indices(x[d].size)), *x[d + 1 :])


def select(cx: Context, node: fx.Node) -> Axes:
    """select(self, dim, index): one coordinate of the axis is kept, so the axis is pinned."""
    x = cx.of(node.args[0])
    d = shape_ops._dim(arg(node, 1, "dim"), len(x))
    cx.u.pin(x[d], shape_ops.INT_INDEX)
    return x[:d] + x[d + 1 :]


def index_select(cx: Context, node: fx.Node) -> Axes:
    """index_select(self, dim, index): the indexed axis is pinned, and so is the output's."""
    x = cx.of(node.args[0])
    d = shape_ops._dim(arg(node, 1, "dim"), len(x))
    cx.u.pin(x[d], shape_ops.ADVANCED)
    return (*x[:d], *cx.fresh(cx.out(node).shape[d : d + 1], shape_ops.ADVANCED), *x[d + 1 :])


def native_dropout(cx: Context, node: fx.Node) -> Axes:
    """native_dropout(input, p, train) -> (output, mask): both have the input's axes."""
    x = cx.of(node.args[0])
    return [x, x]


def convolution(cx: Context, node: fx.Node) -> Axes:
    """convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding,
    groups): as the Conv modules, with weight and bias from the graph."""
    bias = arg(node, 2, "bias")
    axes, group = layers._conv(
        cx, cx.of(node.args[0]), cx.of(node.args[1]), cx.of(bias) if bias is not None else None,
        cx.value(arg(node, 8, "groups", 1)), cx.out(node).shape, bool(arg(node, 6, "transposed", False)),
    )
    cx.measure(node, Literal(8, "groups"), group)
    return axes


def native_layer_norm(cx: Context, node: fx.Node) -> Axes:
    """native_layer_norm(input, normalized_shape, weight, bias, eps) -> (out, mean, rstd):
    as layer_norm; mean and rstd keep the unnormalized leading axes."""
    x = layers.f_layer_norm(cx, node)
    assert isinstance(x, tuple)
    return _with_saved(cx, node, x, x[: len(x) - len(cx.value(arg(node, 1, "normalized_shape")))])


def native_batch_norm(cx: Context, node: fx.Node) -> Axes:
    """native_batch_norm and _native_batch_norm_legit*(input, weight, bias, [running_mean,
    running_var], ...): every per-channel tensor, and every saved or updated per-channel
    statistic, is the channel axis."""
    x = layers.f_batch_norm(cx, node)
    assert isinstance(x, tuple)
    return _with_saved(cx, node, x, (x[1] if len(x) > 1 else x[0],))


def native_group_norm(cx: Context, node: fx.Node) -> Axes:
    """native_group_norm(input, weight, bias, N, C, HxW, group, eps) -> (out, mean, rstd):
    channels = Product(groups, channels per group); mean and rstd are (batch, groups)."""
    x = cx.of(node.args[0])
    groups = layers.groups_of(cx, x[1], cx.value(arg(node, 6, "group")))
    cx.measure(node, Literal(6, "group"), groups)
    cx.measure(node, Literal(4, "C"), x[1])
    layers._per_channel(cx, x[1], layers._values(cx, node, ((1, "weight"), (2, "bias"))))
    return _with_saved(cx, node, x, (x[0], groups))


def embedding(cx: Context, node: fx.Node) -> Axes:
    """embedding(weight, indices): output = indices' axes + weight[1]; weight[0] is pinned."""
    w = cx.of(node.args[0])
    cx.u.pin(w[0], layers.EMBEDDING_ROWS)
    return (*cx.of(node.args[1]), w[1])


def attention_kernel(cx: Context, node: fx.Node) -> Axes:
    """scaled_dot_product_attention and the kernels behind it (math, flash, efficient, cudnn):
    q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev), arguments found by name.

    As :func:`passes.rules.attention.scaled_dot_product_attention`, and without an explicit
    ``scale`` E is pinned: the kernel divides by sqrt(E), and no shrink pass rewrites the
    scale of a kernel call. Saved statistics of shape (..., L) keep the query's axes."""
    q, k, v = (cx.of(a) for a in node.args[:3])
    cx.unify(q[-1], k[-1])
    cx.unify_all(k[:-1], v[:-1])
    for a, b in zip(q[:-2], k[:-2]):
        if a.size == b.size:
            cx.unify(a, b)
        elif b.size > 1 and a.size % b.size == 0:
            cx.unify(a, Product((b, cx.new(a.size // b.size))))  # GQA: the kernel reads the repeat
    mask = _named(node, "attn_mask", _named(node, "attn_bias"))
    if cx.is_tensor(mask):
        attention._broadcast(cx, (*q[:-1], k[-2]), cx.of(mask))
    if _named(node, "is_causal", False):
        cx.u.pin(q[-2], attention.CAUSAL)
        cx.u.pin(k[-2], attention.CAUSAL)
    if _named(node, "scale") is None:
        cx.u.pin(q[-1], attention.DEFAULT_SCALE)
    return _with_saved(cx, node, (*q[:-1], v[-1]), q[:-1])


def spatial(cx: Context, node: fx.Node) -> Axes:
    """Pooling and resizing (max_pool2d, adaptive_avg_pool1d, upsample_bilinear2d, ...): as
    :func:`passes.rules.reduce.spatial`, with the number of pooled axes read from the op's
    name (``2d``), so an unbatched input keeps one leading axis."""
    x, value = cx.of(node.args[0]), cx.value(node)
    out = reduce._first_shape(value)
    pooled = re.search(r"(\d)d", str(node.target))
    assert pooled is not None, f"{node.target} has no rank in its name"
    keep = len(out) - int(pooled.group(1))
    cx.pin(x[keep:], reduce.POOLED)
    return reduce._like_value(value, (*x[:keep], *cx.fresh(out[keep:], reduce.RESIZED)))


def index(cx: Context, node: fx.Node) -> Axes:
    """index.Tensor(self, indices): ``self[indices]`` with a full slice for each None; the
    indexed axes and the index tensors' axes are pinned, the other axes pass through."""
    x = cx.of(node.args[0])
    items = tuple(slice(None) if i is None else i for i in arg(node, 1, "indices"))
    result = shape_ops._index_tensor(cx, node, x, items)
    if result is None or tuple(e.size for e in result) != cx.out(node).shape:
        cx.pin(x, shape_ops.UNCLEAR)
        return cx.pinned_like(cx.value(node), shape_ops.UNCLEAR)
    return result


def gather(cx: Context, node: fx.Node) -> Axes:
    """gather(self, dim, index): the output has the index's shape; the gathered axis and the
    index's axis there are pinned; every other axis is the same in self, index and output
    where their sizes agree, and pinned where the index covers only part of it."""
    x, idx = cx.of(node.args[0]), cx.of(arg(node, 2, "index"))
    d = shape_ops._dim(arg(node, 1, "dim"), len(x))
    for k, (a, b) in enumerate(zip(x, idx)):
        if k != d and a.size == b.size:
            cx.unify(a, b)
        else:
            cx.u.pin(a, shape_ops.ADVANCED)
            cx.u.pin(b, shape_ops.ADVANCED)
    return idx


def instance_norm(cx: Context, node: fx.Node) -> Axes:
    """instance_norm(input, weight, bias, running_mean, running_var, ...): every per-channel
    tensor is the channel axis (dim 1)."""
    x = cx.of(node.args[0])
    where = ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var"))
    layers._per_channel(cx, x[1], layers._values(cx, node, where))
    return x


GRAD_REGION = ("computed in a torch.no_grad() or set_grad_enabled region, which torch.export keeps as a "
               "subgraph (wrap_with_set_grad_enabled) that no rule looks inside and prune cannot rewrite; "
               "for rotary embeddings (Hugging Face's cos/sin), head_dim of queries and keys stays whole")
VMAP = ("computed under torch.vmap, which torch.export keeps as batching calls (_add_batch_dim, flat_apply) "
        "that no rule relates; in Hugging Face models this builds the attention mask, over positions")


def opaque(reason: str) -> Rule:
    """A rule for an op whose computation is hidden from the rules (a subgraph, a vmapped
    function): every axis of its tensor inputs and outputs is pinned with ``reason``."""

    def rule(cx: Context, node: fx.Node) -> Axes:
        for a in node.all_input_nodes:
            cx.pin(cx.axes.get(a), reason)
        return cx.pinned_like(cx.value(node), reason)

    rule.__doc__ = f"Pins the axes of every tensor in and out: {reason}."
    return rule


def _functorch_rules() -> dict[object, Rule]:
    """torch.export's graph of a region under ``torch.vmap`` or ``torch.no_grad()``: the
    bookkeeping calls return nothing; batching calls and the grad-mode subgraph are opaque."""
    from torch._functorch import predispatch

    higher = torch.ops.higher_order
    rules: dict[object, Rule] = {
        getattr(predispatch, name): shape_ops.no_axes
        for name in ("lazy_load_decompositions", "_vmap_increment_nesting", "_vmap_decrement_nesting")
        if hasattr(predispatch, name)
    }
    vmap = [getattr(predispatch, n, None) for n in ("_add_batch_dim", "_remove_batch_dim")]
    rules.update({op: opaque(VMAP) for op in (*vmap, getattr(higher, "flat_apply", None)) if op is not None})
    grad = getattr(higher, "wrap_with_set_grad_enabled", None)
    if grad is not None:
        rules[grad] = opaque(GRAD_REGION)
    return rules


def _named_ops(rule: Rule, names: str) -> dict[object, Rule]:
    """``rule`` for each ATen op packet in the space-separated ``names``."""
    return {getattr(aten, name): rule for name in names.split()}


ATEN_RULES = AtenRules({
    **_named_ops(shape_ops.reshape, "view _unsafe_view reshape _reshape_alias view_as reshape_as unflatten"),
    **_named_ops(shape_ops.flatten, "flatten"),
    **_named_ops(shape_ops.permute, "permute"),
    **_named_ops(shape_ops.t, "t"),
    **_named_ops(shape_ops.transpose, "transpose"),
    **_named_ops(shape_ops.movedim, "movedim"),
    **_named_ops(shape_ops.unsqueeze, "unsqueeze"),
    **_named_ops(shape_ops.squeeze, "squeeze"),
    **_named_ops(shape_ops.channel_shuffle, "channel_shuffle native_channel_shuffle"),
    **_named_ops(shape_ops.expand, "expand"),
    **_named_ops(shape_ops.expand_as, "expand_as"),
    **_named_ops(shape_ops.repeat, "repeat"),
    **_named_ops(shape_ops.repeat_interleave, "repeat_interleave"),
    **_named_ops(shape_ops.pixel_shuffle, "pixel_shuffle"),
    **_named_ops(shape_ops.pixel_unshuffle, "pixel_unshuffle"),
    **_named_ops(shape_ops.pad, "pad constant_pad_nd"),
    **_named_ops(shape_ops.flip, "flip"),
    **_named_ops(shape_ops.roll, "roll"),
    **_named_ops(shape_ops.rot90, "rot90"),
    **_named_ops(shape_ops.narrow, "narrow"),
    **_named_ops(shape_ops.cat, "cat"),
    **_named_ops(shape_ops.stack, "stack"),
    **_named_ops(shape_ops.split, "split split_with_sizes chunk tensor_split"),
    **_named_ops(shape_ops.unbind, "unbind"),
    **_named_ops(shape_ops.like, "zeros_like ones_like empty_like full_like rand_like randn_like "
                                 "randint_like"),
    **_named_ops(shape_ops.literal, "zeros ones empty full arange scalar_tensor empty_strided new_zeros "
                                    "new_ones new_empty new_full rand randn randint linspace eye"),
    **_named_ops(shape_ops.no_axes, "sym_size sym_numel _assert_tensor_metadata"),
    **_named_ops(slice_rule, "slice"),
    **_named_ops(select, "select"),
    **_named_ops(index_select, "index_select"),
    **_named_ops(index, "index"),
    **_named_ops(gather, "gather"),
    **_named_ops(pointwise.identity, "clone alias detach _to_copy to type_as contiguous lift_fresh_copy "
                                     "dropout feature_dropout alpha_dropout dropout_ feature_dropout_ alpha_dropout_ "
                                     "feature_alpha_dropout feature_alpha_dropout_ detach_"),
    **_named_ops(pointwise.pointwise, "copy copy_"),
    **_named_ops(native_dropout, "native_dropout"),
    **_named_ops(attention.matmul, "mm bmm matmul mv dot"),
    **_named_ops(attention.add_matmul, "addmm baddbmm"),
    **_named_ops(layers.f_linear, "linear"),
    **_named_ops(reduce.reduction, "sum mean amax amin max min var std var_mean std_mean prod logsumexp "
                                   "argmax argmin any all linalg_vector_norm norm"),
    **_named_ops(reduce.same, "softmax _softmax _safe_softmax log_softmax _log_softmax cumsum"),
    **_named_ops(convolution, "convolution _convolution"),
    **_named_ops(layers.f_conv, "conv1d conv2d conv3d"),
    **_named_ops(layers.f_conv_transpose, "conv_transpose1d conv_transpose2d conv_transpose3d"),
    **_named_ops(layers.f_layer_norm, "layer_norm rms_norm"),
    **_named_ops(instance_norm, "instance_norm"),
    **_named_ops(native_layer_norm, "native_layer_norm"),
    **_named_ops(layers.f_batch_norm, "batch_norm"),
    **_named_ops(native_batch_norm, "native_batch_norm _native_batch_norm_legit "
                                    "_native_batch_norm_legit_no_training "
                                    "_native_batch_norm_legit_functional"),
    **_named_ops(layers.f_group_norm, "group_norm"),
    **_named_ops(native_group_norm, "native_group_norm"),
    **_named_ops(embedding, "embedding"),
    **_named_ops(layers.prelu, "prelu _prelu_kernel"),
    **_named_ops(attention.scaled_dot_product_attention, "scaled_dot_product_attention"),
    **_named_ops(attention.einsum, "einsum"),
    **_named_ops(spatial, "max_pool1d max_pool2d max_pool3d max_pool2d_with_indices max_pool3d_with_indices "
                          "avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d "
                          "adaptive_avg_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_max_pool1d "
                          "adaptive_max_pool2d adaptive_max_pool3d upsample_nearest1d upsample_nearest2d "
                          "upsample_nearest3d _upsample_nearest_exact1d _upsample_nearest_exact2d "
                          "_upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d upsample_bicubic2d "
                          "upsample_trilinear3d _upsample_bilinear2d_aa _upsample_bicubic2d_aa"),
    **_named_ops(attention_kernel, "_scaled_dot_product_attention_math "
                                   "_scaled_dot_product_flash_attention "
                                   "_scaled_dot_product_flash_attention_for_cpu "
                                   "_scaled_dot_product_efficient_attention "
                                   "_scaled_dot_product_cudnn_attention"),
    operator.getitem: shape_ops.getitem,
    torch._C._set_grad_enabled: shape_ops.no_axes,
})
"""Rules for ATen graphs: op packet -> rule; overloads tagged pointwise are elementwise."""


def roi_pooling(cx: Context, node: fx.Node) -> Axes:
    """torchvision's roi_align / roi_pool(input, rois, spatial_scale, pooled_height,
    pooled_width, ...): each box of ``rois`` pools every channel of ``input`` on its own, so
    the output (boxes, channels, pooled_height, pooled_width) keeps the input's channel
    axis; its boxes are the rows of ``rois``; the batch axis is indexed by the boxes and
    the spatial axes are pooled (pinned). roi_pool's argmax has the output's axes."""
    x, rois = cx.of(node.args[0]), cx.of(node.args[1])
    cx.u.pin(x[0], shape_ops.ADVANCED)
    cx.pin(x[2:], reduce.POOLED)
    value = cx.value(node)
    out = (rois[0], x[1], *cx.fresh(reduce._first_shape(value)[2:], reduce.RESIZED))
    return [out, out] if isinstance(value, tuple) else out


def _torchvision_rules() -> dict[object, Rule]:
    """Rules for torchvision's operators (``torch.ops.torchvision``), when it is installed."""
    try:
        import torchvision  # noqa: F401 -- registers torch.ops.torchvision
    except ImportError:
        return {}
    ops = torch.ops.torchvision
    return {ops.roi_align: roi_pooling, ops.roi_pool: roi_pooling}


ATEN_RULES.update(_torchvision_rules())

LOWERED_RULES = AtenRules({**ATEN_RULES, aten.scaled_dot_product_attention: attention_kernel})
"""The rules for the mini-graph of a lowered op: as ATEN_RULES, except where a rule relies on
shrink rewriting the call (the scale of scaled_dot_product_attention): nothing rewrites a
call inside a lowered op. Sizes written into a lowered op are checked by :func:`lower`."""


def lowered(cx: Context, node: fx.Node) -> Axes:
    """An ATen op with no rule in a whole graph from torch.export: related through its
    decomposition as the fx fallback relates an op (:func:`lower`), else unsupported."""
    from . import _unsupported  # the package imports this module

    axes = lower(cx, node)
    return axes if axes is not None else _unsupported(cx, node, f"no rule for {node.target}")


class ExportRules(AtenRules):
    """Rules for whole graphs from torch.export: an ATen op with no rule of its own is
    lowered (:func:`lowered`) before it is pinned, as ops in fx graphs are.

    >>> EXPORT_RULES.get(torch.ops.aten.hardswish_.default) is lowered
    True
    >>> EXPORT_RULES.get(torch.ops.aten.conv2d.default) is layers.f_conv
    True
    """

    def get(self, op: object, default: Any = None) -> Any:
        """The rule of ``op``; :func:`lowered` for an ATen op with none."""
        rule = super().get(op)
        if rule is None and isinstance(op, OpOverload):
            rule = lowered
        return default if rule is None else rule


def _guard_rules() -> dict[object, Rule]:
    """``ExportedProgram.module()`` calls a guard module on the inputs (``_guards_fn``),
    which returns nothing."""
    from torch.export import _unlift

    guards = getattr(_unlift, "GuardsFn", None)
    return {guards: shape_ops.no_axes} if guards is not None else {}


EXPORT_RULES = ExportRules({**ATEN_RULES, **_guard_rules(), **_functorch_rules()})
"""The rules :func:`depgraph.analyze` relates a graph from torch.export with."""


# -- the fallback: lower one fx node to an ATen mini-graph ----------------------


@dataclass(frozen=True)
class _Slot:
    """Where the ``index``-th tensor input goes in an op's arguments."""

    index: int


@dataclass(frozen=True)
class _Call:
    """An fx node's call with its tensors taken out: ``args``/``kwargs`` hold a
    :class:`_Slot` for each tensor, ``tensors`` their metas, ``axes`` their axes."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    tensors: tuple[TensorMeta, ...]
    axes: tuple[tuple[Expr, ...], ...]


_Shapes = list[list[tuple[int, ...]]]
"""For each node of a graph but its output, the shapes of the tensors in its value."""


@dataclass(frozen=True)
class _Lowered:
    """A node's op as an ATen graph annotated with VALUE. Its placeholders are the
    call's tensors, then the called module's ``state`` (parameter and buffer names);
    ``inputs`` are their metas and ``run`` runs the op on tensors in that order.
    ``retraced`` caches, per set of resized inputs, the shapes of the op's trace."""

    gm: fx.GraphModule
    run: Callable[..., Any]
    inputs: tuple[TensorMeta, ...]
    state: tuple[str, ...]
    retraced: dict[tuple[TensorMeta, ...], _Shapes | None] = field(default_factory=dict)


_FUNCTIONS: dict[Hashable, _Lowered | None] = {}
_MODULES: weakref.WeakKeyDictionary[fx.GraphModule, dict[Hashable, _Lowered | None]] = (
    weakref.WeakKeyDictionary()
)


def clear_cache() -> None:
    """Forget every lowered mini-graph (the next use of each op traces it again)."""
    _FUNCTIONS.clear()
    _MODULES.clear()


def lower(cx: Context, node: fx.Node) -> Axes | None:
    """Axes of ``node``'s output found by lowering it to ATen, or None if that fails.

    Lowering fails when ``make_fx`` cannot trace the op on meta tensors or when the
    ATen graph holds an op with no rule in :data:`ATEN_RULES`; nothing is related then.
    Otherwise the parameters and buffers of a called module are registered on ``cx``,
    and the atoms the op's code does not follow are pinned (:func:`_pin_unfollowed`).
    """
    from . import relate  # the package imports this module

    if node.op not in ("call_function", "call_method", "call_module"):
        return None
    call = _call(cx, node)
    lowered = _cached(cx, node, call)
    if lowered is None:
        return None
    inputs: list[Axes] = [*call.axes, *(cx.param(f"{node.target}.{name}") for name in lowered.state)]
    sub = relate(lowered.gm, cx.u, rules=LOWERED_RULES, inputs=inputs)
    assert not sub.unsupported, "a lowered graph has a rule for every op (checked by _lower)"
    _pin_unfollowed(sub, lowered, inputs)
    cx.lowered[node.name] = (lowered.gm, sub.axes)
    return sub.result


def _pin_unfollowed(sub: Context, lowered: _Lowered, inputs: list[Axes]) -> None:
    """Pin each free atom at the op's boundary that the op's code does not follow.

    The mini-graph was traced with numbers for sizes, so a size the op computes from
    an input and a literal in its code look alike to the rules. For each free atom the
    op is traced again with the atom one unit smaller in every input, parameter and
    buffer (one unit larger for a two-unit atom, whose one-unit form would broadcast);
    unless every node of that trace has the shapes the relation predicts, it is pinned
    (a ``view(b, n, 2, -1)`` follows a smaller head_dim but not fewer heads)."""
    u = sub.u
    ins = [tuple(map(u.resolve, axes)) for axes in _tensor_axes(inputs)]
    outs = [tuple(map(u.resolve, axes)) for axes in _tensor_axes(sub.result)]
    boundary = (a for axes in (*ins, *outs) for e in axes for a in atoms_of(e))
    free = dict.fromkeys(a for a in boundary if a.size > 1 and u.pin_reason(a) is None)
    nodes = [[tuple(map(u.resolve, a)) for a in _tensor_axes(sub.axes[n])]
             for n in lowered.gm.graph.nodes if n.op != "output"]
    for atom in free:
        size = atom.size - 1 if atom.size > 2 else atom.size + 1
        metas = tuple(TensorMeta(_resized(axes, atom, size), m.dtype) for axes, m in zip(ins, lowered.inputs))
        if metas not in lowered.retraced:
            lowered.retraced[metas] = _retrace(lowered, metas)
        if lowered.retraced[metas] != [[_resized(axes, atom, size) for axes in node] for node in nodes]:
            u.pin(atom, UNFOLLOWED)


def _retrace(lowered: _Lowered, metas: tuple[TensorMeta, ...]) -> _Shapes | None:
    """Shapes of the trace of ``lowered.run`` on ``metas``, or None if that trace fails
    or is not the same graph (ops in the same order)."""
    gm = _trace(lowered.run, metas)
    if gm is None:
        return None
    ops = [[(n.op, n.target) for n in g.graph.nodes] for g in (gm, lowered.gm)]
    if ops[0] != ops[1]:
        return None
    return [_tensor_shapes(n.meta[VALUE]) for n in gm.graph.nodes if n.op != "output"]


def _tensor_axes(axes: Axes) -> Iterator[tuple[Expr, ...]]:
    """The axes of each tensor in an Axes structure, in order."""
    if isinstance(axes, tuple):
        yield axes
    elif isinstance(axes, (list, dict)):
        for a in axes.values() if isinstance(axes, dict) else axes:
            yield from _tensor_axes(a)


def _tensor_shapes(value: Any) -> list[tuple[int, ...]]:
    """The shape of each tensor in a VALUE structure, in order."""
    if isinstance(value, TensorMeta):
        return [value.shape]
    if isinstance(value, (list, tuple, dict)):
        return [s for v in (value.values() if isinstance(value, dict) else value) for s in _tensor_shapes(v)]
    return []


def _resized(axes: tuple[Expr, ...], atom: Atom, size: int) -> tuple[int, ...]:
    """The sizes of resolved ``axes`` when ``atom`` has ``size`` units."""

    def one(e: Expr) -> int:
        if isinstance(e, Atom):
            return size if e == atom else e.size
        if isinstance(e, Product):
            return math.prod(one(f) for f in e.factors)
        return sum(one(p) for p in e.parts)

    return tuple(one(e) for e in axes)


def _call(cx: Context, node: fx.Node) -> _Call:
    tensors: list[TensorMeta] = []
    axes: list[tuple[Expr, ...]] = []

    def take(value: Any, ax: Axes) -> Any:
        if isinstance(value, TensorMeta):
            tensors.append(value)
            axes.append(ax)  # type: ignore[arg-type]
            return _Slot(len(tensors) - 1)
        if isinstance(value, (list, tuple)):
            parts = ax if isinstance(ax, list) else [None] * len(value)
            return type(value)(take(v, a) for v, a in zip(value, parts))
        if isinstance(value, dict):
            fields = ax if isinstance(ax, dict) else {}
            return {k: take(v, fields.get(k)) for k, v in value.items()}
        return value

    def node_value(a: Any) -> Any:
        return take(cx.value(a), cx.axes.get(a)) if isinstance(a, fx.Node) else a

    args = fx.node.map_aggregate(node.args, node_value)
    kwargs = fx.node.map_aggregate(node.kwargs, node_value)
    return _Call(tuple(args), dict(kwargs), tuple(tensors), tuple(axes))


def _cached(cx: Context, node: fx.Node, call: _Call) -> _Lowered | None:
    """The lowered graph of ``call`` from the cache, tracing it on a miss.

    Functions and methods are cached for the process; modules (whose attributes may
    change between analyses) for the graph module being analyzed."""
    if node.op == "call_module":
        cache = _MODULES.setdefault(cx.gm, {})
        op: Hashable = (node.target, cx.module(node).training)
    else:
        cache, op = _FUNCTIONS, (node.op, node.target)
    try:
        key: Hashable | None = (op, _frozen(call.args), _frozen(call.kwargs), call.tensors)
        hash(key)
    except TypeError:  # an argument that cannot be a key: trace without caching
        key = None
    if key is not None and key in cache:
        return cache[key]
    lowered = _lower(cx, node, call)
    if key is not None:
        cache[key] = lowered
    return lowered


def _frozen(value: Any) -> Hashable:
    """A hashable stand-in for an argument structure; types are kept (``2`` is not ``2.0``)."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _frozen(v)) for k, v in value.items()))
    return (type(value), value)


def _lower(cx: Context, node: fx.Node, call: _Call) -> _Lowered | None:
    """``node``'s op as an ATen graph, or None if it cannot be traced or holds an op with
    no ATen rule."""
    run, state = _as_function(cx, node, call)
    metas = (*call.tensors, *(TensorMeta(tuple(t.shape), t.dtype) for t in state.values()))
    gm = _trace(run, metas)
    if gm is None or any(n.op == "call_function" and n.target not in ATEN_RULES for n in gm.graph.nodes):
        return None
    return _Lowered(gm, run, metas, tuple(state))


def _trace(run: Callable[..., Any], metas: tuple[TensorMeta, ...]) -> fx.GraphModule | None:
    """``run`` traced on meta tensors of ``metas`` into an ATen graph with VALUE on every
    node, or None if make_fx cannot trace it."""
    inputs = [torch.empty(m.shape, dtype=m.dtype, device="meta") for m in metas]
    try:
        with torch.device("meta"):
            gm = make_fx(run, decomposition_table=_decompositions(), pre_dispatch=True)(*inputs)
    except Exception:  # noqa: BLE001 -- any failure to trace means the op cannot be lowered
        return None
    for n in gm.graph.nodes:
        value = n.meta.get("val")
        if value is None and n.op == "get_attr":
            value = getattr(gm, str(n.target))
        n.meta[VALUE] = describe(value)
    return gm


def _as_function(
    cx: Context, node: fx.Node, call: _Call
) -> tuple[Callable[..., Any], dict[str, torch.Tensor]]:
    """The op as a function of the call's tensors (then the module's state), and that state."""
    n = len(call.tensors)

    def fill(tensors: tuple[torch.Tensor, ...]) -> tuple[Any, Any]:
        def put(a: Any) -> Any:
            return tensors[a.index] if isinstance(a, _Slot) else a

        return fx.node.map_aggregate(call.args, put), fx.node.map_aggregate(call.kwargs, put)

    if node.op == "call_module":
        module = cx.module(node)
        state: dict[str, torch.Tensor] = dict(module.named_parameters())
        state.update(module.named_buffers())

        def run_module(*tensors: torch.Tensor) -> Any:
            args, kwargs = fill(tensors[:n])
            return torch.func.functional_call(module, dict(zip(state, tensors[n:])), args, kwargs)

        return run_module, state
    if node.op == "call_method":
        name = str(node.target)

        def run_method(*tensors: torch.Tensor) -> Any:
            args, kwargs = fill(tensors)
            return getattr(args[0], name)(*args[1:], **kwargs)

        return run_method, {}
    target = node.target
    assert callable(target)

    def run_function(*tensors: torch.Tensor) -> Any:
        args, kwargs = fill(tensors)
        return target(*args, **kwargs)

    return run_function, {}


@functools.cache
def _decompositions() -> dict[OpOverload, Callable[..., Any]]:
    """Core ATen decompositions of the ops with no rule here: tracing splits those into
    ops that have one (glu into slices, a sigmoid and a product)."""
    return {op: fn for op, fn in core_aten_decompositions().items() if op not in ATEN_RULES}
