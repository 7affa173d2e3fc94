"""Targets instead of ratios: ``depgraph.solve(a, target={"macs": f})`` lands on the target.

Where the groups are fine enough, the pruned model's MACs or parameters (``depgraph.cost``,
equal to counting the pruned model: ``tests/test_cost.py``) are within 1% below the
target; bounds and ``round_to`` hold; impossible or malformed targets are clear errors.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import depgraph
from depgraph import InputError


def _meta(name: str) -> depgraph.Analysis:
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    model = getattr(tvm, name)(weights=None, **kwargs).to("meta").eval()
    return depgraph.analyze(model, torch.randn(1, 3, 224, 224, device="meta"))


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_large", "densenet121", "vit_b_16"])
@pytest.mark.parametrize("metric", ["macs", "params"])
def test_the_torchvision_slice_lands_within_one_percent(name: str, metric: str) -> None:
    a = _meta(name)
    whole = getattr(depgraph.cost(a), metric)
    for fraction in (0.3, 0.5, 0.7):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "landed at" warning either
            plan = depgraph.solve(a, target={metric: fraction}, importance="random", seed=0)
        got = getattr(depgraph.cost(a, plan), metric) / whole
        assert fraction * 0.99 <= got <= fraction, (fraction, got)


def test_round_to_and_bounds_hold() -> None:
    a = _meta("resnet50")
    plan = depgraph.solve(a, target={"macs": 0.5}, round_to=8, min_sparse_ratio=0.1, max_sparse_ratio=0.8,
                          importance="random", seed=0)
    assert 0.49 <= depgraph.cost(a, plan).macs / depgraph.cost(a).macs <= 0.5
    for group in a.groups:
        kept = plan.keep[group.index].numel() if group.index in plan.keep else group.size
        assert kept % 8 == 0 or kept == group.size
        assert group.size - int(0.8 * group.size) <= kept <= group.size - int(0.1 * group.size)


def test_a_unit_that_saves_more_for_its_importance_goes_first_by_cost() -> None:
    """Two branches of equal importance: with ``strategy="cost"`` the one whose units cost
    four times as much (a larger image) goes first for a MACs target, and the cheap one not
    at all."""

    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.big, self.small = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
            self.out_big, self.out_small = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)
            with torch.no_grad():
                for conv in (self.big, self.small, self.out_big, self.out_small):
                    conv.weight.fill_(1.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            small = nn.functional.avg_pool2d(x, 2)
            return (self.out_big(self.big(x)).mean((2, 3)) + self.out_small(self.small(small)).mean((2, 3)))

    a = depgraph.analyze(Branches().eval(), torch.randn(1, 3, 8, 8))
    big = next(g.index for g in a.groups if "big" in g.layers)
    plan = depgraph.solve(a, target={"macs": 0.6}, strategy="cost")
    assert big in plan.keep and next(g.index for g in a.groups if "small" in g.layers) not in plan.keep


def test_the_depthwise_multipliers_of_fastvit_no_longer_compound() -> None:
    """timm's fastvit_t8 widens every stage by a depthwise multiplier of 2: a group of two
    units, each half of a stage. A ratio per group removes them blindly; a target counts them."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("fastvit_t8", pretrained=False).eval()
    a = depgraph.analyze(model, torch.randn(1, 3, 256, 256))
    whole = depgraph.cost(a)
    for metric in ("params", "macs"):
        plan = depgraph.solve(a, target={metric: 0.5})
        assert 0.495 <= getattr(depgraph.cost(a, plan), metric) / getattr(whole, metric) <= 0.5


def test_impossible_and_malformed_targets_are_clear_errors() -> None:
    a = depgraph.analyze(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.zeros(1, 4))
    with pytest.raises(InputError, match=r"the macs cannot go below 6 \(0.125 of 48\).*ask for at least 0.125"):
        depgraph.solve(a, target={"macs": 0.1})
    with pytest.raises(InputError, match="target 'energy' is not one of macs, params, latency"):
        depgraph.solve(a, target={"energy": 0.5})
    with pytest.raises(InputError, match=r"target\['macs'\] must be the fraction of the model's macs to keep"):
        depgraph.solve(a, target={"macs": 1.5})
    with pytest.raises(InputError, match="pass it without sparsity="):
        depgraph.solve(a, 0.5, target={"macs": 0.5})
    with pytest.raises(InputError, match="target must be one of"):
        depgraph.solve(a, target={"macs": 0.5, "params": 0.5})


def test_a_budget_in_a_config_list_bounds_the_model_after_the_other_entries() -> None:
    """A global group with ``budget={"macs": f}`` loses units until the whole model keeps f of
    its MACs; an excluded layer's group keeps every unit, a fixed ratio elsewhere applies
    first and exactly."""
    a = _meta("resnet18")
    whole = depgraph.cost(a).macs
    group_of = {m.name: g.index for g in a.groups for m in g.members if m.dim == 0}
    fixed, excluded = group_of["layer1.0.conv1.weight"], group_of["layer4.1.conv1.weight"]
    config_list = [
        {"op_types": ["Conv2d"], "exclude_op_names": ["layer1.0.conv1", "layer4.1.conv1"], "global_group_id": "g",
         "budget": {"macs": 0.5}, "max_sparse_ratio": 0.9},
        {"op_names": ["layer1.0.conv1"], "sparse_ratio": 0.25},
    ]
    plan = depgraph.solve(a, config_list=config_list, importance="random", seed=0)
    assert 0.495 <= depgraph.cost(a, plan).macs / whole <= 0.5
    assert len(plan.keep[fixed]) == 48 and excluded not in plan.keep
    assert all(len(k) >= plan.sizes[i] - int(0.9 * plan.sizes[i]) for i, k in plan.keep.items())
    params = depgraph.solve(a, config_list=[{"op_types": ["Conv2d", "Linear"], "global_group_id": 0,
                                             "budget": {"params": 0.3}}], importance="random", seed=0)
    assert 0.297 <= depgraph.cost(a, params).params / depgraph.cost(a).params <= 0.3


def test_budget_errors() -> None:
    a = depgraph.analyze(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.zeros(1, 4))
    cases = [
        ({"op_types": ["Linear"], "budget": {"macs": 0.5}}, "has a budget: give it with a global_group_id"),
        ({"op_types": ["Linear"], "global_group_id": 1, "sparse_ratio": 0.5, "budget": {"macs": 0.5}},
         "without sparse_ratio"),
        ({"op_types": ["Linear"], "global_group_id": 1, "budget": {"latency": 0.5}},
         "a latency budget is not supported in a config list"),
        ({"op_types": ["Linear"], "global_group_id": 1, "budget": {"macs": 0}}, r"must be \{'macs': f\}"),
    ]
    for entry, message in cases:
        with pytest.raises(InputError, match=message):
            depgraph.solve(a, config_list=[entry])
    with pytest.raises(InputError, match=r"the macs cannot go below 6 \(0.125 of 48\)"):
        depgraph.solve(a, config_list=[{"op_types": ["Linear"], "global_group_id": 1, "budget": {"macs": 0.1}}])
    two = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    b = depgraph.analyze(two, torch.zeros(1, 4))
    with pytest.raises(InputError, match="global groups 'x' and 'y' both have a budget"):
        depgraph.solve(b, config_list=[{"op_names": ["0"], "global_group_id": "x", "budget": {"macs": 0.5}},
                                       {"op_names": ["2"], "global_group_id": "y", "budget": {"macs": 0.5}}])


def test_strategies_spread_a_target_differently_and_all_land() -> None:
    """``cost`` prices units per cost saved (it may take most of an expensive group),
    ``importance`` ranks by importance alone, ``uniform`` removes one fraction everywhere."""
    a = _meta("resnet18")
    whole = depgraph.cost(a).macs
    kept = {}
    for strategy in ("cost", "importance", "uniform"):
        plan = depgraph.solve(a, target={"macs": 0.5}, importance="random", seed=0, strategy=strategy)
        assert 0.495 <= depgraph.cost(a, plan).macs / whole <= 0.5, strategy
        kept[strategy] = [len(plan.keep.get(g.index, range(g.size))) / g.size for g in a.groups]
    assert max(kept["uniform"]) - min(kept["uniform"]) < 0.1  # after the refill, within a few units
    assert min(kept["cost"]) < min(kept["importance"])
    with pytest.raises(InputError, match="strategy must be one of cost, importance, uniform"):
        depgraph.solve(a, target={"macs": 0.5}, strategy="greedy")
