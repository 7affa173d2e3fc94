"""Plans that compose: prune, fine-tune, prune again, and end with one plan on the original.

A plan made on the analysis of a pruned model names units of *that* model's groups.
:func:`compose` maps them back: every group of the pruned model is the remainder of a group
of the original (pruning only removes units), found through a member both share: the
pruned member's entries map to the original entries the first plan kept, and those to one
original unit each. The composed plan keeps, in every original group, the units the second
plan kept (all the first plan kept where the second did not touch the group), so
``prune(original, composed)`` builds what ``prune(prune(original, first), second)`` built.

>>> import torch, depgraph
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.ReLU(), torch.nn.Linear(6, 1))
>>> a = depgraph.analyze(net, torch.zeros(1, 2))
>>> first = depgraph.Plan.from_keep(a, {0: [0, 2, 3, 5]})
>>> small = depgraph.prune(net, first)
>>> second = depgraph.Plan.from_keep(depgraph.analyze(small, torch.zeros(1, 2)), {0: [1, 3]})
>>> depgraph.compose(a, first, depgraph.analyze(small, torch.zeros(1, 2)), second).keep[0].tolist()
[2, 5]
"""

from __future__ import annotations

import torch

from passes.dims import coordinates
from passes.errors import PlanError

from .groups import Analysis, Group, Member
from .plan import Plan

__all__ = ["compose"]


def compose(original: Analysis, first: Plan, pruned: Analysis, second: Plan) -> Plan:
    """One plan on ``original`` equal to applying ``first`` (made for ``original``) and then
    ``second`` (made for ``pruned``, the analysis of ``prune(model, first)``)."""
    first.check(original)
    second.check(pruned)
    kept_entries = {axis: (~mask).nonzero().flatten() for axis, mask in first.removed_entries(original).items()}
    keep: dict[int, torch.Tensor] = {}
    for group in pruned.groups:
        if group.index not in second.keep:
            continue
        source, units = _source(original, group, kept_entries)
        keep[source.index] = units[second.keep[group.index]].sort().values
    for index, units in first.keep.items():
        keep.setdefault(index, units)
    return Plan.from_keep(original, keep, drop_blocks=[*first.drop, *_blocks(original, first, pruned, second)])


def _blocks(original: Analysis, first: Plan, pruned: Analysis, second: Plan) -> list[int]:
    """The original blocks the blocks ``second`` removes from the pruned model are: the block of
    ``original`` made of the same modules (the first plan's removals kept the others' names)."""
    found = []
    for block in second.blocks(pruned):
        match = [i for i, b in enumerate(original.blocks) if b.modules == block.modules and i not in first.drop]
        if not match:
            raise PlanError(f"block {block} of the pruned model matches no block of the original by its modules "
                            "(the first plan renamed them, removing a layer of a list): apply the plans one by one")
        found.append(match[0])
    return found


def _source(original: Analysis, group: Group, kept_entries: dict[tuple[str, int], torch.Tensor]
            ) -> tuple[Group, torch.Tensor]:
    """The original group ``group`` (of the pruned model) is the remainder of, and for each of
    its units the original unit."""
    for member in group.members:
        entries = kept_entries.get((member.name, member.dim))
        if entries is None:
            continue
        for candidate in original.groups:
            for m in candidate.members:
                if (m.name, m.dim) == (member.name, member.dim):
                    units = _units(member, m, entries, group.size)
                    if units is not None:
                        return candidate, units
    raise PlanError(f"group {group.index} ({', '.join(group.layers[:3])}) of the pruned model matches no group of the "
                    "original: compose plans made on analyses of the same model with the same inputs")


def _units(pruned: Member, original: Member, entries: torch.Tensor, size: int) -> torch.Tensor | None:
    """Original unit of each unit of ``pruned``'s group, when every entry of a unit maps to
    one unit of ``original``'s group and different units to different ones; else None."""
    along = coordinates(original.expr, original.atom)
    result = []
    for unit in range(size):
        found = along[entries[pruned.indices([unit])]]
        if len(found) == 0 or (found < 0).any() or (found != found[0]).any():
            return None
        result.append(int(found[0]))
    units = torch.tensor(result, dtype=torch.long)
    return units if len(units.unique()) == size else None
