"""Shape propagation on meta tensors.

Needs: a GraphModule. Adds ``node.meta[VALUE]`` (see :mod:`passes.meta`) to every node:
:func:`propagate_shapes` runs an fx graph; :func:`describe_traced` reads the values a
tracer already recorded (torch.export's fake tensors in ``node.meta["val"]``).
Weights are never read: parameters and buffers are replaced by meta tensors of the
same shape for the run (``torch.func.functional_call``), and factories called inside
``forward`` create meta tensors, so no real FLOPs run and a model built on the
``meta`` device works as well as a real one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw
from torch.utils._pytree import tree_map

from .errors import ShapeError
from .meta import VALUE, TensorMeta

__all__ = ["describe", "describe_traced", "propagate_shapes", "refresh_flat_weights", "to_meta"]


def to_meta(value: Any) -> Any:
    """``value`` with every tensor replaced by an empty meta tensor of the same shape."""
    return tree_map(
        lambda t: t if not isinstance(t, torch.Tensor) or t.is_meta else t.to("meta"), value
    )


def describe(value: Any) -> Any:
    """``value`` with every tensor replaced by its :class:`TensorMeta`, and every symbolic
    size (a dimension torch.export kept dynamic) by its value in the example."""
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(_concrete(n) for n in value.shape), value.dtype)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return _concrete(value)
    if isinstance(value, torch.Size):
        return tuple(_concrete(n) for n in value)
    if isinstance(value, (tuple, list)):
        return type(value)(describe(v) for v in value) if type(value) in (tuple, list) else tuple(
            describe(v) for v in value
        )
    if isinstance(value, dict):
        return {k: describe(v) for k, v in value.items()}
    return value


def _concrete(n: Any) -> Any:
    """A symbolic size's value in the example it was traced with (plain values unchanged)."""
    if isinstance(n, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return n.node.hint if isinstance(n, torch.SymFloat) else guarding_hint_or_throw(n)
    return n


def _same_shape(m: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _linear_shape(m: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    return (*x.shape[:-1], m.out_features)


def _conv_shape(m: nn.Module, x: torch.Tensor) -> tuple[int, ...] | None:
    n = len(m.kernel_size)
    if isinstance(m.padding, str) or len(x.shape) not in (n + 1, n + 2) or x.shape[-n - 1] != m.in_channels:
        return None  # 'same'/'valid' padding or a malformed input: let the meta kernel decide
    spatial = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip(x.shape[-n:], m.padding, m.dilation, m.kernel_size, m.stride)
    ]
    if min(spatial) <= 0:
        return None
    return (*x.shape[: -n - 1], m.out_channels, *spatial)


_FAST_SHAPES: dict[type, Any] = {
    **dict.fromkeys((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm), _same_shape),
    nn.Linear: _linear_shape,
    **dict.fromkeys((nn.Conv1d, nn.Conv2d, nn.Conv3d), _conv_shape),
}
"""Leaf modules whose output shape is a formula: skipping their meta kernels (BatchNorm's
is a slow Python decomposition) makes shape propagation several times faster."""


_SAME_AS_INPUT = frozenset({
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.elu,
    F.leaky_relu, F.sigmoid, F.tanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    torch.relu, torch.sigmoid, torch.tanh,
})
"""Unary functions whose output has the input's shape and dtype; their meta kernels are
Python decompositions, so skipping them saves most of the remaining shape time."""


class _ShapeInterpreter(fx.Interpreter):
    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in _SAME_AS_INPUT and args and isinstance(args[0], torch.Tensor):
            return torch.empty_like(args[0])
        return super().call_function(target, args, kwargs)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        m = self.fetch_attr(target)
        fast = _FAST_SHAPES.get(type(m))
        if fast is not None and not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor):
            shape = fast(m, args[0])
            if shape is not None and _input_fits(m, args[0]):
                return torch.empty(shape, dtype=args[0].dtype, device="meta")
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except ShapeError:
            raise
        except Exception as exc:
            raise ShapeError(
                f"running node '{n.name}' ({n.op} {_target_name(n)}) on meta tensors failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        n.meta[VALUE] = describe(result)
        return result


class _Runner(nn.Module):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: Any) -> Any:
        return _ShapeInterpreter(self.gm).run(*args)


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> None:
    """Run ``gm`` on meta copies of ``example_inputs`` and its own state, recording shapes."""
    state = {f"gm.{k}": _meta_like(v) for k, v in gm.named_parameters()}
    state.update({f"gm.{k}": _meta_like(v) for k, v in gm.named_buffers()})
    try:
        with torch.no_grad(), torch.device("meta"):
            torch.func.functional_call(_Runner(gm), state, to_meta(tuple(example_inputs)))
    finally:
        refresh_flat_weights(gm)


def refresh_flat_weights(model: nn.Module) -> None:
    """Point recurrent layers' ``_flat_weights`` at their own parameters again:
    ``torch.func.functional_call`` swaps the parameters in and back, and leaves that list
    holding the tensors it swapped in."""
    for m in model.modules():
        if isinstance(m, nn.RNNBase):
            m._init_flat_weights()


def describe_traced(gm: fx.GraphModule) -> None:
    """Record, as VALUE, what each node of a graph from torch.export produced.

    Export ran the model on fake tensors and kept each node's result in
    ``node.meta["val"]``; nothing runs again. A ``get_attr`` node is described by the
    tensor it reads, a node with no recorded value (export's input guards) by None.

    >>> from passes.trace import trace_export
    >>> gm = trace_export(torch.nn.Linear(4, 2), (torch.zeros(3, 4),))
    >>> describe_traced(gm)
    >>> [n.meta[VALUE].shape for n in gm.graph.nodes if n.op == "call_function"]
    [(3, 2)]
    """
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value: Any = _fetch(gm, str(node.target))
        else:
            value = node.meta.get("val")
        node.meta[VALUE] = describe(value)


def _fetch(gm: fx.GraphModule, name: str) -> Any:
    owner, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(owner), attr)


def _input_fits(m: nn.Module, x: torch.Tensor) -> bool:
    """The checks the skipped kernel would have made on the channel axis."""
    if isinstance(m, nn.Linear):
        return x.ndim >= 1 and x.shape[-1] == m.in_features
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return x.ndim >= 2 and x.shape[1] == m.num_features
    if isinstance(m, nn.GroupNorm):
        return x.ndim >= 2 and x.shape[1] == m.num_channels
    if isinstance(m, nn.LayerNorm):
        return tuple(x.shape[x.ndim - len(m.normalized_shape) :]) == tuple(m.normalized_shape)
    return True


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return t.detach() if t.is_meta else torch.empty_like(t, device="meta")


def _target_name(n: fx.Node) -> str:
    target = n.target
    return getattr(target, "__name__", None) or str(target)
