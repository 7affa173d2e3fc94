"""A check the rule tests share: every node's axes have the sizes of its shape."""

from __future__ import annotations

from typing import Any

import depgraph
from passes.meta import VALUE, TensorMeta
from passes.rules import Axes, relate


def assert_axes_match_shapes(a: depgraph.Analysis) -> None:
    """Relate ``a.graph`` again and check each node's axis sizes against its recorded shape."""
    for node, axes in relate(a.graph).axes.items():
        assert _sizes(axes) == _shape(node.meta.get(VALUE)), node.name


def _sizes(axes: Axes) -> Any:
    if isinstance(axes, tuple):
        return tuple(e.size for e in axes)
    if isinstance(axes, list):
        return [_sizes(a) for a in axes]
    return None


def _shape(value: Any) -> Any:
    """The shape of a tensor; a list of those of a sequence holding tensors; else None."""
    if isinstance(value, TensorMeta):
        return value.shape
    if isinstance(value, (list, tuple)) and any(isinstance(v, (TensorMeta, list, tuple)) for v in value):
        return [_shape(v) for v in value]
    return None
