"""The errors depgraph raises on purpose, for users to catch: ``from depgraph.errors import PlanError``
(also ``depgraph.PlanError``). Every one is a :class:`DepgraphError`; an argument depgraph
cannot use is an :class:`InputError` (a ``ValueError`` too).

>>> import depgraph
>>> issubclass(depgraph.errors.PlanError, (depgraph.DepgraphError, ValueError))
True
"""

from passes.errors import CheckpointError, DepgraphError, InputError, PlanError, ShapeError, TraceError

__all__ = ["DepgraphError", "TraceError", "ShapeError", "InputError", "PlanError", "CheckpointError"]
