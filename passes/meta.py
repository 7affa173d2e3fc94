"""Keys that passes write into ``node.meta``, and the frozen records stored under them.

- ``VALUE`` (written by :func:`passes.shapes.propagate_shapes`): what the node produced,
  with every tensor replaced by a :class:`TensorMeta`; ints, sizes and other plain
  values are kept as they are; tuples and lists keep their structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["VALUE", "TensorMeta"]

VALUE = "depgraph_value"


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Shape and dtype of a tensor seen while propagating shapes."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)
