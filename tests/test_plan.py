"""Plans: save/load, pruned checkpoints, errors, from_masks reconciliation, simulate/unsimulate."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from equivalence import check_plan, fingerprint
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize
from zoo import ZOO

import depgraph
from depgraph import Analysis, Plan, PlanError, Reconciliation

# -- hand-built models ------------------------------------------------------------------


class Heads(nn.Module):
    """fc1's 8 outputs viewed as 2 x 4: the 2 reach the output (pinned), the 4 are one
    group. Pruning it rewrites the ``view`` literal, so ``prune`` returns a GraphModule."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x).view(-1, 2, 4))).flatten(1)


class ConvFlatten(nn.Module):
    """conv (2 channels) -> flatten -> fc: each channel owns 4 consecutive columns of fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).flatten(1))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x + y)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def _x(*shape: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _conv_bn_relu() -> tuple[nn.Module, tuple[Tensor, ...], Analysis]:
    case = ZOO["conv_bn_relu"]
    model, inputs = case.factory().eval(), case.example_inputs()
    return model, inputs, depgraph.analyze(model, inputs)


# -- save / load ----------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    model, _, analysis = _conv_bn_relu()
    plan = Plan.from_keep(analysis, {0: [6, 1, 3]})
    plan = dataclasses.replace(plan, settings={"conv1.weight": {"apply_method": "mul"}})
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.keep.keys() == {0} and loaded.keep[0].tolist() == [1, 3, 6]
    assert loaded.keep[0].dtype == torch.long
    assert loaded.sizes == plan.sizes == {0: 8}
    assert loaded.fingerprint == plan.fingerprint == analysis.fingerprint
    assert loaded.settings == {"conv1.weight": {"apply_method": "mul"}}
    assert [(tuple(x.shape), x.dtype) for x in loaded.inputs] == [((2, 4, 8, 8), torch.float32)]
    shapes = {n: p.shape for n, p in depgraph.prune(model, plan).named_parameters()}
    assert {n: p.shape for n, p in depgraph.prune(model, loaded).named_parameters()} == shapes
    assert shapes["conv1.weight"] == (3, 4, 3, 3) and shapes["conv2.weight"] == (6, 3, 3, 3)


def test_load_rejects_a_file_that_is_not_a_plan(tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(PlanError, match="is not a depgraph plan"):
        Plan.load(path)


@pytest.mark.parametrize("build, shape, graph_module", [(_mlp, (3, 4), False), (Heads, (3, 4), True)])
def test_pruned_checkpoint_reloads_into_a_fresh_model(
    tmp_path: Path, build: Callable[[], nn.Module], shape: tuple[int, ...], graph_module: bool
) -> None:
    model, x = _seeded(build), _x(*shape)
    analysis = depgraph.analyze(model, x)
    plan = Plan.from_keep(analysis, {g.index: list(range(0, g.size, 2)) for g in analysis.groups})
    plan.save(tmp_path / "plan.json")
    small = depgraph.prune(model, plan)
    assert isinstance(small, fx.GraphModule) == graph_module
    torch.save(small.state_dict(), tmp_path / "small.pt")
    small2 = depgraph.prune(_seeded(build, seed=1), Plan.load(tmp_path / "plan.json"))
    assert not torch.equal(small2(x), small(x))  # different weights until the checkpoint is loaded
    small2.load_state_dict(torch.load(tmp_path / "small.pt"))
    assert torch.equal(small2(x), small(x))


# -- errors ---------------------------------------------------------------------------------


def _applied_fails(model: nn.Module, plan: Any, error: type[Exception], match: str) -> None:
    """Both appliers, copying and in place, raise ``error`` and leave ``model`` unchanged."""
    before = fingerprint(model)
    for apply in (depgraph.prune, depgraph.simulate):
        for inplace in (False, True):
            with pytest.raises(error, match=match):
                apply(model, plan, inplace=inplace)
            assert fingerprint(model) == before, f"{apply.__name__}(inplace={inplace}) changed the model"


def test_plan_from_another_model_with_the_same_inputs() -> None:
    _, _, analysis = _conv_bn_relu()
    plan = Plan.from_keep(analysis, {0: [0, 1]})
    residual = ZOO["residual"].factory().eval()  # same input shape, other groups
    _applied_fails(residual, plan, PlanError, r"build the plan from depgraph\.analyze\(\) of this model")


@pytest.mark.parametrize("other", ["attention", "two_inputs"])
def test_plan_from_another_model_with_other_inputs(other: str) -> None:
    """The plan's recorded inputs do not fit the model: still a PlanError that says what to do."""
    _, _, analysis = _conv_bn_relu()
    plan = Plan.from_keep(analysis, {0: [0, 1]})
    model = ZOO["attention"].factory().eval() if other == "attention" else _seeded(TwoInputs)
    _applied_fails(model, plan, PlanError, r"depgraph\.analyze\(\)")


@pytest.mark.parametrize(
    "keep, match",
    [
        ({0: [0, 8]}, r"group 0 has 8 units; kept unit indices must lie in \[0, 8\)"),
        ({0: [-1]}, r"must lie in \[0, 8\)"),
        ({0: []}, "keep at least one"),
        ({3: [0]}, r"group 3 does not exist; the analysis has groups 0\.\.0"),
    ],
)
def test_from_keep_rejects(keep: dict[int, list[int]], match: str) -> None:
    model, _, analysis = _conv_bn_relu()
    before = fingerprint(model)
    with pytest.raises(PlanError, match=match):
        Plan.from_keep(analysis, keep)
    assert fingerprint(model) == before


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"keep": [0, 99]}, r"\[0, 8\)"),
        ({"keep": []}, "keep at least one"),
        ({"index": 3}, "does not exist"),
    ],
)
def test_applying_an_edited_plan_file_rejects(tmp_path: Path, edit: dict[str, Any], match: str) -> None:
    """A plan file edited by hand is checked when applied, not only when built."""
    model, _, analysis = _conv_bn_relu()
    Plan.from_keep(analysis, {0: [0, 1]}).save(tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    data["groups"][0].update(edit)
    (tmp_path / "plan.json").write_text(json.dumps(data))
    _applied_fails(model, Plan.load(tmp_path / "plan.json"), PlanError, match)


def test_applying_something_that_is_not_a_plan() -> None:
    model, _, _ = _conv_bn_relu()
    _applied_fails(model, {0: [0, 1]}, TypeError, r"plan must be a depgraph\.Plan, got dict")


def test_applying_a_plan_to_something_that_is_not_a_module() -> None:
    _, _, analysis = _conv_bn_relu()
    plan = Plan.from_keep(analysis, {0: [0, 1]})
    for apply in (depgraph.prune, depgraph.simulate):
        with pytest.raises(TypeError, match=r"nn\.Module"):
            apply(lambda x: x, plan)


# -- from_masks -------------------------------------------------------------------------------

# Sequential(Linear(4, 6), ReLU, Linear(6, 3)): one group of 6 units with members
# 0.weight dim 0, 0.bias dim 0, 2.weight dim 1. Two masks vote:
#   0.weight       keeps 0, 1, 4    (removes 2, 3, 5)
#   2.weight dim 1 keeps 0, 3, 4    (removes 1, 2, 5)
# 12 voting entries, 6 removed by the masks: requested = 1/2.
MASKS = {
    "0.weight": torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool),
    ("2.weight", 1): torch.tensor([1, 0, 0, 1, 1, 0], dtype=torch.bool),
}


@pytest.mark.parametrize(
    "policy, kept, reconciliation",
    [
        # keeps 0, 1, 3, 4; removes 2, 5 from both members (4 of 12); 1 and 3 were removed
        # by one mask but kept (lost 2); nothing a mask kept is removed (added 0)
        ("union", [0, 1, 3, 4], Reconciliation(6 / 12, 4 / 12, 2, 0)),
        # keeps 0, 4; removes 8 of 12; 1 and 3 were kept by one mask but removed (added 2)
        ("intersection", [0, 4], Reconciliation(6 / 12, 8 / 12, 0, 2)),
    ],
)
def test_from_masks(policy: str, kept: list[int], reconciliation: Reconciliation) -> None:
    model, x = _seeded(_mlp), _x(3, 4)
    analysis = depgraph.analyze(model, x)
    members = [(m.name, m.dim) for m in analysis.groups[0].members]
    assert members == [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]
    plan = Plan.from_masks(analysis, MASKS, policy=policy)
    assert {i: k.tolist() for i, k in plan.keep.items()} == {0: kept}
    assert plan.sizes == {0: 6} and plan.fingerprint == analysis.fingerprint
    assert plan.reconciliation == reconciliation
    check_plan(model, (x,), plan)


def test_from_masks_votes_per_unit_with_half_its_entries() -> None:
    """fc.weight dim 1 has 4 entries per conv channel: channel 0 keeps 2 of 4 (kept),
    channel 1 keeps 1 of 4 (removed)."""
    model, x = _seeded(ConvFlatten), _x(2, 1, 2, 2)
    analysis = depgraph.analyze(model, x)
    [group] = analysis.groups
    assert group.size == 2 and ("fc.weight", 1) in [(m.name, m.dim) for m in group.members]
    mask = torch.tensor([1, 0, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    plan = Plan.from_masks(analysis, {("fc.weight", 1): mask})
    assert {i: k.tolist() for i, k in plan.keep.items()} == {group.index: [0]}
    assert plan.reconciliation == Reconciliation(5 / 8, 4 / 8, 0, 0)


def test_from_masks_rejects() -> None:
    analysis = depgraph.analyze(_seeded(_mlp), _x(3, 4))
    with pytest.raises(PlanError, match="use \\(name, dim\\) of a group member"):
        Plan.from_masks(analysis, {"2.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(PlanError, match="policy must be 'union' or 'intersection'"):
        Plan.from_masks(analysis, MASKS, policy="majority")
    one, two = torch.tensor([1, 0, 0, 0, 0, 0]), torch.tensor([0, 1, 0, 0, 0, 0])
    disjoint = {"0.weight": one, ("2.weight", 1): two}
    with pytest.raises(PlanError, match="use policy='union' or keep a unit"):
        Plan.from_masks(analysis, disjoint, policy="intersection")
    with pytest.raises(PlanError, match="the axis has 6"):
        Plan.from_masks(analysis, {"0.weight": torch.ones(5, dtype=torch.bool)})


# -- simulate / unsimulate / inplace ----------------------------------------------------------


def test_unsimulate_restores_parameters_exactly() -> None:
    model, inputs, analysis = _conv_bn_relu()
    simulated = depgraph.simulate(model, Plan.from_keep(analysis, {0: [2, 5]}))
    assert simulated.conv1.weight[0].abs().sum() == 0
    restored = depgraph.unsimulate(simulated)
    assert restored is simulated
    assert not any(parametrize.is_parametrized(m) for m in restored.modules())
    original = dict(model.named_parameters())
    params = dict(restored.named_parameters())
    assert params.keys() == original.keys()
    assert all(torch.equal(params[n], original[n]) for n in original)
    fresh = ZOO["conv_bn_relu"].factory()
    fresh.load_state_dict(restored.state_dict())  # strict: no mask buffers left behind
    with torch.no_grad():
        assert torch.equal(restored(*inputs), model(*inputs))


def test_simulate_copy_leaves_the_model_alone() -> None:
    model, _, analysis = _conv_bn_relu()
    model.train()
    handle = model.conv1.register_forward_hook(lambda m, i, o: None)
    before = fingerprint(model)
    plan = Plan.from_keep(analysis, {0: [2, 5]})
    simulated = depgraph.simulate(model, plan)
    assert simulated.training and simulated.conv1 is not model.conv1
    depgraph.prune(model, plan)
    assert fingerprint(model) == before
    assert model.training and list(model.conv1._forward_hooks) == [handle.id]


def test_simulate_inplace_parametrizes_the_model() -> None:
    model, _, analysis = _conv_bn_relu()
    weight = model.conv1.weight.detach().clone()
    before = fingerprint(model)
    simulated = depgraph.simulate(model, Plan.from_keep(analysis, {0: [2, 5]}), inplace=True)
    assert fingerprint(model) != before
    assert simulated.conv1 is model.conv1
    assert parametrize.is_parametrized(model.conv1, "weight")
    assert parametrize.is_parametrized(model.bn, "weight")
    assert torch.equal(model.conv1.parametrizations.weight.original, weight)
    removed = [0, 1, 3, 4, 6, 7]
    assert model.conv1.weight[removed].abs().sum() == 0
    assert torch.equal(model.conv1.weight[[2, 5]], weight[[2, 5]])
    assert model.conv2.weight[:, removed].abs().sum() == 0


def test_prune_inplace_shrinks_the_model() -> None:
    model, inputs, analysis = _conv_bn_relu()
    small = depgraph.prune(model, Plan.from_keep(analysis, {0: [2, 5]}), inplace=True)
    assert small is model
    assert model.conv1.weight.shape == (2, 4, 3, 3) and model.conv1.out_channels == 2
    assert model.bn.running_mean.shape == (2,) and model.bn.num_features == 2
    assert model.conv2.weight.shape == (6, 2, 3, 3) and model.conv2.in_channels == 2
    assert model(*inputs).shape == (2, 6, 8, 8)


@pytest.mark.parametrize("build", [_mlp, Heads])
def test_a_plan_made_in_float32_prunes_a_float64_copy(build: Callable[[], nn.Module]) -> None:
    # the checks run the model on the plan's recorded inputs: in the model's dtype, not the plan's
    model, x = _seeded(build), _x(3, 4)
    plan = Plan.from_keep(depgraph.analyze(model, x), {0: [0, 2]})
    wide = _seeded(build).double()
    pruned, simulated = depgraph.prune(wide, plan), depgraph.simulate(wide, plan)
    assert next(pruned.parameters()).dtype == torch.float64
    torch.testing.assert_close(pruned(x.double()), simulated(x.double()))
