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

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
import torch

from passes.dims import Atom, Expr, coordinates, removed_mask
from passes.rules import Unsupported

__all__ = ["Member", "ActivationMember", "Group", "Pinned", "Analysis"]


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
    """Per node related through its ATen decomposition: (mini-graph, axes of its nodes)."""
    notes: list[str] = field(default_factory=list)
    """What the analysis changed or assumed to trace the model (``use_cache=False``), for people to read."""

    @property
    def fingerprint(self) -> str:
        """A digest of the group structure (sizes, member names and axes): plans made for
        one analysis can be checked against another."""
        text = repr([(g.size, [(m.name, m.dim) for m in g.members]) for g in self.groups])
        return hashlib.sha1(text.encode()).hexdigest()[:16]

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
