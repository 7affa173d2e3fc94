"""Per-op rules and the pass that applies them to a whole graph.

``RULES`` is one table keyed by a single op: a function (``torch.add``,
``operator.getitem``, ``F.relu``), a Tensor method name (``"view"``) or a module
class (``nn.Conv2d``). Adding an op is one entry here (and one small function if
its family is new). :func:`relate` walks a shape-annotated graph once, calls each
node's rule, and pins everything it cannot relate.
"""

from __future__ import annotations

from torch import fx

from ..dims import Unifier
from ..meta import VALUE, TensorMeta
from . import layers, pointwise, reduce, shape_ops
from .context import Axes, Context, Rule, Unsupported

__all__ = ["RULES", "MODULE_TYPES", "relate", "Context", "Unsupported"]

RULES: dict[object, Rule] = {}
for _family in (pointwise, layers, shape_ops, reduce):
    RULES.update(_family.RULES)  # type: ignore[arg-type]

MODULE_TYPES = frozenset(k for k in RULES if isinstance(k, type))
"""Module classes with a rule: the fx tracer keeps them whole."""

INPUT = "axis of a model input"
OUTPUT = "axis of a model output"
CONSTANT = "tensor constant in the graph"


def relate(gm: fx.GraphModule, unifier: Unifier | None = None) -> Context:
    """Apply every node's rule to a graph annotated by :func:`passes.shapes.propagate_shapes`.

    Returns the :class:`Context` holding each node's axes, each parameter's axes,
    and the ops that had to be pinned (``unsupported``).
    """
    cx = Context(gm, unifier or Unifier())
    for node in gm.graph.nodes:
        if node.op == "output":
            cx.pin(_output_axes(cx, node.args[0]), OUTPUT)
            continue
        cx.axes[node] = _node_axes(cx, node)
    return cx


def _node_axes(cx: Context, node: fx.Node) -> Axes:
    value = node.meta.get(VALUE)
    if node.op == "placeholder":
        return cx.pinned_like(value, INPUT)
    if node.op == "get_attr":
        if isinstance(value, TensorMeta) and cx.is_state(str(node.target)):
            return cx.param(str(node.target))
        return cx.pinned_like(value, CONSTANT)
    key = type(cx.module(node)) if node.op == "call_module" else node.target
    rule = RULES.get(key)
    if rule is None:
        return _unsupported(cx, node, f"no rule for {_op_name(node)}")
    return rule(cx, node)


def _unsupported(cx: Context, node: fx.Node, reason: str) -> Axes:
    for a in node.all_input_nodes:
        cx.pin(cx.axes.get(a), f"input of {_op_name(node)}, which has no rule")
    cx.unsupported.append(Unsupported(node.name, _op_name(node), reason))
    return cx.pinned_like(node.meta.get(VALUE), f"output of {_op_name(node)}, which has no rule")


def _output_axes(cx: Context, value: object) -> Axes:
    if isinstance(value, fx.Node):
        return cx.axes.get(value)
    if isinstance(value, (list, tuple)):
        return [_output_axes(cx, v) for v in value]
    if isinstance(value, dict):
        return [_output_axes(cx, v) for v in value.values()]
    return None


def _op_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(node.graph.owning_module.get_submodule(str(node.target))).__name__} module '{node.target}'"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__name__', target)}".lstrip(".")

