"""Importance: one score per unit of a group, from the group's members.

A member's score for a unit is a norm of every entry of the member that the unit
removes (the entries whose coordinate along the group's atom is that unit), so a
unit of a concat or a flattened axis is scored over exactly its own slices. The
member scores are then aggregated (``mean``, ``sum`` or ``max``) into the group's.

Criteria:

- ``"l1"`` / ``"l2"``: the L1 / L2 norm of the unit's slice of each *parameter*
  member (buffers such as running statistics are not weights and are left out);
- ``"bn_scale"``: the sum of ``|weight|`` over the unit's entries, for the members
  that are the ``weight`` of a normalization layer (BatchNorm, InstanceNorm,
  GroupNorm, LayerNorm, RMSNorm) only; a group with none is an error;
- ``"random"``: uniform in [0, 1) from the caller's generator;
- :class:`ElementScores` (from :func:`depgraph.gradient_importance`: per-entry scores of
  every parameter, such as ``|w · ∂L/∂w|``; from :func:`depgraph.activation_importance`:
  ``|w| · rms(x)`` of every consumer): the sum of the scores of a unit's entries in each
  parameter member (the group Taylor of the DepGraph paper), over the consumer members
  only where the scores name them and the group has one;
- a callable ``f(group, tensors) -> scores``: ``tensors`` maps each member's name to
  its parameter or buffer (detached, sharing memory: do not modify it), ``scores``
  must hold ``group.size`` finite values. Higher means more important.

Scores are float32 on the CPU. Weights are read, never written.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

import torch
from torch import nn

from passes.errors import InputError

from .groups import Group, Member

__all__ = ["CRITERIA", "AGGREGATES", "ElementScores", "Weights", "unit_scores", "describe"]


class ElementScores(dict):  # type: ignore[type-arg]
    """A score per entry of each parameter, by parameter name (see :func:`depgraph.gradient_importance`).

    ``reads`` maps a weight name to its axis of input channels where only the members on
    that axis (the consumers of a group) should count (:func:`depgraph.activation_importance`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: dict[str, int] = {}


Criterion = Union[str, ElementScores, Callable[[Group, Mapping[str, torch.Tensor]], Any]]

CRITERIA = ("l1", "l2", "bn_scale", "random")
AGGREGATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": lambda x: x.mean(0),
    "sum": lambda x: x.sum(0),
    "max": lambda x: x.amax(0),
}
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
"""The normalization layers whose ``weight`` is a scale (``"bn_scale"``)."""


class Weights(NamedTuple):
    """The model's parameters and buffers by fully qualified name, and its modules."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    modules: dict[str, nn.Module]

    @classmethod
    def of(cls, model: nn.Module) -> "Weights":
        """Collect ``model``'s named parameters, buffers and modules (nothing is copied)."""
        return cls(dict(model.named_parameters()), dict(model.named_buffers()), dict(model.named_modules()))


def describe(group: Group) -> str:
    """``group 3 (layer1.0.conv1, layer1.0.bn1, ...)``: how messages name a group."""
    layers = group.layers
    return f"group {group.index} ({', '.join(layers[:3])}{', ...' if len(layers) > 3 else ''})"


def unit_scores(
    groups: Sequence[Group],
    weights: Weights,
    importance: Criterion = "l2",
    aggregate: str = "mean",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-unit scores of groups of equal size pruned at the same positions.

    Each group's score is the ``aggregate`` of its members' scores; several groups
    (a dependency group) are combined with the same ``aggregate``.

    Examples
    --------
    >>> import torch, depgraph
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.tensor([[3.0], [-4.0], [1.0]])), net[0].bias.zero_()
    ...     _ = net[2].weight.zero_()
    >>> a = depgraph.analyze(net, torch.zeros(1, 1))
    >>> unit_scores(a.groups, Weights.of(net), "l1", "sum").tolist()
    [3.0, 4.0, 1.0]
    """
    per_group = torch.stack([_group_scores(g, weights, importance, aggregate, generator) for g in groups])
    return AGGREGATES[aggregate](per_group)


def _group_scores(
    group: Group, weights: Weights, importance: Criterion, aggregate: str, generator: torch.Generator | None
) -> torch.Tensor:
    if isinstance(importance, ElementScores):
        found = [(m, importance[m.name]) for m in group.members if m.name in importance]
        if not found:
            raise InputError(f"the element scores hold no parameter of {describe(group)}: compute them on the "
                             "model that was analyzed")
        readers = [(m, t) for m, t in found if importance.reads.get(m.name) == m.dim]
        return AGGREGATES[aggregate](torch.stack([m.unit_sums(t) for m, t in readers or found]))
    if callable(importance):
        return _called(importance, group, weights)
    if importance == "random":
        return torch.rand(group.size, generator=generator)
    members = _norm_members(group, weights) if importance == "bn_scale" else _param_members(group, weights)
    power = 2 if importance == "l2" else 1
    return AGGREGATES[aggregate](torch.stack([_member_scores(m, t, power) for m, t in members]))


def _param_members(group: Group, weights: Weights) -> list[tuple[Member, torch.Tensor]]:
    found = [(m, weights.params[m.name]) for m in group.members if m.name in weights.params]
    if not found:
        raise InputError(
            f"{describe(group)} has no parameter member, only buffers, so a norm cannot rank it: "
            "pass importance= as a callable (it receives the buffers)"
        )
    return found


def _norm_members(group: Group, weights: Weights) -> list[tuple[Member, torch.Tensor]]:
    found = [
        (m, weights.params[m.name])
        for m in group.members
        if m.name.rpartition(".")[2] == "weight" and m.name in weights.params
        and isinstance(weights.modules.get(m.name.rpartition(".")[0]), NORMS)
    ]
    if not found:
        raise InputError(
            f"importance='bn_scale' needs a normalization layer's weight in every ranked group, and "
            f"{describe(group)} has none: use importance='l2' (or 'l1', or a callable)"
        )
    return found


def _member_scores(member: Member, tensor: torch.Tensor, power: int) -> torch.Tensor:
    """The L``power`` norm of each unit's entries of ``member`` (an L1 sum for power 1)."""
    if tensor.is_meta:
        raise InputError(
            f"{member.name} is on the meta device: the model has no weights to rank; "
            "use importance='random' or a callable"
        )
    entries = tensor.detach().float()
    totals = member.unit_sums(entries.abs() if power == 1 else entries.square())
    return totals if power == 1 else totals.sqrt()


def _called(importance: Callable[..., Any], group: Group, weights: Weights) -> torch.Tensor:
    tensors = {}
    for m in group.members:
        tensor = weights.params.get(m.name, weights.buffers.get(m.name))
        if tensor is not None:
            tensors[m.name] = tensor.detach()
    scores = torch.as_tensor(importance(group, tensors))
    if tuple(scores.shape) != (group.size,):
        raise InputError(
            f"the importance callable returned shape {tuple(scores.shape)} for {describe(group)}; "
            f"expected ({group.size},): one score per unit"
        )
    if scores.is_meta:
        raise InputError(
            f"the importance callable returned meta scores for {describe(group)}; return real values"
        )
    scores = scores.detach().float().cpu()
    if not torch.isfinite(scores).all():
        raise InputError(f"the importance callable returned non-finite scores for {describe(group)}")
    return scores
