"""Masks of activations whose sizes may differ from the example's at run time.

A pruned axis of an activation is often a product or a concatenation with axes that
follow the input: ``Product(batch, heads)`` after a reshape into heads, ``Concat(cls,
tokens)`` after a learned token is prepended. A mask computed once for the example's
sizes fails at another batch size. :class:`AxisMask` keeps, per dimension, the
structure of the axis (:class:`Spec`) and builds the mask for each shape it meets:
pruned atoms have fixed sizes, atoms that are an axis of an input take that input's size
(:class:`InputSizes` reads them as the graph starts), and in a product or concatenation
at most one other part may change size (it is inferred from the runtime size; the batch
of ``batch * heads``).

>>> from passes.dims import Unifier, Product
>>> from passes.dims import Sizes
>>> u = Unifier(); batch, heads = u.new(2), u.new(3)
>>> spec = spec_of(Product((batch, heads)), Sizes({heads: torch.tensor([1])}))
>>> runtime_mask(spec, 9).int().tolist()
[1, 0, 1, 1, 0, 1, 1, 0, 1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .dims import Atom, Concat, Expr, Product, Sizes, atoms_of

__all__ = ["AxisMask", "InputSizes", "Spec", "spec_of", "static_atoms", "runtime_mask"]


@dataclass(frozen=True, eq=False)
class Spec:
    """One axis: ``kind`` ("atom", "product" or "concat"), its size in the example,
    ``keep`` (the kept units of a pruned atom), its ``parts``, whether an atom is known
    ``static`` (its size never changes: a parameter's axis, a size export fixed), and
    whether the whole is ``fixed`` (static or pruned atoms only) or ``touched`` (it holds
    a pruned atom); ``atom`` is the id of an atom's :class:`Atom`."""

    kind: str
    size: int
    keep: torch.Tensor | None = None
    parts: tuple["Spec", ...] = ()
    static: bool = False
    atom: int = -1

    @property
    def touched(self) -> bool:
        return self.keep is not None or any(p.touched for p in self.parts)

    @property
    def fixed(self) -> bool:
        if self.kind == "atom":
            return self.keep is not None or self.static
        return all(p.fixed for p in self.parts)


def spec_of(expr: Expr, sizes: Sizes, static: frozenset[Atom] = frozenset()) -> Spec:
    """The structure of a resolved axis expression under the removed units of ``sizes``;
    ``static`` atoms never change size."""
    if isinstance(expr, Atom):
        keep = sizes.mask(expr) if expr in sizes.removed else None
        return Spec("atom", expr.size, keep, static=expr in static, atom=expr.id)
    if isinstance(expr, Product):
        return Spec("product", expr.size, parts=tuple(spec_of(f, sizes, static) for f in expr.factors))
    assert isinstance(expr, Concat)
    return Spec("concat", expr.size, parts=tuple(spec_of(p, sizes, static) for p in expr.parts))


def static_atoms(gm: fx.GraphModule, params: dict[str, tuple[Expr, ...]], nodes: dict[str, Any]) -> frozenset[Atom]:
    """Atoms whose size cannot change at run time: every atom of a parameter's axes, and,
    in a graph from torch.export, every atom of an axis export kept static."""
    found = {a for axes in params.values() for e in axes for a in atoms_of(e)}
    for node in gm.graph.nodes:
        value, axes = node.meta.get("val"), nodes.get(node.name)
        if isinstance(value, torch.Tensor) and isinstance(axes, tuple) and len(axes) == value.dim():
            for n, e in zip(value.shape, axes):
                if not (isinstance(n, torch.SymInt) and n.node.expr.free_symbols):
                    found.update(atoms_of(e))
    return frozenset(found)


def runtime_mask(spec: Spec, n: int, bound: dict[int, int] | None = None) -> torch.Tensor:
    """Kept entries (bool, length ``n``) of an axis of structure ``spec`` and size ``n``;
    ``bound`` gives the runtime sizes of atoms that are an axis of an input (by atom id)."""
    if not spec.touched:
        return torch.ones(n, dtype=torch.bool)
    if spec.kind == "atom":
        if n != spec.size:
            raise RuntimeError(f"a pruned axis of {spec.size} units has {n} entries at run time")
        assert spec.keep is not None
        return spec.keep
    sizes = _part_sizes(spec, n, bound or {})
    masks = [runtime_mask(p, s, bound) for p, s in zip(spec.parts, sizes)]
    if spec.kind == "concat":
        return torch.cat(masks)
    mask = torch.ones(1, dtype=torch.bool)
    for m in masks:
        mask = (mask[:, None] & m[None, :]).reshape(-1)
    return mask


def _known_size(spec: Spec, bound: dict[int, int]) -> int | None:
    """The runtime size of an axis if nothing about it can vary unseen: fixed atoms keep the
    example's size, input axes have their bound size."""
    if spec.kind == "atom":
        return spec.size if spec.fixed else bound.get(spec.atom)
    sizes = [_known_size(p, bound) for p in spec.parts]
    if any(s is None for s in sizes):
        return None
    return math.prod(sizes) if spec.kind == "product" else sum(sizes)  # type: ignore[arg-type]


def _part_sizes(spec: Spec, n: int, bound: dict[int, int]) -> list[int]:
    """Sizes of the parts when the whole has ``n`` entries: those known (fixed or bound to an
    input's size), the one part left unknown takes what the others leave, or, with several
    unknown, the example's sizes if the whole has the example's size."""
    known = [_known_size(p, bound) for p in spec.parts]
    unknown = [i for i, k in enumerate(known) if k is None]
    if len(unknown) == 1:
        (i,) = unknown
        rest = [k for j, k in enumerate(known) if j != i]
        known[i] = n // max(math.prod(rest), 1) if spec.kind == "product" else n - sum(rest)  # type: ignore[arg-type]
    elif unknown and n == spec.size and all(k in (None, p.size) for k, p in zip(known, spec.parts)):
        known = [p.size for p in spec.parts]
    elif unknown:
        raise RuntimeError(
            f"a masked axis of {spec.size} entries has {n} at run time, and {len(unknown)} of its parts could have "
            "changed size: the mask cannot be placed (run the simulated model at the example's sizes)"
        )
    sizes = [int(k) for k in known]  # type: ignore[arg-type]
    if (math.prod(sizes) if spec.kind == "product" else sum(sizes)) != n:
        raise RuntimeError(f"a masked axis made of parts of sizes {sizes} has {n} entries at run time")
    return sizes


class InputSizes(nn.Module):
    """``forward(*inputs)``: the runtime sizes of the input axes that are one atom each, by
    atom id (``axes``: (input position, dim, atom id)), for :class:`AxisMask` to read."""

    def __init__(self, axes: list[tuple[int, int, int]]) -> None:
        super().__init__()
        self.axes = axes

    def forward(self, *inputs: Any) -> dict[int, int]:
        found = {}
        for i, d, atom in self.axes:
            x = inputs[i] if i < len(inputs) else None
            if isinstance(x, torch.Tensor) and d < x.dim():
                found[atom] = int(x.shape[d])
        return found


class AxisMask(nn.Module):
    """``forward(x)``: a mask of ``x``'s dtype, 1 on kept entries and 0 on removed ones, of
    ``x``'s rank with size 1 on axes that lose nothing (cached per shape)."""

    def __init__(self, specs: list[Spec | None]) -> None:
        super().__init__()
        self.specs = specs
        self._cache: dict[Any, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, bound: dict[int, int] | None = None) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device, tuple(sorted((bound or {}).items())))
        mask = self._cache.get(key)
        if mask is None:
            mask = torch.ones((1,) * x.dim(), dtype=x.dtype, device=x.device)
            for d, spec in enumerate(self.specs):
                if spec is not None and spec.touched:
                    shape = [1] * x.dim()
                    shape[d] = x.shape[d]
                    vector = runtime_mask(spec, x.shape[d], bound).to(device=x.device, dtype=x.dtype)
                    mask = mask * vector.reshape(shape)
            self._cache[key] = mask
        return mask

    def extra_repr(self) -> str:
        return f"dims={[d for d, s in enumerate(self.specs) if s is not None and s.touched]}"
