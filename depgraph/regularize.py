"""Sparse training over groups: penalties that push whole units of a group towards zero.

``penalty = depgraph.GroupRegularizer(a)``; in the training loop ``loss = task_loss +
lam * penalty(model)``. Kinds:

- ``"group_lasso"`` (the DepGraph paper's group-level sparsity): the sum over groups and
  units of the L2 norm of *every* slice the unit removes, across all its parameter members
  (a conv's output filter, its batch norm's scale and shift, the next conv's input slice
  together), so a unit goes to zero as one;
- ``"bn_scale"`` (network slimming): the L1 norm of the scales of the normalization layers in
  each group.

``by_cost=True`` weights each group by what one of its units costs (MACs, from
:class:`~depgraph.costs.CostModel`, divided by the mean over groups), so expensive units are
pushed harder. The penalty reads the parameters through the modules (``module.weight``), so
it works on the original model and on what ``simulate`` returns (whose parametrizations mask
removed units: those contribute exactly zero, with zero gradient).

>>> import torch, depgraph
>>> net = torch.nn.Sequential(torch.nn.Linear(1, 2, bias=False), torch.nn.ReLU(), torch.nn.Linear(2, 1, bias=False))
>>> with torch.no_grad():
...     _ = net[0].weight.copy_(torch.tensor([[3.0], [0.0]])), net[2].weight.copy_(torch.tensor([[4.0, 1.0]]))
>>> penalty = depgraph.GroupRegularizer(depgraph.analyze(net, torch.zeros(1, 1)))
>>> penalty(net).item()  # unit 0: sqrt(3² + 4²), unit 1: sqrt(0² + 1²)
6.0
"""

from __future__ import annotations

import torch
from torch import nn

from passes.dims import coordinates
from passes.errors import InputError

from .costs import CostModel
from .groups import Analysis, Member
from .importance import NORMS

__all__ = ["GroupRegularizer", "PENALTIES"]

PENALTIES = ("group_lasso", "bn_scale")


class GroupRegularizer:
    """A penalty over the groups of ``analysis`` (module doc), called on the model being
    trained: the analyzed model, or ``simulate`` of it."""

    def __init__(self, analysis: Analysis, kind: str = "group_lasso", by_cost: bool = False) -> None:
        if kind not in PENALTIES:
            raise InputError(f"kind must be one of {', '.join(PENALTIES)}, got {kind!r}")
        modules = dict(analysis.model.named_modules())
        self.kind = kind
        self.terms: list[tuple[int, list[tuple[Member, torch.Tensor]]]] = []
        for group in analysis.groups:
            members = [(m, _units(m)) for m in group.members if _wanted(m, modules, kind)]
            if members:
                self.terms.append((group.size, members))
        if not self.terms:
            what = "a normalization layer's scale" if kind == "bn_scale" else "a parameter"
            raise InputError(f"no group of the analysis has {what} to penalize")
        self.weights = [1.0] * len(self.terms)
        if by_cost:
            per_unit = CostModel(analysis).per_unit()
            costs = [float(per_unit[g.index].macs) for g in analysis.groups
                     if any(_wanted(m, modules, kind) for m in g.members)]
            mean = sum(costs) / len(costs) if sum(costs) > 0 else 1.0
            self.weights = [c / mean for c in costs]

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """The penalty of ``model``'s current parameters (differentiable)."""
        total = torch.zeros(())
        for weight, (size, members) in zip(self.weights, self.terms):
            if self.kind == "bn_scale":
                for m, _ in members:
                    total = total + weight * _tensor(model, m.name).abs().sum()
                continue
            squares = None
            for m, units in members:
                t = _tensor(model, m.name)
                per_index = t.movedim(m.dim, 0).reshape(t.shape[m.dim], -1).square().sum(1)
                inside = units >= 0
                sums = torch.zeros(size, dtype=per_index.dtype, device=per_index.device)
                sums = sums.index_add(0, units[inside].to(per_index.device), per_index[inside])
                squares = sums if squares is None else squares + sums
            assert squares is not None
            norms = torch.where(squares > 0, squares.clamp_min(1e-30).sqrt(), torch.zeros_like(squares))
            total = total.to(norms.device) + weight * norms.sum()
        return total


def _wanted(member: Member, modules: dict[str, nn.Module], kind: str) -> bool:
    owner, _, leaf = member.name.rpartition(".")
    module = modules.get(owner)
    if module is None or not isinstance(module._parameters.get(leaf), nn.Parameter) and not _parametrized(module, leaf):
        return False
    return kind == "group_lasso" or (leaf == "weight" and isinstance(module, NORMS))


def _parametrized(module: nn.Module, leaf: str) -> bool:
    return leaf in getattr(module, "parametrizations", {})


def _units(member: Member) -> torch.Tensor:
    return coordinates(member.expr, member.atom)


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    try:
        return getattr(model.get_submodule(owner), leaf)
    except AttributeError as exc:
        raise InputError(f"the model has no {name}: call the regularizer on the analyzed model or on simulate() "
                         "of it") from exc
