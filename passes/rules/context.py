"""What a rule sees: the node's inputs with their shapes and axis expressions.

A rule is ``rule(cx: Context, node: fx.Node) -> Axes``: it states equalities with
``cx.unify`` and returns the axes of the node's output. ``Axes`` mirrors the
output's value: a ``tuple`` of expressions (one per dimension) for a tensor, a
``list`` of Axes for a tuple or list of values, a ``dict`` for a dict, and
``None`` for anything that is not a tensor (ints, sizes, dtypes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

from torch import fx, nn

from ..dims import ONE, Expr, Unifier
from ..meta import VALUE, TensorMeta

__all__ = ["Axes", "Context", "Literal", "Measured", "Rule", "Unsupported", "arg", "tensor_args", "iter_exprs",
           "broadcast"]

Axes = Union[tuple[Expr, ...], list["Axes"], dict[Any, "Axes"], None]
Rule = Callable[["Context", fx.Node], Axes]


@dataclass(frozen=True)
class Unsupported:
    """An op the analysis could not relate; all of its axes were pinned."""

    node: str
    op: str
    reason: str


@dataclass(frozen=True)
class Literal:
    """Where a size sits in a call: argument ``index`` (positional) or ``name`` (keyword) of
    the op, or, with ``attr``, the attribute ``name`` of the called module."""

    index: int | None
    name: str
    attr: bool = False


Measured = Union[Expr, tuple[Expr, ...]]
"""What a literal measures: one axis (a count), or several (a shape such as normalized_shape)."""


class Context:
    """State shared by rules while one graph is related: the unifier, every node's
    axes, and the axes of every parameter and buffer (by canonical name)."""

    def __init__(self, gm: fx.GraphModule, unifier: Unifier) -> None:
        self.gm = gm
        self.u = unifier
        self.axes: dict[fx.Node, Axes] = {}
        self.params: dict[str, tuple[Expr, ...]] = {}
        self.unsupported: list[Unsupported] = []
        self.literals: dict[fx.Node, list[tuple[Literal, Measured]]] = {}
        self.requirements: list[tuple[Expr, int, str]] = []
        self.lowered: dict[str, tuple[fx.GraphModule, dict[fx.Node, Axes]]] = {}
        """Per node related through its ATen decomposition: that mini-graph and its axes."""
        self.result: Axes = None
        self._canonical = _canonical_names(gm)
        self._modules = dict(gm.named_modules())

    # -- reading the graph --------------------------------------------------

    def value(self, a: Any) -> Any:
        """The meta value of an argument: a TensorMeta, a plain value, or a structure."""
        if isinstance(a, fx.Node):
            return a.meta[VALUE]
        if isinstance(a, (list, tuple)):
            return type(a)(self.value(x) for x in a)
        return a

    def shape(self, a: Any) -> tuple[int, ...]:
        """The shape of a tensor argument."""
        v = self.value(a)
        assert isinstance(v, TensorMeta), f"{a} is not a tensor"
        return v.shape

    def out(self, node: fx.Node) -> TensorMeta:
        """The meta of the node's own (tensor) output."""
        v = node.meta[VALUE]
        assert isinstance(v, TensorMeta), f"{node} does not return a tensor"
        return v

    def of(self, a: Any) -> tuple[Expr, ...]:
        """The axes of a tensor argument."""
        axes = self.axes[a]
        assert isinstance(axes, tuple), f"{a} is not a tensor"
        return axes

    def module(self, node: fx.Node) -> nn.Module:
        return self._modules[str(node.target)]

    def is_state(self, name: str) -> bool:
        """Whether ``name`` is a parameter or buffer of the graph module."""
        return name in self._canonical

    def canonical(self, name: str) -> str:
        """The first name a (possibly tied) parameter or buffer is known by."""
        return self._canonical.get(name, name)

    def is_tensor(self, a: Any) -> bool:
        return isinstance(a, fx.Node) and isinstance(a.meta.get(VALUE), TensorMeta)

    # -- stating relations ---------------------------------------------------

    def new(self, size: int, pin: str | None = None) -> Expr:
        return self.u.new(size, pin)

    def fresh(self, shape: tuple[int, ...], pin: str | None = None) -> tuple[Expr, ...]:
        """New atoms for every axis of ``shape``; pinned with ``pin`` if given."""
        return tuple(self.u.new(n, pin) for n in shape)

    def unify(self, a: Expr, b: Expr) -> None:
        self.u.unify(a, b)

    def unify_all(self, left: tuple[Expr, ...], right: tuple[Expr, ...]) -> None:
        for a, b in zip(left, right, strict=True):
            self.u.unify(a, b)

    def measure(self, node: fx.Node, where: Literal, measured: Measured) -> None:
        """State that the size at ``where`` in ``node``'s call counts the units of
        ``measured`` (a number of groups counts a group atom; a normalized shape, the
        normalized axes): pruning rewrites it to the kept count (:mod:`passes.shrink`)."""
        self.literals.setdefault(node, []).append((where, measured))

    def require(self, expr: Expr, at_least: int, reason: str) -> None:
        """State that the axis ``expr`` must keep at least ``at_least`` entries (``reason`` says
        why); the groups whose atoms it holds then keep enough units (:mod:`depgraph.couple`)."""
        self.requirements.append((expr, at_least, reason))

    def pin(self, axes: Axes, reason: str) -> None:
        """Pin every expression in an Axes structure."""
        for expr in iter_exprs(axes):
            self.u.pin(expr, reason)

    def param(self, name: str, pin_dims: tuple[int, ...] = (), why: str = "") -> tuple[Expr, ...]:
        """Axes of the parameter or buffer ``name`` (its FQN in the graph module).

        The first call makes fresh atoms; later calls (a module used twice, a tied
        weight under another name) return the same axes. ``pin_dims`` are pinned
        with reason ``why`` (kernel sizes and the like).
        """
        canonical = self._canonical.get(name, name)
        axes = self.params.get(canonical)
        if axes is None:
            tensor = self.gm.get_parameter(name) if _is_param(self.gm, name) else self.gm.get_buffer(name)
            axes = self.fresh(tuple(tensor.shape))
            self.params[canonical] = axes
        for d in pin_dims:
            self.u.pin(axes[d], why)
        return axes

    def module_param(
        self, node: fx.Node, attr: str, pin_dims: tuple[int, ...] = (), why: str = ""
    ) -> tuple[Expr, ...] | None:
        """Axes of ``attr`` of the module called by ``node``, or None if it has none."""
        if getattr(self.module(node), attr, None) is None:
            return None
        return self.param(f"{node.target}.{attr}", pin_dims, why)

    def pinned_like(self, value: Any, reason: str) -> Axes:
        """Fresh pinned axes shaped like a meta value."""
        if isinstance(value, TensorMeta):
            return self.fresh(value.shape, reason)
        if isinstance(value, (list, tuple)):
            return [self.pinned_like(v, reason) for v in value]
        if isinstance(value, dict):
            return {k: self.pinned_like(v, reason) for k, v in value.items()}
        return None


def iter_exprs(axes: Axes) -> Iterator[Expr]:
    """Every expression in an Axes structure."""
    if isinstance(axes, tuple):
        yield from axes
    elif isinstance(axes, list):
        for a in axes:
            yield from iter_exprs(a)
    elif isinstance(axes, dict):
        for a in axes.values():
            yield from iter_exprs(a)


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (positional) or ``name`` (keyword) of ``node``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def tensor_args(cx: Context, node: fx.Node) -> list[fx.Node]:
    """Every tensor among the node's positional and keyword arguments (one level of lists)."""
    found: list[fx.Node] = []
    for a in (*node.args, *node.kwargs.values()):
        for x in a if isinstance(a, (list, tuple)) else (a,):
            if cx.is_tensor(x):
                found.append(x)
    return found


def _is_param(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_parameter(name)
        return True
    except AttributeError:
        return False


def _canonical_names(gm: fx.GraphModule) -> dict[str, str]:
    """Map every name of a parameter or buffer to the first name it is known by."""
    first: dict[int, str] = {}
    canonical: dict[str, str] = {}
    for name, t in (*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)):
        canonical[name] = first.setdefault(id(t), name)
    return canonical


def broadcast(cx: Context, node: fx.Node, inputs: list[fx.Node]) -> tuple[Expr, ...]:
    """Output axes of broadcasting ``inputs`` to the node's shape: aligned axes of the
    same non-1 size are equal; a size-1 axis broadcasts and relates to nothing."""
    shape = cx.out(node).shape
    result: list[Expr | None] = [None] * len(shape)
    for a in inputs:
        axes, sizes = cx.of(a), cx.shape(a)
        offset = len(shape) - len(sizes)
        for k, (expr, n) in enumerate(zip(axes, sizes)):
            if n == 1 or offset + k < 0:
                continue
            i = offset + k
            if result[i] is None:
                result[i] = expr
            else:
                cx.unify(result[i], expr)
    return tuple(
        r if r is not None else (ONE if n == 1 else cx.new(n, "size made by broadcasting"))
        for r, n in zip(result, shape)
    )

