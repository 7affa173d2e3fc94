"""Turn an ``nn.Module`` into a ``torch.fx.GraphModule``.

Two frontends with one contract: return a GraphModule whose parameters and buffers
keep their fully qualified names, or raise :class:`TraceError` with the reason.

- :func:`trace_fx` traces symbolically; its leaves are the modules that have a module
  rule, plus any the caller names. Torch-level graph: ``call_module`` for leaves.
- :func:`trace_export` runs ``torch.export.export(strict=False)`` on the example
  inputs, so Python control flow that depends on shapes (or on a list built from a
  ``chunk``) is simply run. ATen-level graph: no ``call_module`` nodes but export's
  input guards (``_guards_fn``); parameters and buffers are ``get_attr`` nodes (the
  ``parameters`` and ``buffers`` of the graph signature, unlifted); every node's value
  is in ``node.meta["val"]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from .errors import TraceError

__all__ = ["trace_export", "trace_fx"]


class _LeafTracer(fx.Tracer):
    """fx tracer that stops at modules with a rule and remembers where it is."""

    def __init__(self, leaf_types: Collection[type], leaf_names: Collection[str]) -> None:
        super().__init__(param_shapes_constant=True)
        self.leaf_types = tuple(leaf_types)
        self.leaf_names = frozenset(leaf_names)
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in self.leaf_types or module_qualified_name in self.leaf_names

    def call_module(self, m, forward, args, kwargs):  # type: ignore[no-untyped-def]
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module sees the error first
                self.failed_in = self.path_of_module(m)
            raise


def trace_fx(
    model: nn.Module, leaf_types: Collection[type], leaf_modules: Collection[str] = ()
) -> fx.GraphModule:
    """Symbolically trace ``model``, keeping modules of ``leaf_types`` and ``leaf_modules`` whole.

    Raises
    ------
    TraceError
        If torch.fx cannot trace the model; the message names the innermost module
        being traced and fx's reason.
    """
    known = {name for name, _ in model.named_modules()}
    missing = sorted(set(leaf_modules) - known)
    if missing:
        raise TraceError(f"leaf_modules names modules the model does not have: {missing}")
    tracer = _LeafTracer(leaf_types, leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        path = tracer.failed_in
        where = (
            f"module '{path}' ({type(model.get_submodule(path)).__name__})"
            if path
            else f"the top-level {type(model).__name__}.forward"
        )
        raise TraceError(
            f"torch.fx could not trace {where}: {type(exc).__name__}: {exc}. "
            "Name that module in leaf_modules= to keep it whole (its axes are then pinned), "
            "or make its forward free of data-dependent control flow."
        ) from exc
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


def trace_export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> fx.GraphModule:
    """Trace ``model(*args, **kwargs)`` with ``torch.export.export(strict=False)``.

    Returns the unlifted ``ExportedProgram.module()``: parameters and buffers are
    ``get_attr`` nodes named by their fully qualified names and are the model's own
    tensors (nothing is copied, and nothing is written to them); tensor constants are
    buffers of the graph module, as in an fx graph; each ``get_attr`` is
    moved just before its first use, so that the rules meet parameters in the order the
    model uses them, as in an fx graph. The graph calls ``_guards_fn`` on the inputs
    (export's checks of the shapes it specialized to) and keeps every size static.

    Export runs no real kernels (fake tensors), so a model on the ``meta`` device
    works; example inputs are moved to the device of the model's parameters (a meta
    input becomes zeros there).

    Raises
    ------
    TraceError
        If torch.export cannot trace the model (data-dependent control flow on tensor
        values, unsupported Python); the message gives export's reason.

    Examples
    --------
    >>> gm = trace_export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),))
    >>> [str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_function")]
    ['weight', 'bias', 'aten.linear.default']
    """
    device = _device(model)
    args, kwargs = _on_device((tuple(args), dict(kwargs or {})), device)
    try:
        exported = torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:  # export raises many types; all mean "cannot trace"
        raise TraceError(
            f"torch.export could not trace {type(model).__name__}: {type(exc).__name__}: {_headline(exc)}"
        ) from exc
    gm = exported.module()
    _constants_as_buffers(gm, exported.graph_signature.lifted_tensor_constants)
    _attributes_before_first_use(gm)
    return gm


def _device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (None if it has neither)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return None if first is None else first.device


def _on_device(value: Any, device: torch.device | None) -> Any:
    """``value`` with every tensor on ``device``: meta tensors become zeros there, real
    ones become meta tensors for a meta model; others are left to export's own checks."""

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or device is None or t.device == device:
            return t
        if t.is_meta:
            return torch.zeros(t.shape, dtype=t.dtype, device=device)
        return t.to("meta") if device.type == "meta" else t

    return tree_map(move, value)


def _headline(exc: Exception, lines: int = 3) -> str:
    """The first non-empty lines of an error message (export's explanations run long)."""
    text = [line for line in str(exc).splitlines() if line.strip()]
    return " ".join(text[:lines]) + (" ..." if len(text) > lines else "")


def _constants_as_buffers(gm: fx.GraphModule, names: Collection[str]) -> None:
    """Register the tensor constants export lifted (plain tensor attributes, tensors made in
    ``forward``) as non-persistent buffers, as an fx GraphModule holds them: the rules then
    relate their axes as they relate a buffer's."""
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = gm.get_submodule(owner)
        value = getattr(module, attr)
        delattr(module, attr)
        module.register_buffer(attr, value, persistent=False)


def _attributes_before_first_use(gm: fx.GraphModule) -> None:
    """Move every used ``get_attr`` node just before the first node that reads it."""
    placed: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        for a in node.all_input_nodes:
            if a.op == "get_attr" and a not in placed:
                node.prepend(a)
                placed.add(a)
    gm.recompile()
