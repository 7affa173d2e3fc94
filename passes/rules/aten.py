"""Fallback for ops with no rule: lower the op to ATen on meta tensors and relate
its mini-graph with ATen-level rules (cached by signature)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx

if TYPE_CHECKING:
    from .context import Axes, Context

__all__ = ["lower"]


def lower(cx: "Context", node: fx.Node) -> "Axes | None":
    """Axes of ``node``'s output found by lowering it to ATen, or None if that fails."""
    return None
