"""The result of an analysis: groups of coupled parameter slices.

Glossary (also in the README):

- **unit**: one index of a group's atom; pruning removes whole units.
- **group**: a class of equal atoms that touches at least one parameter or buffer
  axis and is not pinned; its ``size`` is its number of units.
- **member**: one parameter/buffer axis (or, for simulation, activation axis)
  whose expression contains the group's atom.
- **pinned**: an atom that may not be pruned, with the reason.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable

import networkx as nx
import torch

from passes.blocks import Block, find_blocks
from passes.dims import Atom, Expr, atoms_of, coordinates, removed_mask
from passes.errors import InputError
from passes.rules import Unsupported

__all__ = ["Member", "ActivationMember", "Group", "Pinned", "Coupled", "Analysis", "Block"]


def _units(units: Iterable[int] | torch.Tensor, size: int) -> torch.Tensor:
    t = torch.as_tensor(units if isinstance(units, torch.Tensor) else list(units), dtype=torch.long)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= size):
        raise IndexError(f"unit indices must lie in [0, {size}); got {t.tolist()}")
    return t


@dataclass(frozen=True)
class Member:
    """One axis of a parameter or buffer that a group's units remove slices from.

    ``name`` is the fully qualified name, ``dim`` the axis, ``expr`` the axis
    expression (in resolved atoms) and ``atom`` the group's atom inside it.
    """

    name: str
    dim: int
    expr: Expr = field(repr=False)
    atom: Atom = field(repr=False)

    def indices(self, units: Iterable[int] | torch.Tensor) -> torch.Tensor:
        """Flat indices along ``dim`` removed by pruning ``units`` of the group.

        >>> import torch, depgraph
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> g = depgraph.analyze(net, torch.zeros(1, 4)).groups[0]
        >>> [(m.name, m.dim, m.indices([1]).tolist()) for m in g.members]
        [('0.weight', 0, [1]), ('0.bias', 0, [1]), ('2.weight', 1, [1])]
        """
        units = _units(units, self.atom.size)
        return removed_mask(self.expr, self.atom, units).nonzero().flatten()

    def unit_sums(self, entries: torch.Tensor) -> torch.Tensor:
        """Per unit of the group, the sum of ``entries`` over every entry the unit removes:
        ``entries`` has the parameter's size along ``dim`` (the parameter's shape, or one
        value per index of ``dim`` at that axis); float32 on the CPU.

        >>> import torch, depgraph
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> m = depgraph.analyze(net, torch.zeros(1, 2)).groups[0].members[2]
        >>> m.name, m.unit_sums(torch.tensor([[1.0, 2.0, 3.0]])).tolist()
        ('2.weight', [1.0, 2.0, 3.0])
        """
        moved = entries.detach().float().movedim(self.dim, 0)
        per_index = moved.reshape(moved.shape[0], -1).sum(1)
        unit = coordinates(self.expr, self.atom).to(per_index.device)
        inside = unit >= 0
        totals = torch.zeros(self.atom.size, device=per_index.device)
        totals.index_add_(0, unit[inside], per_index[inside])
        return totals.cpu()


@dataclass(frozen=True)
class ActivationMember:
    """An axis of an intermediate value (graph node) that a group's units touch."""

    node: str
    dim: int
    expr: Expr = field(repr=False)
    atom: Atom = field(repr=False)

    def indices(self, units: Iterable[int] | torch.Tensor) -> torch.Tensor:
        """Flat indices along ``dim`` of the node's output removed by ``units``."""
        units = _units(units, self.atom.size)
        return removed_mask(self.expr, self.atom, units).nonzero().flatten()


@dataclass(frozen=True)
class Group:
    """Parameter slices that must be pruned together: ``size`` units, each removing the
    matching slices from every member."""

    index: int
    size: int
    members: tuple[Member, ...]
    activations: tuple[ActivationMember, ...] = field(repr=False, default=())
    atom: Atom = field(repr=False, default=Atom(0, 1))
    min_keep: int = field(repr=False, default=1)
    """The fewest units a plan may keep (more than one where an op needs it, such as a batch
    norm in training mode taking statistics over the group's axis)."""
    min_reason: str = field(repr=False, default="")

    @property
    def layers(self) -> list[str]:
        """Modules owning the members, in order, without repeats."""
        return list(dict.fromkeys(m.name.rpartition(".")[0] or m.name for m in self.members))


@dataclass(frozen=True)
class Pinned:
    """An atom that may not be pruned: its size, the reason, and the parameter axes it touches."""

    size: int
    reason: str
    members: tuple[tuple[str, int], ...]
    atom: Atom = field(repr=False, default=Atom(0, 1), compare=False)


@dataclass(frozen=True)
class Coupled:
    """The answer of :meth:`Analysis.lookup` for one atom of an axis: the ``group`` it
    belongs to (with the ``unit`` the asked index is in, and every member index that unit
    removes in ``removed``), or the ``pinned`` reason it may not be pruned."""

    group: Group | None
    unit: int | None = None
    removed: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    pinned: str | None = None

    def __str__(self) -> str:
        if self.group is None:
            return f"pinned: {self.pinned}"
        head = f"group {self.group.index} ({self.group.size} units)"
        if self.unit is None:
            return f"{head}: {', '.join(f'{m.name} dim {m.dim}' for m in self.group.members)}"
        return f"{head}, unit {self.unit}: " + "; ".join(
            f"{name} dim {dim} {indices}" for (name, dim), indices in self.removed.items())


@dataclass
class Analysis:
    """Everything :func:`depgraph.analyze` found: groups, pinned atoms, unsupported ops."""

    groups: list[Group]
    pinned: list[Pinned]
    unsupported: list[Unsupported]
    graph: Any = field(repr=False, default=None)
    seconds: float = 0.0
    params: dict[str, tuple[Expr, ...]] = field(repr=False, default_factory=dict)
    nodes: dict[str, Any] = field(repr=False, default_factory=dict)
    literals: dict[str, Any] = field(repr=False, default_factory=dict)
    model: Any = field(repr=False, default=None)
    inputs: tuple[Any, ...] = field(repr=False, default=())
    tracer: str = "fx"
    keywords: dict[str, Any] = field(repr=False, default_factory=dict)
    """The keyword example inputs of a torch.export analysis (metas for tensors, plain values)."""
    others: list[Any] = field(repr=False, default_factory=list)
    """Graphs of the model in the other train/eval mode (:class:`depgraph.couple.ModeGraph`)."""
    lowered: dict[str, Any] = field(repr=False, default_factory=dict)
    """(mini-graph, axes of its nodes) of each node related through its ATen decomposition."""
    notes: list[str] = field(default_factory=list)
    """What the analysis changed or assumed to trace the model (``use_cache=False``), for people to read."""

    @property
    def fingerprint(self) -> str:
        """A digest of the group structure (sizes, member names and axes), so that plans made
        for one analysis can be checked against another."""
        text = repr([(g.size, [(m.name, m.dim) for m in g.members]) for g in self.groups])
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    @cached_property
    def blocks(self) -> list[Block]:
        """The removable residual branches of the graph (:class:`Block`), in graph order: each
        ``f`` of a ``y = x + f(x)`` (with a layer scale or drop path inside ``f``, or several
        branches added to one stream) that nothing else reads, that owns a parameter, and whose
        removal (``f`` replaced by zero) changes no shape. Found on first use, then kept.

        >>> import torch, torchvision, depgraph
        >>> a = depgraph.analyze(torchvision.models.resnet18(), torch.zeros(1, 3, 32, 32))
        >>> [b.name for b in a.blocks]  # the blocks with a downsample are not removable
        ['layer1.0', 'layer1.1', 'layer2.1', 'layer3.1', 'layer4.1']
        >>> str(a.blocks[0])
        'layer1.0: conv1, bn1, conv2, bn2 (at add, stream max_pool2d)'
        """
        return [] if self.graph is None else find_blocks(self.graph)

    def lookup(self, name: str, dim: int = 0, index: int | None = None) -> list[Coupled]:
        """What goes with axis ``dim`` of parameter or buffer ``name`` (and with its entry
        ``index``): one :class:`Coupled` per atom of the axis (one for a plain axis; an axis
        of heads × head_dim has two, a concat one per part holding the index), each the
        group it belongs to or the reason it is pinned.

        >>> import torch, depgraph
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> a = depgraph.analyze(net, torch.zeros(1, 4))
        >>> [str(c) for c in a.lookup("0.weight", 0, 1)]
        ['group 0 (3 units), unit 1: 0.weight dim 0 [1]; 0.bias dim 0 [1]; 2.weight dim 1 [1]']
        >>> [str(c) for c in a.lookup("2.weight", 0)]  # doctest: +ELLIPSIS
        ['pinned: ...']
        """
        axes = self.params.get(name)
        if axes is None:
            close = difflib.get_close_matches(name, list(self.params), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InputError(f"the analysis has no parameter or buffer {name!r}{hint}")
        if not 0 <= dim < len(axes):
            raise InputError(f"{name} has {len(axes)} axes; dim {dim} is not one of them")
        expr = axes[dim]
        if index is not None and not 0 <= index < expr.size:
            raise InputError(f"{name} has {expr.size} entries along dim {dim}; index {index} is out of range")
        groups = {g.atom: g for g in self.groups}
        pins = {p.atom: p for p in self.pinned}
        found = []
        for atom in dict.fromkeys(atoms_of(expr)):
            unit = None
            if index is not None:
                unit = int(coordinates(expr, atom)[index])
                if unit < 0:
                    continue
            if atom in groups:
                found.append(self._coupled(groups[atom], unit))
            else:
                reason = pins[atom].reason if atom in pins else "only buffers hold it: nothing to learn there"
                found.append(Coupled(None, pinned=reason or "pinned"))
        return found

    def _coupled(self, group: Group, unit: int | None) -> Coupled:
        if unit is None:
            return Coupled(group)
        removed = {(m.name, m.dim): m.indices([unit]).tolist() for m in group.members}
        return Coupled(group, unit, removed)

    def to_networkx(self) -> nx.Graph:
        """A bipartite graph: one node per group (``("group", i)``), one per member
        (``("param", name, dim)``), an edge for each membership.

        >>> import torch, depgraph
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        >>> sorted(depgraph.analyze(net, torch.zeros(1, 4)).to_networkx().nodes)[:2]
        [('group', 0), ('param', '0.bias', 0)]
        """
        g = nx.Graph()
        for group in self.groups:
            g.add_node(("group", group.index), size=group.size)
            for m in group.members:
                g.add_edge(("group", group.index), ("param", m.name, m.dim))
        return g

    def summary(self) -> str:
        """A readable table: one row per group with its size, member count and layers."""
        rows = [f"{'group':>5}  {'units':>5}  {'members':>7}  layers"]
        for g in self.groups:
            layers = g.layers
            shown = ", ".join(layers[:4]) + (f", ... (+{len(layers) - 4})" if len(layers) > 4 else "")
            rows.append(f"{g.index:>5}  {g.size:>5}  {len(g.members):>7}  {shown}")
        rows.append(
            f"{len(self.groups)} groups, {len(self.pinned)} pinned atoms touching parameters, "
            f"{len(self.unsupported)} unsupported ops"
        )
        for u in self.unsupported:
            rows.append(f"  unsupported: {u.op} at node {u.node}: {u.reason}")
        rows.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(rows)
