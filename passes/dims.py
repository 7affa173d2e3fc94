"""Axis expressions over atoms, and the unifier that solves equalities between them.

Every axis of every tensor in a traced graph gets an expression:

- ``Atom``: the axis is one abstract index space ("the 64 output channels of conv1");
- ``Product``: the axis is the row-major flattening of several expressions;
- ``Concat``: the axis is consecutive parts.

Rules state equalities; :class:`Unifier` solves them. Atoms that must be equal
are merged (networkx's ``UnionFind``); an atom equal to a product or concat is
*refined* (defined as that expression everywhere it is used); what cannot be
reconciled is *pinned* with a reason a person can read.

>>> u = Unifier()
>>> a, b = u.new(6), u.new(2)
>>> u.unify(a, Product((b, u.new(3))))
>>> [x.size for x in u.resolve(a).factors]
[2, 3]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Union

import torch
from networkx.utils import UnionFind

__all__ = [
    "Atom", "Product", "Concat", "Expr", "Unifier", "ONE", "atoms_of", "removed_mask", "kept_mask", "coordinates",
    "Sizes",
]


@dataclass(frozen=True, slots=True)
class Atom:
    """One abstract index space of ``size`` units."""

    id: int
    size: int

    def __repr__(self) -> str:
        return f"a{self.id}:{self.size}"


@dataclass(frozen=True, slots=True)
class Product:
    """Row-major flattening of ``factors`` (the first varies slowest)."""

    factors: tuple["Expr", ...]
    size: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", math.prod(f.size for f in self.factors))

    def __repr__(self) -> str:
        return "(" + "*".join(map(repr, self.factors)) + ")"


@dataclass(frozen=True, slots=True)
class Concat:
    """Consecutive ``parts`` along one axis."""

    parts: tuple["Expr", ...]
    size: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", sum(p.size for p in self.parts))

    def __repr__(self) -> str:
        return "[" + "|".join(map(repr, self.parts)) + "]"


Expr = Union[Atom, Product, Concat]

ONE = Atom(0, 1)
"""The size-1 axis. It has one unit, so it can never be pruned; products drop it."""


def atoms_of(expr: Expr) -> Iterator[Atom]:
    """Yield the atoms an expression mentions, in order (as written, not resolved)."""
    if isinstance(expr, Atom):
        yield expr
    else:
        for sub in expr.factors if isinstance(expr, Product) else expr.parts:
            yield from atoms_of(sub)


class Unifier:
    """Solves equalities between axis expressions.

    ``new`` makes atoms, ``unify`` states that two expressions describe the same
    axis, ``pin`` forbids pruning, ``resolve`` returns an expression in terms of
    class representatives with every refinement applied. Pinned classes keep the
    first reason given for them.
    """

    def __init__(self) -> None:
        self._classes = UnionFind()
        self._sizes: list[int] = [1]
        self._definition: dict[int, Expr] = {}
        self._pinned: dict[int, str] = {}

    # -- atoms and classes -------------------------------------------------

    def new(self, size: int, pin: str | None = None) -> Expr:
        """A fresh atom of ``size`` units (``ONE`` for size 1), pinned if ``pin`` is a reason."""
        if size == 1:
            return ONE
        atom = Atom(len(self._sizes), int(size))
        self._sizes.append(atom.size)
        if pin is not None:
            self._pinned[atom.id] = pin
        return atom

    def root(self, atom: Atom) -> Atom:
        """The representative of ``atom``'s class."""
        if atom.size == 1:
            return ONE
        rid = self._classes[atom.id]
        return atom if rid == atom.id else Atom(rid, atom.size)

    def pin_reason(self, atom: Atom) -> str | None:
        """Why ``atom`` may not be pruned, or None if it may."""
        if atom.size == 1:
            return "a single unit cannot be pruned"
        return self._pinned.get(self._classes[atom.id])

    def resolve(self, expr: Expr) -> Expr:
        """``expr`` in canonical form over primitive class representatives."""
        if isinstance(expr, Atom):
            root = self.root(expr)
            definition = self._definition.get(root.id)
            return root if definition is None else self.resolve(definition)
        if isinstance(expr, Product):
            return _product(tuple(self.resolve(f) for f in expr.factors))
        return _concat(tuple(self.resolve(p) for p in expr.parts))

    # -- pinning -------------------------------------------------------------

    def pin(self, expr: Expr, reason: str) -> None:
        """Forbid pruning every atom ``expr`` resolves to; the first reason given is kept."""
        for atom in atoms_of(self.resolve(expr)):
            if atom.size > 1:
                self._pinned.setdefault(self._classes[atom.id], reason)

    # -- unification ---------------------------------------------------------

    def unify(self, left: Expr, right: Expr) -> None:
        """State that ``left`` and ``right`` are the same axis."""
        left, right = self.resolve(left), self.resolve(right)
        if left == right:
            return
        if left.size != right.size:
            reason = f"axes of different sizes were equated ({left.size} vs {right.size})"
            self.pin(left, reason)
            self.pin(right, reason)
        elif isinstance(left, Atom) and isinstance(right, Atom):
            self._merge(left, right)
        elif isinstance(left, Atom):
            self._define(left, right)
        elif isinstance(right, Atom):
            self._define(right, left)
        elif isinstance(left, Product) and isinstance(right, Product):
            self._align(list(left.factors), list(right.factors), by_product=True)
        else:
            self._align(_parts(left), _parts(right), by_product=False)

    def _merge(self, left: Atom, right: Atom) -> None:
        reasons = [self._pinned.pop(self._classes[a.id], None) for a in (left, right)]
        self._classes.union(left.id, right.id)
        reason = reasons[0] or reasons[1]
        if reason is not None:
            self._pinned[self._classes[left.id]] = reason

    def _define(self, atom: Atom, expr: Expr) -> None:
        atom = self.root(atom)
        if atom.id in self._definition:  # refined already: the two refinements are one axis
            self.unify(self._definition[atom.id], expr)
            return
        if any(self.root(a) == atom for a in atoms_of(expr)):
            self.pin(expr, "an axis was equated with an expression containing itself")
            self.pin(atom, "an axis was equated with an expression containing itself")
            return
        self._definition[atom.id] = expr
        reason = self._pinned.get(atom.id)
        if reason is not None:
            self.pin(expr, reason)

    def _align(self, left: list[Expr], right: list[Expr], by_product: bool) -> None:
        """Unify two factor lists (``by_product``) or part lists item by item, splitting atoms
        where one side is finer; pin any stretch that cannot be aligned."""
        i = j = 0
        while i < len(left) and j < len(right):
            a, b = self.resolve(left[i]), self.resolve(right[j])  # earlier steps may have refined them
            kind = Product if by_product else Concat
            if isinstance(a, kind) or isinstance(b, kind):
                left[i : i + 1] = _pieces(a, by_product)
                right[j : j + 1] = _pieces(b, by_product)
                continue
            left[i], right[j] = a, b
            if a.size == b.size:
                self.unify(a, b)
                i, j = i + 1, j + 1
                continue
            if by_product and (isinstance(a, Concat) or isinstance(b, Concat)):
                # the factors so far agree one by one, so the rest are the same flat axis: a
                # leading concat distributes over the factors after it (as at batch size 1)
                self.unify(_product(tuple(left[i:])), _product(tuple(right[j:])))
                return
            big, small, side = (a, b, left) if a.size > b.size else (b, a, right)
            pieces = self._split(big, small.size, by_product)
            if pieces is not None:
                k = i if side is left else j
                side[k : k + 1] = pieces
                continue
            i, j = self._pin_stretch(left, i, right, j, by_product)

    def _split(self, expr: Expr, first: int, by_product: bool) -> list[Expr] | None:
        """Refine ``expr`` into two pieces whose first has size ``first``, or None."""
        if by_product:
            if not isinstance(expr, Atom) or expr.size % first:
                return None
            pieces = [self.new(first), self.new(expr.size // first)]
            self._define(expr, Product(tuple(pieces)))
            return pieces
        if isinstance(expr, Atom):
            pieces = [self.new(first), self.new(expr.size - first)]
            self._define(expr, Concat(tuple(pieces)))
            return pieces
        if isinstance(expr, Product):
            lead, rest = expr.factors[0], expr.factors[1:]
            inner = math.prod(f.size for f in rest)
            if first % inner:
                return None
            heads = self._split(lead, first // inner, by_product=False)
            if heads is None:
                return None
            return [self.resolve(Product((h, *rest))) for h in heads]
        return None

    def _pin_stretch(
        self, left: list[Expr], i: int, right: list[Expr], j: int, by_product: bool
    ) -> tuple[int, int]:
        """Pin the shortest stretch from ``left[i]`` and ``right[j]`` whose sizes agree."""
        grow = math.prod if by_product else sum
        i0, j0 = i, j
        size_l, size_r = left[i].size, right[j].size
        i, j = i + 1, j + 1
        while size_l != size_r and (i < len(left) or j < len(right)):
            if size_l < size_r and i < len(left):
                size_l, i = grow((size_l, left[i].size)), i + 1
            elif j < len(right):
                size_r, j = grow((size_r, right[j].size)), j + 1
            else:
                size_l, i = grow((size_l, left[i].size)), i + 1
        reason = "a reshape or split regroups this axis in a way that cannot be aligned"
        for expr in left[i0:i] + right[j0:j]:
            self.pin(expr, reason)
        return i, j


def _pieces(expr: Expr, by_product: bool) -> list[Expr]:
    """The factors (``by_product``) or parts of an expression; itself if it has none."""
    if by_product:
        return list(expr.factors) if isinstance(expr, Product) else [expr]
    return _parts(expr)


def _parts(expr: Expr) -> list[Expr]:
    return list(expr.parts) if isinstance(expr, Concat) else [expr]


def _product(factors: tuple[Expr, ...]) -> Expr:
    flat: list[Expr] = []
    for f in factors:
        if isinstance(f, Product):
            flat.extend(f.factors)
        elif f.size != 1:
            flat.append(f)
    if not flat:
        return ONE
    if len(flat) == 1:
        return flat[0]
    if isinstance(flat[0], Concat):
        rest = tuple(flat[1:])
        return _concat(tuple(_product((p, *rest)) for p in flat[0].parts))
    return Product(tuple(flat))


def _concat(parts: tuple[Expr, ...]) -> Expr:
    flat: list[Expr] = []
    for p in parts:
        flat.extend(p.parts if isinstance(p, Concat) else (p,))
    return flat[0] if len(flat) == 1 else Concat(tuple(flat))


def removed_mask(expr: Expr, atom: Atom, units: torch.Tensor) -> torch.Tensor:
    """For each flat index of the resolved ``expr``, whether removing ``units`` of ``atom`` removes it.

    >>> u = Unifier(); h, d = u.new(2), u.new(3)
    >>> removed_mask(Product((h, d)), h, torch.tensor([1])).tolist()
    [False, False, False, True, True, True]
    """
    if isinstance(expr, Atom):
        mask = torch.zeros(expr.size, dtype=torch.bool)
        if expr == atom:
            mask[units] = True
        return mask
    if isinstance(expr, Concat):
        return torch.cat([removed_mask(p, atom, units) for p in expr.parts])
    mask = torch.zeros(1, dtype=torch.bool)
    for factor in expr.factors:
        mask = (mask[:, None] | removed_mask(factor, atom, units)[None, :]).reshape(-1)
    return mask


def kept_mask(expr: Expr, removed: "dict[Atom, torch.Tensor]") -> torch.Tensor:
    """For each flat index of the resolved ``expr``, whether it survives removing, for each
    atom in ``removed``, the given units.

    >>> u = Unifier(); h, d = u.new(2), u.new(3)
    >>> kept_mask(Product((h, d)), {d: torch.tensor([1])}).tolist()
    [True, False, True, True, False, True]
    """
    if isinstance(expr, Atom):
        mask = torch.ones(expr.size, dtype=torch.bool)
        units = removed.get(expr)
        if units is not None:
            mask[units] = False
        return mask
    if isinstance(expr, Concat):
        return torch.cat([kept_mask(p, removed) for p in expr.parts])
    mask = torch.ones(1, dtype=torch.bool)
    for factor in expr.factors:
        mask = (mask[:, None] & kept_mask(factor, removed)[None, :]).reshape(-1)
    return mask


def coordinates(expr: Expr, atom: Atom) -> torch.Tensor:
    """For each flat index of the resolved ``expr``, its coordinate along ``atom`` (-1 where
    the index lies in a part that does not contain ``atom``).

    >>> u = Unifier(); h, d = u.new(2), u.new(3)
    >>> coordinates(Concat((Product((h, d)), u.new(2))), h).tolist()
    [0, 0, 0, 1, 1, 1, -1, -1]
    """
    if isinstance(expr, Atom):
        if expr == atom:
            return torch.arange(expr.size)
        return torch.full((expr.size,), -1, dtype=torch.long)
    if isinstance(expr, Concat):
        return torch.cat([coordinates(p, atom) for p in expr.parts])
    coords = torch.full((1,), -1, dtype=torch.long)
    for factor in expr.factors:
        inner = coordinates(factor, atom)
        coords = torch.where(inner[None, :] >= 0, inner[None, :], coords[:, None]).reshape(-1)
    return coords


class Sizes:
    """Kept-index masks and kept counts of resolved expressions under one set of removed
    units per atom (cached).

    >>> u = Unifier(); h, d = u.new(2), u.new(3)
    >>> s = Sizes({d: torch.tensor([1])})
    >>> s.size(Product((h, d))), s.touches(h)
    (4, False)
    """

    def __init__(self, removed: dict[Atom, torch.Tensor]) -> None:
        self.removed = removed
        self._masks: dict[Expr, torch.Tensor] = {}

    def mask(self, expr: Expr) -> torch.Tensor:
        m = self._masks.get(expr)
        if m is None:
            m = self._masks[expr] = kept_mask(expr, self.removed)
        return m

    def size(self, expr: Expr) -> int:
        return int(self.mask(expr).sum()) if self.touches(expr) else expr.size

    def touches(self, expr: Expr) -> bool:
        """Whether the expression loses any index."""
        return any(a in self.removed for a in atoms_of(expr))
