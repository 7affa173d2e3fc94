"""Plans compose: pruning twice equals pruning once with the composed plan."""

from __future__ import annotations

import pytest
import torch
import torchvision
from zoo import ZOO

import depgraph


def _random_plan(a: depgraph.Analysis, seed: int, fraction: float = 0.3) -> depgraph.Plan:
    return depgraph.solve(a, fraction, importance="random", seed=seed)


@pytest.mark.parametrize("name", ["concat", "depthwise", "attention", "gqa", "residual", "channel_shuffle"])
def test_two_steps_equal_one_composed_step_on_the_zoo(name: str) -> None:
    case = ZOO[name]
    model, x = case.factory().eval(), case.example_inputs()
    a = depgraph.analyze(model, x)
    first = _random_plan(a, 1)
    once = depgraph.prune(model, first)
    b = depgraph.analyze(once, x)
    second = _random_plan(b, 2)
    twice = depgraph.prune(once, second)
    composed = depgraph.compose(a, first, b, second)
    direct = depgraph.prune(model, composed)
    with torch.no_grad():
        torch.testing.assert_close(direct(*x), twice(*x))
    assert sorted(p.shape for p in direct.parameters()) == sorted(p.shape for p in twice.parameters())


def test_a_resnet_three_times() -> None:
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 64, 64)
    analyses, current = [depgraph.analyze(model, x)], model
    composed = None
    for step in range(3):
        plan = depgraph.solve(analyses[-1], target={"macs": 0.8}, seed=step)
        current = depgraph.prune(current, plan)
        composed = plan if composed is None else depgraph.compose(analyses[0], composed, analyses[-1], plan)
        analyses.append(depgraph.analyze(current, x))
    direct = depgraph.prune(model, composed)
    with torch.no_grad():
        torch.testing.assert_close(direct(x), current(x))
    assert 0.5 < depgraph.cost(analyses[0], composed).macs / depgraph.cost(analyses[0]).macs <= 0.8 ** 3 * 1.01


def test_plans_for_other_analyses_are_refused() -> None:
    a = depgraph.analyze(ZOO["concat"].factory(), ZOO["concat"].example_inputs())
    b = depgraph.analyze(ZOO["residual"].factory(), ZOO["residual"].example_inputs())
    with pytest.raises(depgraph.PlanError, match="different analysis"):
        depgraph.compose(a, _random_plan(b, 0), b, _random_plan(b, 0))
