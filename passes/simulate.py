"""Simulate: prune with masks, same shapes, computing exactly what the shrunk model does.

Needs what :mod:`passes.shrink` needs. Does, in place on the GraphModule:

- ``mul`` masks on parameters (``torch.nn.utils.parametrize``), so training sees
  and updates only kept entries;
- ``mul`` masks on activations: after every node whose output has a pruned axis,
  so no op can turn a removed unit non-zero (a bias, a normalization's shift,
  ``sigmoid(0) = 0.5``);
- masked statistics where an op reduces over a pruned axis: layer, group and RMS
  normalization, mean, var and std count only kept entries; softmax, log-softmax
  and max see removed positions as a large negative (the ``add`` apply method),
  min as a large positive;
- a masked divisor gets 1 in removed positions, so ``x / norm`` gives 0 there, not NaN.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from .dims import Atom, Expr
from .errors import InputError
from .meta import VALUE, TensorMeta
from .shrink import Sizes

__all__ = ["simulate_graph", "remove_simulation", "MASK_PREFIX"]

MASK_PREFIX = "_depgraph_mask_"
NEGATIVE = -1e9
"""What the ``add`` apply method puts in removed positions before softmax: exp() of it is 0."""


class Mask(nn.Module):
    """Parametrization multiplying a tensor by a fixed 0/1 mask."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def simulate_graph(
    gm: fx.GraphModule,
    params: dict[str, tuple[Expr, ...]],
    nodes: dict[str, Any],
    removed: dict[Atom, torch.Tensor],
    methods: dict[str, str] | None = None,
) -> None:
    """Insert masks into ``gm`` so it computes what shrinking it would (see module doc).

    ``methods`` maps a target to an apply method: ``"<param>": "bypass"`` leaves that
    parameter unmasked (activations are still masked, so the result stays exact);
    ``"<module>._output_": "add"`` / ``"<module>._input_": "add"`` put a large negative
    instead of zero in removed positions of that module's output / first input (for a
    softmax that follows); ``"mul"`` is the default everywhere.
    """
    methods = methods or {}
    _check_methods(gm, methods)
    sizes = Sizes(removed)
    _mask_parameters(gm, params, sizes, {t for t, m in methods.items() if m == "bypass"})
    counter = iter(range(1 << 30))
    for node in list(gm.graph.nodes):
        if node.op in ("placeholder", "output") or node.meta.get("depgraph_mask"):
            continue
        if node.op != "get_attr":
            _masked_statistics(gm, node, nodes, sizes, counter)
            _safe_divisor(gm, node, nodes, sizes, counter)
        if node.op == "call_module" and methods.get(f"{node.target}._input_") == "add":
            _add_input_mask(gm, node, nodes, sizes, counter)
        axes, value = nodes.get(node.name), node.meta.get(VALUE)
        if isinstance(axes, tuple) and isinstance(value, TensorMeta) and value.dtype.is_floating_point:
            if any(sizes.touches(e) for e in axes):  # integer indices and bool masks carry no values to mask
                add = node.op == "call_module" and methods.get(f"{node.target}._output_") == "add"
                _mask_output(gm, node, _broadcast_mask(axes, sizes), counter, "add" if add else "mul")
    gm.graph.lint()
    gm.recompile()


def _check_methods(gm: fx.GraphModule, methods: dict[str, str]) -> None:
    for target, method in methods.items():
        if method not in ("mul", "add", "bypass"):
            raise InputError(f"apply method for {target!r} must be 'mul', 'add' or 'bypass', got {method!r}")
        if method == "add" and not target.endswith(("._input_", "._output_")):
            raise InputError(f"apply method 'add' is for activations: use it on '<module>._input_' or "
                             f"'<module>._output_', not {target!r}")


def _add_input_mask(gm: fx.GraphModule, node: fx.Node, nodes: dict[str, Any], sizes: Sizes, counter: Any) -> None:
    source = node.args[0]
    while isinstance(source, fx.Node) and source.meta.get("depgraph_mask") == "mul":
        source = source.args[0]
    axes = nodes.get(source.name) if isinstance(source, fx.Node) else None
    if not isinstance(axes, tuple) or not any(sizes.touches(e) for e in axes):
        return
    offset = _constant(gm, node, (_broadcast_mask(axes, sizes) - 1) * -NEGATIVE, counter)
    with gm.graph.inserting_before(node):
        shifted = gm.graph.call_function(operator.add, (node.args[0], offset))
    shifted.meta["depgraph_mask"] = "add"
    node.args = (shifted, *node.args[1:])


def remove_simulation(gm: fx.GraphModule) -> None:
    """Undo :func:`simulate_graph` on a module: parameters get their unmasked values back
    and mask nodes are removed (masked-statistics ops stay)."""
    for module in gm.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    for kind in ("add", "mul"):
        for node in list(gm.graph.nodes):
            if node.meta.get("depgraph_mask") == kind:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):
        if node.meta.get("depgraph_mask") in ("buffer", "constant") and not node.users:
            gm.graph.erase_node(node)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [b for b, _ in gm.named_buffers(recurse=False) if b.startswith(MASK_PREFIX) and b not in used]:
        delattr(gm, name)
    gm.recompile()


def _mask_parameters(
    gm: fx.GraphModule, params: dict[str, tuple[Expr, ...]], sizes: Sizes, bypass: set[str]
) -> None:
    for name, axes in params.items():
        if name in bypass or not any(sizes.touches(e) for e in axes):
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_name)
        if owner is gm or not isinstance(getattr(owner, attr), nn.Parameter):
            # buffers (running statistics) and the graph module's own attributes (a
            # parametrization would replace its class) need none: activations are masked
            continue
        mask = _broadcast_mask(axes, sizes).to(getattr(owner, attr).device)
        parametrize.register_parametrization(owner, attr, Mask(mask), unsafe=True)


def _broadcast_mask(axes: tuple[Expr, ...], sizes: Sizes) -> torch.Tensor:
    mask = torch.ones((1,) * len(axes))
    for dim, expr in enumerate(axes):
        if sizes.touches(expr):
            shape = [1] * len(axes)
            shape[dim] = expr.size
            mask = mask * sizes.mask(expr).float().reshape(shape)
    return mask


def _mask_output(gm: fx.GraphModule, node: fx.Node, mask: torch.Tensor, counter: Any, method: str) -> None:
    """Follow ``node`` with ``x * mask`` (``mul``) or ``x * mask + (mask - 1) * 1e9`` (``add``)."""
    buffer = f"{MASK_PREFIX}{next(counter)}"
    gm.register_buffer(buffer, mask.to(_device(gm)))
    with gm.graph.inserting_after(node):
        get = gm.graph.get_attr(buffer)
        get.meta["depgraph_mask"] = "buffer"
    with gm.graph.inserting_after(get):
        mul = gm.graph.call_function(operator.mul, (node, get))
        mul.meta["depgraph_mask"] = "mul"
    if method == "add":
        offset = _constant(gm, node, (mask - 1) * -NEGATIVE, counter)
        offset.meta["depgraph_mask"] = "buffer"
        with gm.graph.inserting_after(mul):
            shifted = gm.graph.call_function(operator.add, (mul, offset))
        shifted.meta["depgraph_mask"] = "add"
        node.replace_all_uses_with(shifted, delete_user_cb=lambda user: user is not mul)
        return
    node.replace_all_uses_with(mul, delete_user_cb=lambda user: user is not mul)


# -- masked statistics ---------------------------------------------------------------


def masked_layer_norm(x: torch.Tensor, keep: torch.Tensor, weight: Any, bias: Any, eps: float) -> torch.Tensor:
    """Layer norm over the trailing ``keep.ndim`` axes counting only kept entries."""
    dims = tuple(range(-keep.ndim, 0))
    count = keep.sum().clamp(min=1)
    mean = (x * keep).sum(dims, keepdim=True) / count
    var = (((x - mean) * keep) ** 2).sum(dims, keepdim=True) / count
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y * keep


def masked_rms_norm(x: torch.Tensor, keep: torch.Tensor, weight: Any, eps: Any) -> torch.Tensor:
    """RMS norm over the trailing ``keep.ndim`` axes counting only kept entries."""
    dims = tuple(range(-keep.ndim, 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    ms = ((x * keep) ** 2).sum(dims, keepdim=True) / keep.sum().clamp(min=1)
    y = x * torch.rsqrt(ms + eps)
    return (y * weight if weight is not None else y) * keep


def masked_group_norm(
    x: torch.Tensor, keep: torch.Tensor, groups: int, weight: Any, bias: Any, eps: float
) -> torch.Tensor:
    """Group norm whose per-group statistics count only kept channels (``keep``: (C,))."""
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, c // groups, -1)
    kg = keep.reshape(1, groups, c // groups, 1)
    count = (kg.sum(2, keepdim=True) * xg.shape[-1]).clamp(min=1)
    mean = (xg * kg).sum((2, 3), keepdim=True) / count
    var = (((xg - mean) * kg) ** 2).sum((2, 3), keepdim=True) / count
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y * keep.reshape(shape)


def masked_var(
    x: torch.Tensor, keep: torch.Tensor, dims: Any, correction: float, keepdim: bool, std: bool
) -> torch.Tensor:
    """Variance (or std) over ``dims`` counting only entries where ``keep`` (broadcastable) is 1."""
    count = (keep * torch.ones_like(x)).sum(dims, keepdim=True)
    mean = (x * keep).sum(dims, keepdim=True) / count.clamp(min=1)
    var = (((x - mean) * keep) ** 2).sum(dims, keepdim=True) / (count - correction).clamp(min=1)
    var = var if keepdim else var.squeeze(dims)
    return var.sqrt() if std else var


def _masked_statistics(gm: fx.GraphModule, node: fx.Node, nodes: dict[str, Any], sizes: Sizes, counter: Any) -> None:
    if node.op == "call_module":
        key: object = parametrize.type_before_parametrizations(gm.get_submodule(str(node.target)))
    else:
        key = node.target
    handler = STATISTICS.get(key) or STATISTICS.get(getattr(key, "overloadpacket", None))
    if handler is None or not node.args or not isinstance(node.args[0], fx.Node):
        return
    source = node.args[0]
    while source.meta.get("depgraph_mask") == "mul":  # its input was masked already
        source = source.args[0]
    x = nodes.get(source.name)
    if isinstance(x, tuple):
        handler(gm, node, x, sizes, counter)


def _safe_divisor(gm: fx.GraphModule, node: fx.Node, nodes: dict[str, Any], sizes: Sizes, counter: Any) -> None:
    """Add 1 to the removed positions of a division's masked divisor (``x / norm`` in an L2
    normalization): they become ``0 / 1 = 0`` instead of ``0 / 0 = NaN``, which no mask
    after the division could undo and whose gradient would reach kept entries."""
    target = node.target
    if target not in DIVISIONS and getattr(target, "overloadpacket", None) not in DIVISIONS:
        return
    if len(node.args) < 2 or not isinstance(node.args[1], fx.Node) or node.args[1].meta.get("depgraph_mask") != "mul":
        return  # an unmasked divisor has no zeros of ours
    source = node.args[1]
    while source.meta.get("depgraph_mask") == "mul":
        source = source.args[0]
    axes = nodes.get(source.name)
    if not isinstance(axes, tuple) or not any(sizes.touches(e) for e in axes):
        return
    offset = _constant(gm, node, 1 - _broadcast_mask(axes, sizes), counter)
    with gm.graph.inserting_before(node):
        shifted = gm.graph.call_function(operator.add, (node.args[1], offset))
    shifted.meta["depgraph_mask"] = "add"
    node.args = (node.args[0], shifted, *node.args[2:])


def _device(gm: fx.GraphModule) -> torch.device:
    """Where the model's tensors live (masks are made there)."""
    for t in (*gm.parameters(), *gm.buffers()):
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


def _constant(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor, counter: Any) -> fx.Node:
    name = f"{MASK_PREFIX}{next(counter)}"
    gm.register_buffer(name, value.to(_device(gm)))
    with gm.graph.inserting_before(node):
        get = gm.graph.get_attr(name)
    get.meta["depgraph_mask"] = "constant"
    return get


def _attr(gm: fx.GraphModule, node: fx.Node, attr: str) -> fx.Node | None:
    if getattr(gm.get_submodule(str(node.target)), attr, None) is None:
        return None
    with gm.graph.inserting_before(node), warnings.catch_warnings():
        # a parametrized attribute is a property, which fx's get_attr check does not see
        warnings.filterwarnings("ignore", "Attempted to insert a get_attr Node")
        return gm.graph.get_attr(f"{node.target}.{attr}")


def _trailing_keep(x: tuple[Expr, ...], k: int, sizes: Sizes) -> torch.Tensor | None:
    trailing = x[len(x) - k :]
    if not any(sizes.touches(e) for e in trailing):
        return None
    return _broadcast_mask(trailing, sizes)


def _layer_norm_module(gm: fx.GraphModule, node: fx.Node, x: tuple[Expr, ...], sizes: Sizes, counter: Any) -> None:
    m = gm.get_submodule(str(node.target))
    keep = _trailing_keep(x, len(m.normalized_shape), sizes)
    if keep is None:
        return
    keep_node = _constant(gm, node, keep, counter)
    weight = _attr(gm, node, "weight")
    if parametrize.type_before_parametrizations(m) is nn.RMSNorm:
        _replace(node, masked_rms_norm, (node.args[0], keep_node, weight, m.eps))
    else:
        _replace(node, masked_layer_norm, (node.args[0], keep_node, weight, _attr(gm, node, "bias"), m.eps))


def _layer_norm_function(gm: fx.GraphModule, node: fx.Node, x: tuple[Expr, ...], sizes: Sizes, counter: Any) -> None:
    args = _bind(F.layer_norm, node)
    shape = args["normalized_shape"]
    keep = _trailing_keep(x, 1 if isinstance(shape, int) else len(shape), sizes)
    if keep is not None:
        keep_node = _constant(gm, node, keep, counter)
        weight, bias, eps = args.get("weight"), args.get("bias"), args.get("eps", 1e-5)
        _replace(node, masked_layer_norm, (args["input"], keep_node, weight, bias, eps))


def _group_norm_module(gm: fx.GraphModule, node: fx.Node, x: tuple[Expr, ...], sizes: Sizes, counter: Any) -> None:
    m = gm.get_submodule(str(node.target))
    if sizes.touches(x[1]):
        keep_node = _constant(gm, node, sizes.mask(x[1]).float(), counter)
        args = (node.args[0], keep_node, m.num_groups, _attr(gm, node, "weight"), _attr(gm, node, "bias"), m.eps)
        _replace(node, masked_group_norm, args)


def _group_norm_function(gm: fx.GraphModule, node: fx.Node, x: tuple[Expr, ...], sizes: Sizes, counter: Any) -> None:
    args = _bind(F.group_norm, node)
    if sizes.touches(x[1]):
        keep_node = _constant(gm, node, sizes.mask(x[1]).float(), counter)
        _replace(node, masked_group_norm, (args["input"], keep_node, args["num_groups"], args.get("weight"),
                                           args.get("bias"), args.get("eps", 1e-5)))


def _reduced_dims(node: fx.Node, x: tuple[Expr, ...]) -> tuple[int, ...] | None:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dim is None:
        return tuple(range(len(x)))
    if isinstance(dim, fx.Node):
        return None
    return tuple(d % len(x) for d in ([dim] if isinstance(dim, int) else dim))


def _mean(gm: fx.GraphModule, node: fx.Node, x: tuple[Expr, ...], sizes: Sizes, counter: Any) -> None:
    dims = _reduced_dims(node, x)
    if dims is None or not any(sizes.touches(x[d]) for d in dims):
        return
    total = 1.0
    kept = 1.0
    for d in dims:
        total *= x[d].size
        kept *= max(sizes.size(x[d]), 1)
    with gm.graph.inserting_after(node):
        scaled = gm.graph.call_function(operator.mul, (node, total / kept))
    node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)


def _var(gm: fx.GraphModule, node: fx.Node, x: tuple[Expr, ...], sizes: Sizes, counter: Any) -> None:
    dims = _reduced_dims(node, x)
    if dims is None or not any(sizes.touches(x[d]) for d in dims):
        return
    name = node.target if isinstance(node.target, str) else node.target.__name__
    keep_node = _constant(gm, node, _broadcast_mask(x, sizes), counter)
    # var(x, dim, unbiased, keepdim) positionally; correction= / unbiased= / keepdim= by keyword
    unbiased = node.args[2] if len(node.args) > 2 else node.kwargs.get("unbiased", True)
    correction = node.kwargs.get("correction", int(unbiased))
    keepdim = node.args[3] if len(node.args) > 3 else node.kwargs.get("keepdim", False)
    _replace(node, masked_var, (node.args[0], keep_node, dims, correction, keepdim, name == "std"))


def _fill(value: float) -> Callable[..., None]:
    def fill(gm: fx.GraphModule, node: fx.Node, x: tuple[Expr, ...], sizes: Sizes, counter: Any) -> None:
        dims = _reduced_dims(node, x)
        if dims is None or not any(sizes.touches(x[d]) for d in dims):
            return
        keep_node = _constant(gm, node, _broadcast_mask(x, sizes) > 0, counter)
        with gm.graph.inserting_before(node):
            filled = gm.graph.call_function(torch.where, (keep_node, node.args[0], value))
        node.args = (filled, *node.args[1:])
    return fill


def _bind(fn: Callable[..., Any], node: fx.Node) -> dict[str, Any]:
    import inspect

    if isinstance(node.target, torch._ops.OpOverload):  # an ATen op: its schema's names
        return _schema_args(node)
    return dict(inspect.signature(fn).bind(*node.args, **node.kwargs).arguments)


def _replace(node: fx.Node, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    node.op, node.target, node.args, node.kwargs = "call_function", fn, args, {}


def _schema_args(node: fx.Node) -> dict[str, Any]:
    """Arguments of an ATen op node by their schema names, defaults filled in."""
    found: dict[str, Any] = {}
    for i, a in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if i < len(node.args) and not a.kwarg_only:
            found[a.name] = node.args[i]
        elif a.name in node.kwargs:
            found[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            found[a.name] = a.default_value
    return found


def _var_aten(gm: fx.GraphModule, node: fx.Node, x: tuple[Expr, ...], sizes: Sizes, counter: Any) -> None:
    """aten.var/std, any overload (``unbiased`` or ``correction``): as :func:`_var`."""
    args = _schema_args(node)
    dim = args.get("dim")
    dims = tuple(range(len(x))) if not dim else tuple(d % len(x) for d in ([dim] if isinstance(dim, int) else dim))
    if not any(sizes.touches(x[d]) for d in dims):
        return
    correction = args.get("correction")
    correction = int(args.get("unbiased", True)) if correction is None else correction
    keep_node = _constant(gm, node, _broadcast_mask(x, sizes), counter)
    std = node.target.overloadpacket is torch.ops.aten.std  # type: ignore[union-attr]
    _replace(node, masked_var, (args["self"], keep_node, dims, correction, args.get("keepdim", False), std))


_ATEN = torch.ops.aten

STATISTICS: dict[object, Callable[..., None]] = {
    nn.LayerNorm: _layer_norm_module, nn.RMSNorm: _layer_norm_module, nn.GroupNorm: _group_norm_module,
    F.layer_norm: _layer_norm_function, F.group_norm: _group_norm_function,
    **dict.fromkeys(("mean", torch.mean), _mean),
    **dict.fromkeys(("var", "std", torch.var, torch.std), _var),
    **dict.fromkeys((F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax",
                     "amax", torch.amax, "max", torch.max, "logsumexp", torch.logsumexp), _fill(NEGATIVE)),
    **dict.fromkeys(("amin", torch.amin, "min", torch.min), _fill(-NEGATIVE)),
    # ATen op packets (graphs from torch.export); an overload is looked up by its packet
    _ATEN.layer_norm: _layer_norm_function, _ATEN.group_norm: _group_norm_function, _ATEN.mean: _mean,
    **dict.fromkeys((_ATEN.var, _ATEN.std), _var_aten),
    **dict.fromkeys((_ATEN.softmax, _ATEN._softmax, _ATEN._safe_softmax, _ATEN.log_softmax, _ATEN._log_softmax,
                     _ATEN.amax, _ATEN.max, _ATEN.logsumexp), _fill(NEGATIVE)),
    **dict.fromkeys((_ATEN.amin, _ATEN.min), _fill(-NEGATIVE)),
}
"""Ops that reduce over an axis, and how simulation makes them count only kept entries."""

DIVISIONS = {operator.truediv, torch.div, torch.true_divide, "div", "div_", "true_divide", _ATEN.div, _ATEN.div_}
"""Divisions whose masked divisor :func:`_safe_divisor` makes non-zero in removed positions."""
