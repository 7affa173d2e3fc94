"""Simulate: prune with masks, same shapes, computing exactly what the shrunk model does.

Needs what :mod:`passes.shrink` needs. Does, in place on the GraphModule:

- ``mul`` masks on parameters (``torch.nn.utils.parametrize``), so training sees
  and updates only kept entries;
- ``mul`` masks on activations: after every node whose output has a pruned axis,
  so no op can turn a removed unit non-zero (a bias, a normalization's shift,
  ``sigmoid(0) = 0.5``, ``x >= 0``); masks follow the runtime shape (:mod:`passes.masks`),
  so the simulated model runs at other batch sizes too;
- masked statistics where an op reduces over a pruned axis: layer, group and RMS
  normalization, mean, var and std count only kept entries; softmax, log-softmax,
  max, logsumexp, prod, all and nanmean see removed positions as the value that leaves
  them out (a large negative, a large positive, one, true, NaN); attention's softmax
  over pruned keys leaves those keys out;
- a masked divisor gets 1 in removed positions, so ``x / norm`` gives 0 there, not NaN;
- sizes computed at run time from a pruned axis (``q.shape[-1] ** -0.5``) take the value
  they have in the pruned model where they enter arithmetic (:mod:`passes.scalars`).
"""

from __future__ import annotations

import inspect
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from .dims import Atom, Expr, Sizes
from .errors import InputError, PlanError
from .masks import AxisMask, InputSizes, spec_of, static_atoms
from .meta import VALUE, TensorMeta
from .rules import RULES, aten, pointwise, shape_ops
from .rules.aten import EXPORT_RULES
from .scalars import pruned_scalars

__all__ = ["simulate_graph", "remove_simulation", "MASK_PREFIX"]

MASK_PREFIX = "_depgraph_mask_"
NEGATIVE = -1e9
"""What the ``add`` apply method puts in removed positions before softmax: exp() of it is 0."""
MARK = "depgraph_mask"
"""``node.meta`` key of the nodes simulation inserts: ``mul`` and ``add`` (a masked value,
its source is ``args[0]``), ``constant`` (a mask)."""


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
    run = _Pass(gm, nodes, sizes, iter(range(1 << 30)), static_atoms(gm, params, nodes), _input_sizes(gm, nodes))
    unknown = pruned_scalars(gm, nodes, sizes, VALUE_OPS)
    if unknown:
        raise PlanError(f"simulate cannot tell the value that {unknown[0]} computes from a pruned size in the pruned "
                        "model; prune the model instead, or keep that axis whole")
    for node in list(gm.graph.nodes):
        if node.op in ("placeholder", "output") or node.meta.get(MARK):
            continue
        if node.op != "get_attr":
            _masked_statistics(run, node)
            _safe_divisor(run, node)
        if node.op == "call_module" and methods.get(f"{node.target}._input_") == "add":
            _add_input_mask(run, node)
        axes, value = nodes.get(node.name), node.meta.get(VALUE)
        add = node.op == "call_module" and methods.get(f"{node.target}._output_") == "add"
        masked = isinstance(axes, tuple) and isinstance(value, TensorMeta) and run.touches(axes)
        if masked and (add or not _moves(node)):
            _mask_output(run, node, "add" if add else "mul")
    if not run.bound.users:
        gm.graph.erase_node(run.bound)
        delattr(gm, str(run.bound.target))
    gm.graph.lint()
    gm.recompile()


@dataclass
class _Pass:
    """What the insertions of one simulation share."""

    gm: fx.GraphModule
    nodes: dict[str, Any]
    sizes: Sizes
    counter: Iterator[int]
    static: frozenset[Atom]
    bound: fx.Node
    """The node giving the runtime sizes of the inputs' axes (:class:`InputSizes`)."""

    def touches(self, axes: tuple[Expr, ...]) -> bool:
        return any(self.sizes.touches(e) for e in axes)

    def axes(self, source: Any) -> tuple[Expr, ...] | None:
        """The axes of ``source``'s value, looking through the masks simulation inserted."""
        while isinstance(source, fx.Node) and source.meta.get(MARK) in ("mul", "add"):
            source = source.args[0]
        axes = self.nodes.get(source.name) if isinstance(source, fx.Node) else None
        return axes if isinstance(axes, tuple) else None

    def mask(self, value: fx.Node, axes: tuple[Expr, ...], before: fx.Node) -> fx.Node:
        """A node, inserted before ``before``, giving the mask of ``value`` (axes ``axes``)."""
        return self.axis_mask([self.spec(e) if self.sizes.touches(e) else None for e in axes], value, before)

    def axis_mask(self, specs: list[Any], value: Any, before: fx.Node) -> fx.Node:
        """A node, inserted before ``before``, giving the mask of ``value`` for these specs."""
        name = f"{MASK_PREFIX}{next(self.counter)}"
        self.gm.add_submodule(name, AxisMask(specs))
        with self.gm.graph.inserting_before(before):
            node = self.gm.graph.call_module(name, (value, self.bound))
        node.meta[MARK] = "constant"
        return node

    def spec(self, expr: Expr) -> Any:
        return spec_of(expr, self.sizes, self.static)

    def constant(self, value: torch.Tensor, before: fx.Node) -> fx.Node:
        name = f"{MASK_PREFIX}{next(self.counter)}"
        self.gm.register_buffer(name, value.to(_device(self.gm)))
        with self.gm.graph.inserting_before(before):
            get = self.gm.graph.get_attr(name)
        get.meta[MARK] = "constant"
        return get


def _input_sizes(gm: fx.GraphModule, nodes: dict[str, Any]) -> fx.Node:
    """A node, after the graph's inputs, giving the runtime size of each input axis that is
    one atom (a product mask over a batch and a sequence needs both)."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    for node in inputs:  # exported graphs read parameters before their inputs: inputs go first
        first.prepend(node)
    axes = [
        (i, d, e.id) for i, n in enumerate(inputs) if isinstance(nodes.get(n.name), tuple)
        for d, e in enumerate(nodes[n.name]) if isinstance(e, Atom)
    ]
    name = f"{MASK_PREFIX}inputs"
    gm.add_submodule(name, InputSizes(axes))
    where = gm.graph.inserting_after(inputs[-1]) if inputs else gm.graph.inserting_before(next(iter(gm.graph.nodes)))
    with where:
        node = gm.graph.call_module(name, tuple(inputs))
    node.meta[MARK] = "constant"
    return node


def _moves(node: fx.Node) -> bool:
    """Whether ``node`` only moves, copies or converts the values of its (masked) inputs
    (a reshape, a concatenation, a slice, ``contiguous``): its output needs no mask of its
    own, and leaving it out spares masks on axes that fold a batch into heads."""
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target is operator.getitem:
        source = node.args[0]
        if isinstance(source, fx.Node) and isinstance(source.meta.get(VALUE), TensorMeta):
            return True  # indexing a tensor
        return isinstance(source, fx.Node) and _moves(source)  # a piece of a split
    return (RULES.get(node.target) or EXPORT_RULES.get(node.target)) in MOVES


def _check_methods(gm: fx.GraphModule, methods: dict[str, str]) -> None:
    for target, method in methods.items():
        if method not in ("mul", "add", "bypass"):
            raise InputError(f"apply method for {target!r} must be 'mul', 'add' or 'bypass', got {method!r}")
        if method == "add" and not target.endswith(("._input_", "._output_")):
            raise InputError(f"apply method 'add' is for activations: use it on '<module>._input_' or "
                             f"'<module>._output_', not {target!r}")


def masked_add(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x`` with a large negative in removed positions (for a softmax that follows)."""
    return x * keep + (keep - 1) * -NEGATIVE


def _add_input_mask(run: _Pass, node: fx.Node) -> None:
    axes = run.axes(node.args[0])
    if axes is None or not run.touches(axes):
        return
    keep = run.mask(node.args[0], axes, node)
    with run.gm.graph.inserting_before(node):
        shifted = run.gm.graph.call_function(masked_add, (node.args[0], keep))
    shifted.meta[MARK] = "add"
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
            if node.meta.get(MARK) == kind:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
    for node in reversed(list(gm.graph.nodes)):
        if node.meta.get(MARK) == "constant" and not node.users:
            gm.graph.erase_node(node)
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for name in [b for b, _ in gm.named_buffers(recurse=False) if b.startswith(MASK_PREFIX) and b not in used]:
        delattr(gm, name)
    for name in [m for m, _ in gm.named_children() if m.startswith(MASK_PREFIX) and m not in used]:
        delattr(gm, name)
    gm.recompile()


def _mask_parameters(
    gm: fx.GraphModule, params: dict[str, tuple[Expr, ...]], sizes: Sizes, bypass: set[str]
) -> None:
    for name, axes in params.items():
        if name in bypass or not any(sizes.touches(e) for e in axes):
            continue
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = gm.get_submodule(owner_name)
        except AttributeError:
            continue  # a module only the other train/eval mode runs: this graph does not hold it
        if owner is gm or not isinstance(getattr(owner, attr), nn.Parameter):
            # buffers (running statistics) and the graph module's own attributes (a
            # parametrization would replace its class) need none: activations are masked
            continue
        mask = _broadcast_mask(axes, sizes).to(getattr(owner, attr).device)
        parametrize.register_parametrization(owner, attr, Mask(mask), unsafe=True)


def _broadcast_mask(axes: tuple[Expr, ...], sizes: Sizes) -> torch.Tensor:
    """The float mask of a tensor with these (static) axes, size 1 where nothing is removed."""
    mask = torch.ones((1,) * len(axes))
    for dim, expr in enumerate(axes):
        if sizes.touches(expr):
            shape = [1] * len(axes)
            shape[dim] = expr.size
            mask = mask * sizes.mask(expr).float().reshape(shape)
    return mask


def _mask_output(run: _Pass, node: fx.Node, method: str) -> None:
    """Follow ``node`` with ``x * mask`` (``mul``) or :func:`masked_add` (``add``)."""
    graph = run.gm.graph
    users = list(node.users)
    after = node.next
    keep = run.mask(node, run.nodes[node.name], after)
    with graph.inserting_after(keep):
        masked = graph.call_function(operator.mul if method == "mul" else masked_add, (node, keep))
    masked.meta[MARK] = method
    for user in users:
        user.replace_input_with(node, masked)


# -- masked statistics ---------------------------------------------------------------


def masked_layer_norm(x: torch.Tensor, keep: torch.Tensor, weight: Any, bias: Any, eps: float) -> torch.Tensor:
    """Layer norm over the trailing ``keep.ndim`` axes counting only kept entries."""
    dims = tuple(range(-keep.ndim, 0))
    count = torch.broadcast_to(keep, x.shape[x.ndim - keep.ndim :]).sum().clamp(min=1)
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
    count = torch.broadcast_to(keep, x.shape[x.ndim - keep.ndim :]).sum().clamp(min=1)
    ms = ((x * keep) ** 2).sum(dims, keepdim=True) / count
    y = x * torch.rsqrt(ms + eps)
    return (y * weight if weight is not None else y) * keep


def masked_batch_norm(
    x: torch.Tensor, keep: torch.Tensor, running_mean: Any, running_var: Any, weight: Any, bias: Any,
    training: bool, momentum: float, eps: float,
) -> torch.Tensor:
    """F.batch_norm whose batch statistics (training mode) count only kept entries of the
    axes they are taken over; running statistics are updated as F.batch_norm does."""
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
    dims = [d for d in range(x.ndim) if d != 1]
    count = (keep * torch.ones_like(x)).sum(dims, keepdim=True).clamp(min=1)
    mean = (x * keep).sum(dims, keepdim=True) / count
    var = (((x - mean) * keep) ** 2).sum(dims, keepdim=True) / count
    shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(momentum * mean.flatten())
        if running_var is not None:
            unbiased = var * count / (count - 1).clamp(min=1)
            running_var.mul_(1 - momentum).add_(momentum * unbiased.flatten())
    return y


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
    # as torch: max(0, count - correction) degrees of freedom (one kept entry: 0 / 0 = nan)
    var = (((x - mean) * keep) ** 2).sum(dims, keepdim=True) / (count - correction).clamp(min=0)
    var = var if keepdim else var.squeeze(dims)
    return var.sqrt() if std else var


def masked_var_mean(
    x: torch.Tensor, keep: torch.Tensor, dims: Any, correction: float, keepdim: bool, std: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(var or std, mean)`` over ``dims`` counting only kept entries (torch.var_mean/std_mean)."""
    count = (keep * torch.ones_like(x)).sum(dims, keepdim=True).clamp(min=1)
    mean = (x * keep).sum(dims, keepdim=True) / count
    return masked_var(x, keep, dims, correction, keepdim, std), mean if keepdim else mean.squeeze(dims)


def masked_mean(x: torch.Tensor, keep: torch.Tensor, dims: Any, keepdim: bool, dtype: Any = None) -> torch.Tensor:
    """Mean over ``dims`` counting only kept entries (removed entries of ``x`` are zero)."""
    count = (keep * torch.ones_like(x)).sum(dims, keepdim=keepdim).clamp(min=1)
    total = x.sum(dims, keepdim=keepdim, dtype=dtype)
    return total / count.to(total.dtype)


def fill_removed(x: torch.Tensor, keep: torch.Tensor, value: str) -> torch.Tensor:
    """``x`` with removed positions set to ``value``: "low"/"high" (a large negative or
    positive, of ``x``'s dtype), "one", "true" or "nan"."""
    if value in ("low", "high"):
        if x.dtype.is_floating_point:
            fill: Any = NEGATIVE if value == "low" else -NEGATIVE
        elif x.dtype == torch.bool:
            fill = value == "high"
        else:
            info = torch.iinfo(x.dtype)
            fill = info.min if value == "low" else info.max
    else:
        fill = {"one": 1, "true": True, "nan": float("nan")}[value]
    return torch.where(keep > 0, x, torch.tensor(fill, dtype=x.dtype, device=x.device))


def _masked_statistics(run: _Pass, node: fx.Node) -> None:
    if node.op == "call_module":
        key: object = parametrize.type_before_parametrizations(run.gm.get_submodule(str(node.target)))
    else:
        key = node.target
    handler = STATISTICS.get(key) or STATISTICS.get(getattr(key, "overloadpacket", None))
    if handler is None or not node.args or not isinstance(node.args[0], fx.Node):
        return
    x = run.axes(node.args[0])
    if x is not None:
        handler(run, node, x)


def safe_divisor(divisor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``divisor`` with 1 in removed positions."""
    return divisor + (1 - keep)


def _safe_divisor(run: _Pass, node: fx.Node) -> None:
    """Add 1 to the removed positions of a division's masked divisor (``x / norm`` in an L2
    normalization): they become ``0 / 1 = 0`` instead of ``0 / 0 = NaN``, which no mask
    after the division could undo and whose gradient would reach kept entries."""
    target = node.target
    if target not in DIVISIONS and getattr(target, "overloadpacket", None) not in DIVISIONS:
        return
    if len(node.args) < 2 or not isinstance(node.args[1], fx.Node) or node.args[1].meta.get(MARK) != "mul":
        return  # an unmasked divisor has no zeros of ours
    axes = run.axes(node.args[1])
    if axes is None or not run.touches(axes):
        return
    keep = run.mask(node.args[1], axes, node)
    with run.gm.graph.inserting_before(node):
        shifted = run.gm.graph.call_function(safe_divisor, (node.args[1], keep))
    shifted.meta[MARK] = "add"
    node.args = (node.args[0], shifted, *node.args[2:])


def _device(gm: fx.GraphModule) -> torch.device:
    """Where the model's tensors live (masks are made there)."""
    for t in (*gm.parameters(), *gm.buffers()):
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


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


def _layer_norm_module(run: _Pass, node: fx.Node, x: tuple[Expr, ...]) -> None:
    m = run.gm.get_submodule(str(node.target))
    keep = _trailing_keep(x, len(m.normalized_shape), run.sizes)
    if keep is None:
        return
    keep_node = run.constant(keep, node)
    weight = _attr(run.gm, node, "weight")
    if parametrize.type_before_parametrizations(m) is nn.RMSNorm:
        _replace(node, masked_rms_norm, (node.args[0], keep_node, weight, m.eps))
    else:
        _replace(node, masked_layer_norm, (node.args[0], keep_node, weight, _attr(run.gm, node, "bias"), m.eps))


def _normalized_rank(shape: Any) -> int:
    """How many trailing axes a ``normalized_shape`` argument (ints, or a node computing them) covers."""
    if isinstance(shape, fx.Node):
        shape = shape.meta.get(VALUE)
    return 1 if isinstance(shape, int) else len(shape)


def _layer_norm_function(run: _Pass, node: fx.Node, x: tuple[Expr, ...]) -> None:
    args = _bind(F.layer_norm, node)
    keep = _trailing_keep(x, _normalized_rank(args["normalized_shape"]), run.sizes)
    if keep is not None:
        weight, bias, eps = args.get("weight"), args.get("bias"), args.get("eps", 1e-5)
        _replace(node, masked_layer_norm, (args["input"], run.constant(keep, node), weight, bias, eps))


def _rms_norm_function(run: _Pass, node: fx.Node, x: tuple[Expr, ...]) -> None:
    args = _bind(F.rms_norm, node)
    keep = _trailing_keep(x, _normalized_rank(args["normalized_shape"]), run.sizes)
    if keep is not None:
        _replace(node, masked_rms_norm, (args["input"], run.constant(keep, node), args.get("weight"), args.get("eps")))


def _group_norm_module(run: _Pass, node: fx.Node, x: tuple[Expr, ...]) -> None:
    m = run.gm.get_submodule(str(node.target))
    if run.sizes.touches(x[1]):
        keep_node = run.constant(run.sizes.mask(x[1]).float(), node)
        weight, bias = _attr(run.gm, node, "weight"), _attr(run.gm, node, "bias")
        args = (node.args[0], keep_node, m.num_groups, weight, bias, m.eps)
        _replace(node, masked_group_norm, args)


def _group_norm_function(run: _Pass, node: fx.Node, x: tuple[Expr, ...]) -> None:
    args = _bind(F.group_norm, node)
    if run.sizes.touches(x[1]):
        keep_node = run.constant(run.sizes.mask(x[1]).float(), node)
        _replace(node, masked_group_norm, (args["input"], keep_node, args["num_groups"], args.get("weight"),
                                           args.get("bias"), args.get("eps", 1e-5)))


def _batch_norm_function(run: _Pass, node: fx.Node, x: tuple[Expr, ...]) -> None:
    """F.batch_norm (torch-level or ATen) in training mode over pruned axes: masked batch statistics."""
    args = _bind(F.batch_norm, node)
    over = [e for i, e in enumerate(x) if i != 1]
    if args.get("training", False) is not True or len(x) < 2 or not any(map(run.sizes.touches, over)):
        return
    source = args["input"]
    _replace(node, masked_batch_norm, (source, run.mask(source, x, node), args.get("running_mean"),
                                       args.get("running_var"), args.get("weight"), args.get("bias"), True,
                                       args.get("momentum", 0.1), args.get("eps", 1e-5)))


def _reduced_dims(node: fx.Node, x: tuple[Expr, ...]) -> tuple[int, ...] | None:
    """The dims a reduction reduces (every dim when none is given), or None when computed."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis"))
    if isinstance(node.target, torch._ops.OpOverload):
        dim = _schema_args(node).get("dim")
    if dim is None or dim == [] or dim == ():
        return tuple(range(len(x)))
    if isinstance(dim, fx.Node) or isinstance(dim, bool):
        return None if isinstance(dim, fx.Node) else tuple(range(len(x)))
    return tuple(d % len(x) for d in ([dim] if isinstance(dim, int) else dim))


def _touched_dims(run: _Pass, node: fx.Node, x: tuple[Expr, ...]) -> tuple[int, ...] | None:
    dims = _reduced_dims(node, x)
    if dims is None or not any(run.sizes.touches(x[d]) for d in dims):
        return None
    return dims


def _mean(run: _Pass, node: fx.Node, x: tuple[Expr, ...]) -> None:
    dims = _touched_dims(run, node, x)
    if dims is None:
        return
    if isinstance(node.target, torch._ops.OpOverload):
        args = _schema_args(node)
        keepdim, dtype = args.get("keepdim", False), args.get("dtype")
    else:
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        dtype = node.kwargs.get("dtype")
    source = node.args[0]
    _replace(node, masked_mean, (source, run.mask(source, x, node), dims, keepdim, dtype))


def _var(run: _Pass, node: fx.Node, x: tuple[Expr, ...]) -> None:
    """var/std/var_mean/std_mean, torch-level or ATen (``unbiased`` or ``correction``)."""
    dims = _touched_dims(run, node, x)
    if dims is None:
        return
    if isinstance(node.target, torch._ops.OpOverload):
        args = _schema_args(node)
        name = node.target.overloadpacket.__name__
        correction = args.get("correction")
        correction = int(args.get("unbiased", True)) if correction is None else correction
        keepdim = args.get("keepdim", False)
    else:
        name = node.target if isinstance(node.target, str) else node.target.__name__
        # var(x, dim, unbiased, keepdim) positionally; correction= / unbiased= / keepdim= by keyword
        unbiased = node.args[2] if len(node.args) > 2 else node.kwargs.get("unbiased", True)
        correction = node.kwargs.get("correction", int(unbiased))
        keepdim = node.args[3] if len(node.args) > 3 else node.kwargs.get("keepdim", False)
    source = node.args[0]
    fn = masked_var_mean if name.endswith("_mean") else masked_var
    _replace(node, fn, (source, run.mask(source, x, node), dims, correction, keepdim, name.startswith("std")))


def _fill(value: str) -> Callable[..., None]:
    def fill(run: _Pass, node: fx.Node, x: tuple[Expr, ...]) -> None:
        if _touched_dims(run, node, x) is None:
            return
        source = node.args[0]
        keep = run.mask(source, x, node)
        with run.gm.graph.inserting_before(node):
            filled = run.gm.graph.call_function(fill_removed, (source, keep, value))
        filled.meta[MARK] = "add"  # removable: unsimulate reads ``source`` again
        node.args = (filled, *node.args[1:])
    return fill


def masked_softmax2d(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """nn.Softmax2d (a softmax over channels) with removed channels left out."""
    return torch.softmax(fill_removed(x, keep, "low"), -3)


def _softmax2d(run: _Pass, node: fx.Node, x: tuple[Expr, ...]) -> None:
    if run.sizes.touches(x[-3]):
        _replace(node, masked_softmax2d, (node.args[0], run.mask(node.args[0], x, node)))


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, attn_mask: Any = None,
                     *args: Any, **kwargs: Any) -> torch.Tensor:
    """F.scaled_dot_product_attention with the keys where ``keys`` (broadcastable to k) is 0
    left out of the softmax."""
    kept = keys.reshape(*keys.shape[:-2], 1, keys.shape[-2]) > 0  # (..., 1, S)
    if attn_mask is None:
        attn_mask = kept
    elif attn_mask.dtype == torch.bool:
        attn_mask = attn_mask & kept
    else:
        attn_mask = attn_mask.masked_fill(~kept, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask, *args, **kwargs)


def _attention(run: _Pass, node: fx.Node, x: tuple[Expr, ...]) -> None:
    """Scaled dot-product attention over pruned keys: the removed keys are masked out."""
    key = node.args[1] if len(node.args) > 1 else node.kwargs.get("key")
    k = run.axes(key)
    if k is None or not run.sizes.touches(k[-2]):
        return
    specs: list[Any] = [None] * len(k)
    specs[-2] = run.spec(k[-2])
    keep = run.axis_mask(specs, key, node)
    args = _bind(_sdpa_signature, node)
    rest = {n: v for n, v in args.items() if n not in ("query", "key", "value", "attn_mask")}
    node.target, node.op = masked_attention, "call_function"
    node.args = (args["query"], args["key"], args["value"], keep, args.get("attn_mask"))
    node.kwargs = rest


def masked_multihead_attention(module: nn.Module, query: Any, key: Any, value: Any, keys: torch.Tensor,
                               key_padding_mask: Any = None, need_weights: bool = True, attn_mask: Any = None,
                               average_attn_weights: bool = True, is_causal: bool = False) -> Any:
    """nn.MultiheadAttention with the keys where ``keys`` (the key's mask) is 0 left out,
    through its ``key_padding_mask``."""
    seq = 0 if key.dim() == 2 or not module.batch_first else 1
    removed = keys.reshape(-1) == 0 if keys.dim() <= 1 else keys.movedim(seq, -1).reshape(-1) == 0  # (S,)
    if key.dim() == 3:
        removed = removed.expand(key.shape[1 - seq], -1)
    if key_padding_mask is None:
        key_padding_mask = removed if not (attn_mask is not None and attn_mask.is_floating_point()) else \
            torch.zeros(removed.shape, dtype=attn_mask.dtype, device=key.device).masked_fill(removed, float("-inf"))
    elif key_padding_mask.dtype == torch.bool:
        key_padding_mask = key_padding_mask | removed
    else:
        key_padding_mask = key_padding_mask.masked_fill(removed, float("-inf"))
    return module(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                  attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)


def _mha_signature(query: Any, key: Any, value: Any, key_padding_mask: Any = None, need_weights: bool = True,
                   attn_mask: Any = None, average_attn_weights: bool = True, is_causal: bool = False) -> None:
    """The signature of nn.MultiheadAttention.forward."""


def _multihead_attention(run: _Pass, node: fx.Node, x: tuple[Expr, ...]) -> None:
    """nn.MultiheadAttention over pruned keys: the removed keys are masked out."""
    args = _bind(_mha_signature, node)
    k = run.axes(args["key"])
    module = run.gm.get_submodule(str(node.target))
    seq = 0 if k is None or len(k) == 2 or not module.batch_first else 1
    if k is None or not run.sizes.touches(k[seq]):
        return
    specs: list[Any] = [None] * len(k)
    specs[seq] = run.spec(k[seq])
    keep = run.axis_mask(specs, args["key"], node)
    with run.gm.graph.inserting_before(node):
        attention = run.gm.graph.get_attr(str(node.target))
    rest = {n: v for n, v in args.items() if n not in ("query", "key", "value")}
    node.op, node.target = "call_function", masked_multihead_attention
    node.args = (attention, args["query"], args["key"], args["value"], keep)
    node.kwargs = rest


def _sdpa_signature(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
                    is_causal: bool = False, scale: Any = None, enable_gqa: bool = False) -> None:
    """The signature of F.scaled_dot_product_attention (a builtin, which inspect cannot read)."""


def _bind(fn: Callable[..., Any], node: fx.Node) -> dict[str, Any]:
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


_ATEN = torch.ops.aten

STATISTICS: dict[object, Callable[..., None]] = {
    nn.LayerNorm: _layer_norm_module, nn.RMSNorm: _layer_norm_module, nn.GroupNorm: _group_norm_module,
    F.layer_norm: _layer_norm_function, F.group_norm: _group_norm_function, F.rms_norm: _rms_norm_function,
    F.batch_norm: _batch_norm_function, torch.batch_norm: _batch_norm_function,
    torch.layer_norm: _layer_norm_function, torch.group_norm: _group_norm_function,
    nn.Softmax2d: _softmax2d, nn.MultiheadAttention: _multihead_attention,
    **dict.fromkeys(("mean", torch.mean), _mean),
    **dict.fromkeys(("var", "std", torch.var, torch.std, torch.var_mean, torch.std_mean), _var),
    **dict.fromkeys((F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax",
                     "amax", torch.amax, "max", torch.max, "logsumexp", torch.logsumexp,
                     torch.special.softmax, torch.special.log_softmax), _fill("low")),
    **dict.fromkeys(("amin", torch.amin, "min", torch.min, F.softmin), _fill("high")),
    **dict.fromkeys(("prod", torch.prod), _fill("one")),
    **dict.fromkeys(("all", torch.all), _fill("true")),
    **dict.fromkeys(("nanmean", torch.nanmean), _fill("nan")),
    F.scaled_dot_product_attention: _attention,
    # ATen op packets (graphs from torch.export); an overload is looked up by its packet
    _ATEN.layer_norm: _layer_norm_function, _ATEN.group_norm: _group_norm_function,
    _ATEN.rms_norm: _rms_norm_function, _ATEN.mean: _mean, _ATEN.batch_norm: _batch_norm_function,
    **dict.fromkeys((_ATEN.var, _ATEN.std, _ATEN.var_mean, _ATEN.std_mean), _var),
    **dict.fromkeys((_ATEN.softmax, _ATEN._softmax, _ATEN._safe_softmax, _ATEN.log_softmax, _ATEN._log_softmax,
                     _ATEN.amax, _ATEN.max, _ATEN.logsumexp), _fill("low")),
    **dict.fromkeys((_ATEN.amin, _ATEN.min), _fill("high")),
    _ATEN.prod: _fill("one"), _ATEN.all: _fill("true"), _ATEN.nanmean: _fill("nan"),
    _ATEN.scaled_dot_product_attention: _attention,
}
"""Ops that reduce over an axis, and how simulation makes them count only kept entries."""

MOVES = frozenset({
    shape_ops.reshape, shape_ops.flatten, shape_ops.permute, shape_ops.transpose, shape_ops.t, shape_ops.movedim,
    shape_ops.unsqueeze, shape_ops.squeeze, shape_ops.channel_shuffle, shape_ops.cat, shape_ops.stack,
    shape_ops.split, shape_ops.unbind, shape_ops.narrow, shape_ops.expand, shape_ops.expand_as, shape_ops.repeat,
    shape_ops.repeat_interleave, shape_ops.pixel_shuffle, shape_ops.pixel_unshuffle, shape_ops.flip,
    shape_ops.fliplr, shape_ops.flipud, shape_ops.roll, shape_ops.rot90, pointwise.identity, aten.slice_rule,
    aten.select, aten.index_select, aten.index, aten.gather,
})
"""Rules of ops that move, copy or convert values (a zero stays a zero, nothing new is computed)."""

VALUE_OPS = frozenset(
    {op for op, rule in pointwise.RULES.items() if rule is pointwise.pointwise} | {F.scaled_dot_product_attention}
)
"""Ops that compute with the values of their scalar arguments (not with sizes, as ``view`` does)."""

DIVISIONS = {operator.truediv, torch.div, torch.true_divide, "div", "div_", "true_divide", _ATEN.div, _ATEN.div_}
"""Divisions whose masked divisor :func:`_safe_divisor` makes non-zero in removed positions."""
