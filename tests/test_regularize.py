"""Sparse training over groups: the group-lasso and batch-norm-scale penalties."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import depgraph


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1)).eval()


def test_group_lasso_and_its_gradient_by_hand() -> None:
    model = _net()
    a = depgraph.analyze(model, torch.zeros(1, 2, 6, 6))
    conv, bn, nxt = model[0], model[1], model[3]
    per_unit = (conv.weight.square().sum((1, 2, 3)) + conv.bias.square() + bn.weight.square() + bn.bias.square()
                + nxt.weight.square().sum((0, 2, 3))).sqrt()
    penalty = depgraph.GroupRegularizer(a)(model)
    torch.testing.assert_close(penalty, per_unit.sum())
    (got,) = torch.autograd.grad(penalty, conv.weight)
    torch.testing.assert_close(got, conv.weight / per_unit[:, None, None, None])


def test_removed_units_of_a_simulated_model_contribute_nothing() -> None:
    model = _net()
    a = depgraph.analyze(model, torch.zeros(1, 2, 6, 6))
    plan = depgraph.Plan.from_keep(a, {0: [0, 2]})
    masked = depgraph.simulate(model, plan)
    penalty = depgraph.GroupRegularizer(a)
    with torch.no_grad():
        kept = depgraph.prune(model, plan)
    torch.testing.assert_close(penalty(masked), depgraph.GroupRegularizer(depgraph.analyze(
        kept, torch.zeros(1, 2, 6, 6)))(kept))
    original = masked.get_submodule("0").parametrizations.weight.original
    (grad,) = torch.autograd.grad(penalty(masked), original)
    assert torch.isfinite(grad).all() and (grad[[1, 3]] == 0).all() and (grad[[0, 2]] != 0).any()


def test_bn_scale_and_cost_weights() -> None:
    model = _net()
    a = depgraph.analyze(model, torch.zeros(1, 2, 6, 6))
    torch.testing.assert_close(depgraph.GroupRegularizer(a, "bn_scale")(model), model[1].weight.abs().sum())
    # one group: its cost per unit is the mean, so the weight is 1
    torch.testing.assert_close(depgraph.GroupRegularizer(a, by_cost=True)(model), depgraph.GroupRegularizer(a)(model))
    with pytest.raises(depgraph.InputError, match="kind must be one of group_lasso, bn_scale"):
        depgraph.GroupRegularizer(a, "l0")
    linear = depgraph.analyze(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)), torch.zeros(1, 2))
    with pytest.raises(depgraph.InputError, match="no group of the analysis has a normalization layer's scale"):
        depgraph.GroupRegularizer(linear, "bn_scale")
    with pytest.raises(depgraph.InputError, match="the model has no 0.weight"):
        depgraph.GroupRegularizer(a)(nn.Sequential())


def test_training_with_the_penalty_shrinks_whole_units() -> None:
    """A few steps of pure penalty descent on two groups of unequal cost with by_cost: the
    expensive group's norms fall faster, relative to where they started."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2))
    a = depgraph.analyze(model, torch.zeros(1, 4))
    penalty = depgraph.GroupRegularizer(a, by_cost=True)
    before = [model[0].weight.norm().item(), model[2].weight.norm().item()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(10):
        optimizer.zero_grad()
        penalty(model).backward()
        optimizer.step()
    assert model[2].weight.norm().item() / before[1] < model[0].weight.norm().item() / before[0]
