"""Turn an ``nn.Module`` into a ``torch.fx.GraphModule``.

The fx frontend traces symbolically; its leaves are the modules that have a module
rule, plus any the caller names. A later frontend (torch.export) plugs in beside
:func:`trace_fx` with the same contract: return a GraphModule whose parameters keep
their fully qualified names, or raise :class:`TraceError` naming the module and reason.
"""

from __future__ import annotations

from typing import Collection

import torch
from torch import fx, nn

from .errors import TraceError

__all__ = ["trace_fx"]


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
