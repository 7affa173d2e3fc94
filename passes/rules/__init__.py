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
from . import aten, attention, layers, pointwise, reduce, rnn, shape_ops
from .context import Axes, Context, Rule, Unsupported

__all__ = ["RULES", "MODULE_TYPES", "relate", "Axes", "Context", "Unsupported"]

RULES: dict[object, Rule] = {}
for _family in (pointwise, layers, shape_ops, reduce, attention, rnn):
    RULES.update(_family.RULES)  # type: ignore[arg-type]

MODULE_TYPES = frozenset(k for k in RULES if isinstance(k, type))
"""Module classes with a rule: the fx tracer keeps them whole."""

INPUT = "axis of a model input"
OUTPUT = "axis of a model output"
CONSTANT = "tensor constant in the graph"


def relate(
    gm: fx.GraphModule,
    unifier: Unifier | None = None,
    *,
    rules: dict[object, Rule] | None = None,
    inputs: list[Axes] | None = None,
    params: dict | None = None,
) -> Context:
    """Apply every node's rule to a graph annotated by :func:`passes.shapes.propagate_shapes`.

    Returns the :class:`Context` holding each node's axes, each parameter's axes,
    the ops that had to be pinned (``unsupported``) and the output's axes (``result``).
    By default the graph is a whole model: its inputs and outputs are pinned. With
    ``inputs`` (the axes of each placeholder, in order) it is a subgraph inside a
    larger one (an op lowered to ATen): nothing is pinned at its boundary. ``rules``
    replaces the default table (the ATen rules for lowered graphs). ``params`` shares the
    parameters' axes with another graph of the same model (traced in the other mode).
    """
    cx = Context(gm, unifier or Unifier())
    if params is not None:
        cx.params = params
    table = RULES if rules is None else rules
    bound = iter(inputs) if inputs is not None else None
    for node in gm.graph.nodes:
        if node.op == "output":
            cx.result = _output_axes(cx, node.args[0])
            if bound is None:
                cx.pin(cx.result, OUTPUT)
        elif node.op == "placeholder":
            value = node.meta.get(VALUE)
            cx.axes[node] = next(bound) if bound is not None else cx.pinned_like(value, INPUT)
        else:
            cx.axes[node] = _node_axes(cx, node, table)
    return cx


def _node_axes(cx: Context, node: fx.Node, table: dict[object, Rule]) -> Axes:
    value = node.meta.get(VALUE)
    if node.op == "get_attr":
        if isinstance(value, TensorMeta) and cx.is_state(str(node.target)):
            return cx.param(str(node.target))
        return cx.pinned_like(value, CONSTANT)
    key = type(cx.module(node)) if node.op == "call_module" else node.target
    rule = table.get(key)
    if rule is not None:
        return rule(cx, node)
    if not node.op == "call_module" and not _holds_tensor(value) and not any(map(cx.is_tensor, node.all_input_nodes)):
        return None  # arithmetic on sizes (torch.sym_min, math.ceil, ...): no axes in, none out
    lowered = aten.lower(cx, node) if table is RULES else None
    if lowered is not None:
        return lowered
    return _unsupported(cx, node, f"no rule for {_op_name(node)}")


def _holds_tensor(value: object) -> bool:
    if isinstance(value, TensorMeta):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False


def _unsupported(cx: Context, node: fx.Node, reason: str) -> Axes:
    why = f"{_op_name(node)} has no rule"
    for a in node.all_input_nodes:
        cx.pin(cx.axes.get(a), f"input of {_op_name(node)}, which has no rule")
    if node.op == "call_module":  # a leaf module's own parameters are never pruned either
        for name, _ in (*cx.module(node).named_parameters(), *cx.module(node).named_buffers()):
            cx.pin(cx.param(f"{node.target}.{name}"), why)
    cx.unsupported.append(Unsupported(node.name, _op_name(node), reason))
    return cx.pinned_like(node.meta.get(VALUE), f"output of {_op_name(node)}, which has no rule")


def _output_axes(cx: Context, value: object) -> Axes:
    if isinstance(value, fx.Node):
        return cx.axes.get(value)
    if isinstance(value, (list, tuple)):
        return [_output_axes(cx, v) for v in value]
    if isinstance(value, dict):
        return {k: _output_axes(cx, v) for k, v in value.items()}
    return None


def _op_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(node.graph.owning_module.get_submodule(str(node.target))).__name__} module '{node.target}'"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__name__', target)}".lstrip(".")

