"""Matrix products and attention: matmul, bmm, einsum, scaled dot-product attention,
and nn.MultiheadAttention."""

from __future__ import annotations

__all__ = ["RULES"]

RULES: dict[object, object] = {}
