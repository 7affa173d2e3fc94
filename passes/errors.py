"""One exception hierarchy for everything depgraph raises on purpose.

Users import them from ``depgraph.errors`` (or ``depgraph``); each class names that module
as its own so tracebacks and pickles point at the public path, not this internal one."""

from __future__ import annotations

__all__ = ["DepgraphError", "TraceError", "ShapeError", "InputError", "PlanError", "CheckpointError"]


class DepgraphError(Exception):
    """Base class: every error depgraph raises on purpose is one of these."""


class TraceError(DepgraphError):
    """The model could not be turned into a graph (names the module and the reason)."""


class ShapeError(DepgraphError):
    """Running the traced graph on meta tensors failed (names the node and the reason)."""


class InputError(DepgraphError, ValueError):
    """An argument from the caller is unusable; the message says what to pass instead."""


class PlanError(DepgraphError, ValueError):
    """A plan does not fit the analysis or model it is applied to."""


class CheckpointError(DepgraphError):
    """A checkpoint directory that cannot be read, or an output directory that cannot take the result."""


for _error in (DepgraphError, TraceError, ShapeError, InputError, PlanError, CheckpointError):
    _error.__module__ = "depgraph.errors"
