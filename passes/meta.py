"""Keys that passes write into ``node.meta``, and the frozen records stored under them.

- ``VALUE`` (written by :func:`passes.shapes.propagate_shapes`): what the node produced,
  with every tensor replaced by a :class:`TensorMeta`; ints, sizes and other plain
  values are kept as they are; tuples and lists keep their structure.
- ``MODULE_STACK`` (written by torch.fx and torch.export): the modules whose forward made the
  node, outermost first; :func:`module_paths` reads their qualified names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

__all__ = ["VALUE", "MODULE_STACK", "TensorMeta", "module_paths"]

VALUE = "depgraph_value"
MODULE_STACK = "nn_module_stack"


def module_paths(node: fx.Node) -> list[str]:
    """Qualified names of the modules whose forward made ``node``, outermost first (empty for
    the top-level forward)."""
    return [str(path) for path, _ in (node.meta.get(MODULE_STACK) or {}).values()]


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Shape and dtype of a tensor seen while propagating shapes."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)
