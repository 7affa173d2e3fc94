"""From related axes to groups: resolve every parameter axis and collect, per atom
class, the members that contain it."""

from __future__ import annotations



from passes.dims import Atom, Expr, atoms_of
from passes.meta import VALUE, TensorMeta
from passes.rules import Context

from .groups import ActivationMember, Group, Member, Pinned

__all__ = ["collect_groups"]


def collect_groups(cx: Context) -> tuple[list[Group], list[Pinned]]:
    """Groups (unpinned atoms of size > 1 touching a parameter or buffer axis) and the
    pinned atoms that touch parameters, both in order of first appearance."""
    u = cx.u
    members: dict[Atom, list[Member]] = {}
    pinned: dict[Atom, list[tuple[str, int]]] = {}
    for name, axes in cx.params.items():
        for dim, raw in enumerate(axes):
            expr = u.resolve(raw)
            for atom in _distinct_atoms(expr):
                if u.pin_reason(atom) is None:
                    members.setdefault(atom, []).append(Member(name, dim, expr, atom))
                else:
                    pinned.setdefault(atom, []).append((name, dim))
    activations = _activation_members(cx, set(members))
    groups = [
        Group(i, atom.size, tuple(ms), tuple(activations.get(atom, ())), atom)
        for i, (atom, ms) in enumerate(members.items())
    ]
    pins = [Pinned(a.size, u.pin_reason(a) or "", tuple(ms)) for a, ms in pinned.items()]
    return groups, pins


def _distinct_atoms(expr: Expr) -> list[Atom]:
    return list(dict.fromkeys(a for a in atoms_of(expr) if a.size > 1))


def _activation_members(cx: Context, wanted: set[Atom]) -> dict[Atom, list[ActivationMember]]:
    found: dict[Atom, list[ActivationMember]] = {}
    for node, axes in cx.axes.items():
        if not isinstance(axes, tuple) or not isinstance(node.meta.get(VALUE), TensorMeta):
            continue
        for dim, raw in enumerate(axes):
            expr = cx.u.resolve(raw)
            for atom in _distinct_atoms(expr):
                if atom in wanted:
                    found.setdefault(atom, []).append(ActivationMember(node.name, dim, expr, atom))
    return found


