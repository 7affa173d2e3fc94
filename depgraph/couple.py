"""From related axes to groups: resolve every axis once and collect, per atom class,
the members that contain it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import fx

from passes.dims import Atom, Expr, Unifier, atoms_of
from passes.meta import VALUE, TensorMeta
from passes.rules import Axes, Context
from passes.rules.context import Literal, Measured

from .groups import ActivationMember, Group, Member, Pinned

__all__ = ["Coupling", "ModeGraph", "couple"]


@dataclass
class ModeGraph:
    """A graph of the model traced in the other train/eval mode (it reaches parameters the
    main graph does not: an auxiliary head run only in training), with its resolved node
    axes and literals, so that pruning updates what only that mode runs."""

    graph: Any
    nodes: dict[str, Axes]
    literals: dict[str, list[tuple[Literal, Measured]]]


@dataclass
class Coupling:
    """Resolved axes of every parameter and node, and the groups and pins they imply."""

    groups: list[Group]
    pinned: list[Pinned]
    params: dict[str, tuple[Expr, ...]]
    nodes: dict[str, Axes]
    literals: dict[str, list[tuple[Literal, Measured]]]
    others: list[ModeGraph]
    lowered: dict[str, tuple[fx.GraphModule, dict[str, Axes]]]
    """Per node related through its ATen decomposition: the mini-graph and its resolved axes."""


def couple(cx: Context, others: tuple[Context, ...] = ()) -> Coupling:
    """Groups (unpinned atoms of size > 1 touching a parameter axis; buffer axes that
    contain the atom are members too) and the pinned atoms that touch parameters or
    buffers, both in order of first appearance. An atom that only buffers contain (the
    unused tail of a ``position_ids`` buffer) is neither: nothing is learned there.
    ``others``: graphs of the same model in the other train/eval mode, related with the
    same unifier and parameters; their parameters count, their nodes are in ``Coupling.others``."""
    u = cx.u
    params = {name: tuple(u.resolve(e) for e in axes) for name, axes in cx.params.items()}
    members: dict[Atom, list[Member]] = {}
    pinned: dict[Atom, list[tuple[str, int]]] = {}
    for name, axes in params.items():
        for dim, expr in enumerate(axes):
            for atom in _distinct_atoms(expr):
                if u.pin_reason(atom) is None:
                    members.setdefault(atom, []).append(Member(name, dim, expr, atom))
                else:
                    pinned.setdefault(atom, []).append((name, dim))
    trainable = {name for c in (cx, *others) for name, _ in c.gm.named_parameters()}
    members = {atom: ms for atom, ms in members.items() if any(m.name in trainable for m in ms)}
    nodes = {node.name: _resolve(u, axes) for node, axes in cx.axes.items()}
    activations = _activation_members(cx, nodes, set(members))
    minimum = _minimum_units(cx, others)
    groups = [
        Group(i, atom.size, tuple(ms), tuple(activations.get(atom, ())), atom, *minimum.get(atom, (1, "")))
        for i, (atom, ms) in enumerate(members.items())
    ]
    pins = [Pinned(a.size, u.pin_reason(a) or "", tuple(ms), a) for a, ms in pinned.items()]
    lowered = {
        name: (gm, {n.name: _resolve(u, axes) for n, axes in found.items()}) for name, (gm, found) in cx.lowered.items()
    }
    return Coupling(groups, pins, params, nodes, _literals(cx), [_other(c) for c in others], lowered)


def _literals(cx: Context) -> dict[str, list[tuple[Literal, Measured]]]:
    return {
        node.name: [(where, _resolve_measured(cx.u, measured)) for where, measured in found]
        for node, found in cx.literals.items()
    }


def _other(cx: Context) -> ModeGraph:
    return ModeGraph(cx.gm, {node.name: _resolve(cx.u, axes) for node, axes in cx.axes.items()}, _literals(cx))


def _resolve_measured(u: Unifier, measured: Measured) -> Measured:
    return tuple(u.resolve(e) for e in measured) if isinstance(measured, tuple) else u.resolve(measured)


def _minimum_units(cx: Context, others: tuple[Context, ...]) -> dict[Atom, tuple[int, str]]:
    """Per atom, the fewest units it may keep for every requirement of the rules to hold
    (an axis that must keep ``n`` entries: each unpinned atom in it keeps enough units that,
    with the rest of the axis whole, ``n`` remain)."""
    u = cx.u
    found: dict[Atom, tuple[int, str]] = {}
    for expr, at_least, reason in (r for c in (cx, *others) for r in c.requirements):
        resolved = u.resolve(expr)
        free = [a for a in _distinct_atoms(resolved) if u.pin_reason(a) is None]
        rest = max(resolved.size // math.prod(a.size for a in free), 1) if free else resolved.size
        need = -(-at_least // rest)
        for atom in free:
            if need > found.get(atom, (1, ""))[0]:
                found[atom] = (min(need, atom.size), reason)
    return found


def _resolve(u: Unifier, axes: Axes) -> Axes:
    if isinstance(axes, tuple):
        return tuple(u.resolve(e) for e in axes)
    if isinstance(axes, list):
        return [_resolve(u, a) for a in axes]
    if isinstance(axes, dict):
        return {k: _resolve(u, a) for k, a in axes.items()}
    return None


def _distinct_atoms(expr: Expr) -> list[Atom]:
    return list(dict.fromkeys(a for a in atoms_of(expr) if a.size > 1))


def _activation_members(
    cx: Context, nodes: dict[str, Axes], wanted: set[Atom]
) -> dict[Atom, list[ActivationMember]]:
    found: dict[Atom, list[ActivationMember]] = {}
    for node in cx.axes:
        axes = nodes[node.name]
        if not isinstance(axes, tuple) or not isinstance(node.meta.get(VALUE), TensorMeta):
            continue
        for dim, expr in enumerate(axes):
            for atom in _distinct_atoms(expr):
                if atom in wanted:
                    found.setdefault(atom, []).append(ActivationMember(node.name, dim, expr, atom))
    return found
