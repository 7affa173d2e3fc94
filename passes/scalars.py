"""Sizes computed at run time, as the pruned model computes them.

A graph traced by torch.fx keeps the Python arithmetic on sizes (``x.size(1)``,
``q.shape[-1] ** -0.5``, ``math.sqrt(d)``) as nodes. Once an axis is pruned, the pruned
model computes those values from the pruned sizes. :func:`pruned_value` evaluates such
a node under a plan without running the model: sizes of pruned axes are the kept counts,
and the arithmetic is applied to them. :func:`pruned_scalars` makes a simulated graph use
those values where they enter arithmetic on tensors (an attention scale), while shape
arguments keep the original sizes (the simulated model keeps its shapes). Shrink uses
the same values to decide whether a computed size argument still gives the pruned size.

>>> import torch
>>> from torch import fx
>>> from passes.dims import Unifier
>>> from passes.dims import Sizes
>>> gm = fx.symbolic_trace(lambda q: q * q.shape[-1] ** -0.5)
>>> u = Unifier(); d = u.new(4)
>>> power = [n for n in gm.graph.nodes if n.target is operator.pow][0]
>>> pruned_value(power, {"q": (u.new(2), d)}, Sizes({d: torch.tensor([0, 1, 2])}))
1.0
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import Any

import torch
from torch import fx

from .dims import Sizes
from .meta import VALUE, TensorMeta

__all__ = ["UNKNOWN", "pruned_value", "pruned_scalars", "reads_pruned_size"]


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()
"""The value of a node :func:`pruned_value` cannot evaluate."""

ARITHMETIC = frozenset({
    *(getattr(operator, n) for n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
                                      "eq", "ne", "lt", "le", "gt", "ge", "getitem", "and_", "or_", "not_")),
    *(getattr(math, n) for n in ("sqrt", "ceil", "floor", "log", "log2", "exp", "prod", "isqrt", "trunc")),
    builtins.int, builtins.float, builtins.min, builtins.max, builtins.abs, builtins.round, builtins.len,
})
"""Functions on plain values that the evaluation applies to pruned sizes."""

_MEMO = "depgraph_pruned_value"


def pruned_value(node: Any, nodes: dict[str, Any], sizes: Sizes) -> Any:
    """The value a non-tensor ``node`` (a size, or arithmetic on sizes) takes in the pruned
    model; its traced value when it reads no pruned size; :data:`UNKNOWN` when it reads one
    through an op that cannot be evaluated. Plain arguments are returned as they are."""
    if isinstance(node, (list, tuple)):
        values = [pruned_value(v, nodes, sizes) for v in node]
        return UNKNOWN if any(v is UNKNOWN for v in values) else type(node)(values)
    if not isinstance(node, fx.Node):
        return node
    value = node.meta.get(VALUE)
    if isinstance(value, TensorMeta):
        return UNKNOWN
    if not reads_pruned_size(node, nodes, sizes):
        return value
    return _evaluate(node, nodes, sizes)


def _evaluate(node: fx.Node, nodes: dict[str, Any], sizes: Sizes) -> Any:
    source = node.args[0] if node.args else None
    axes = nodes.get(source.name) if isinstance(source, fx.Node) else None
    if _is_size(node) and isinstance(axes, tuple):
        shape = tuple(sizes.size(e) for e in axes)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return shape if dim is None else shape[dim]
    if _is_shape(node) and isinstance(axes, tuple):
        return torch.Size(sizes.size(e) for e in axes)
    if _is_numel(node) and isinstance(axes, tuple):
        return math.prod(sizes.size(e) for e in axes)
    if node.op == "call_function" and node.target in ARITHMETIC:
        args = pruned_value(list(node.args), nodes, sizes)
        kwargs = {k: pruned_value(v, nodes, sizes) for k, v in node.kwargs.items()}
        if args is UNKNOWN or any(v is UNKNOWN for v in kwargs.values()):
            return UNKNOWN
        try:
            return node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 -- a pruned size the arithmetic refuses (a zero division)
            return UNKNOWN
    return UNKNOWN


def reads_pruned_size(node: Any, nodes: dict[str, Any], sizes: Sizes) -> bool:
    """Whether a non-tensor ``node`` is computed from the size of a pruned axis."""
    if not isinstance(node, fx.Node):
        return isinstance(node, (list, tuple)) and any(reads_pruned_size(v, nodes, sizes) for v in node)
    value = node.meta.get(VALUE)
    if isinstance(value, TensorMeta):
        return False
    source = node.args[0] if node.args else None
    axes = nodes.get(source.name) if isinstance(source, fx.Node) else None
    if isinstance(axes, tuple) and (_is_size(node) or _is_shape(node) or _is_numel(node)):
        if _is_size(node) and len(node.args) > 1:
            return sizes.touches(axes[node.args[1]])
        return any(sizes.touches(e) for e in axes)
    whole = isinstance(source, fx.Node) and (_is_shape(source) or (_is_size(source) and len(source.args) == 1))
    if node.target is operator.getitem and whole:
        axes = nodes.get(source.args[0].name)
        index = node.args[1]
        if isinstance(axes, tuple) and isinstance(index, (int, slice)):  # x.shape[0]: only that axis counts
            picked = axes[index] if isinstance(index, slice) else (axes[index],)
            return any(sizes.touches(e) for e in picked)
    return any(reads_pruned_size(a, nodes, sizes) for a in node.all_input_nodes)


def _is_size(node: fx.Node) -> bool:
    """``x.size()``, ``x.size(d)``, and export's ``aten.sym_size``."""
    if node.op == "call_function":
        return node.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_size.default)
    return node.op == "call_method" and node.target == "size"


def _is_shape(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is getattr and node.args[1] == "shape"


def _is_numel(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in ("numel", "nelement")) or (
        node.op == "call_function" and node.target in (torch.numel, torch.ops.aten.sym_numel.default)
    )


def pruned_scalars(gm: fx.GraphModule, nodes: dict[str, Any], sizes: Sizes, value_ops: frozenset[Any]) -> list[str]:
    """Where a size computed from a pruned axis enters arithmetic on tensors (an op in
    ``value_ops``), put the value the pruned model computes, as a literal; return the
    names of the ops whose value could not be told (the caller decides what that means)."""
    unknown = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or not isinstance(node.meta.get(VALUE), TensorMeta):
            continue
        if node.target not in value_ops and getattr(node.target, "overloadpacket", None) not in value_ops:
            continue
        def substitute(a: Any) -> Any:
            if not isinstance(a, fx.Node) or isinstance(a.meta.get(VALUE), TensorMeta):
                return a
            if not reads_pruned_size(a, nodes, sizes):
                return a
            value = pruned_value(a, nodes, sizes)
            if value is UNKNOWN:
                unknown.append(node.name)
                return a
            return value

        node.args = tuple(substitute(a) for a in node.args)
        node.kwargs = {k: substitute(v) for k, v in node.kwargs.items()}
    return unknown
