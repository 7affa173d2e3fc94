"""``depgraph.solve``: exact kept sets on tiny models with hand-set weights.

Every expected set below is worked out by hand in the test's comment. Models:

- ``_mlp(rows)``: ``Linear(1, n) -> ReLU -> Linear(n, 1)``, one group of ``n`` units
  with members ``0.weight``, ``0.bias``, ``2.weight``; row ``i`` of ``0.weight`` is
  ``rows[i]``, everything else zero unless given. Under ``l2``/``mean`` unit ``i``
  scores ``|rows[i]| / 3``.
- ``Branches(a, b, c)``: parallel ``Linear(1, n)`` branches concatenated into a zero
  ``head``; group ``k`` is branch ``k`` and scores like the MLP.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import depgraph
from depgraph import Analysis, InputError, Plan


def _mlp(rows: list[float], cols: list[float] | None = None) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(1, len(rows)), nn.ReLU(), nn.Linear(len(rows), 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(rows)[:, None])
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor(cols or [0.0] * len(rows))[None, :])
    return net


class Branches(nn.Module):
    def __init__(self, *rows: list[float]) -> None:
        super().__init__()
        self.names = "abc"[: len(rows)]
        for name, r in zip(self.names, rows):
            layer = nn.Linear(1, len(r))
            with torch.no_grad():
                layer.weight.copy_(torch.tensor(r)[:, None])
                layer.bias.zero_()
            setattr(self, name, layer)
        self.head = nn.Linear(sum(len(r) for r in rows), 1)
        with torch.no_grad():
            self.head.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.cat([F.relu(getattr(self, n)(x)) for n in self.names], -1))


def _analyze(model: nn.Module) -> Analysis:
    return depgraph.analyze(model, torch.zeros(1, 1))


def _kept(plan: Plan) -> dict[int, list[int]]:
    return {i: k.tolist() for i, k in sorted(plan.keep.items())}


def _snapshot(model: nn.Module, a: Analysis) -> Any:
    digest = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        digest.update(name.encode() + t.detach().numpy().tobytes())
    ids = [(n, id(t)) for n, t in (*model.named_parameters(), *model.named_buffers())]
    return digest.hexdigest(), ids, model.training, list(a.groups), dict(a.params), a.fingerprint


# -- importance and per-group ratios ----------------------------------------------------


def test_a_ratio_removes_the_lowest_l2_units_and_the_plan_prunes() -> None:
    net = _mlp([3.0, 1.0, 4.0, 2.0])
    a = _analyze(net)
    assert _kept(depgraph.solve(a, 0.5)) == {0: [0, 2]}  # scores 3, 1, 4, 2 (/3)
    assert _kept(depgraph.solve(a, 0.3)) == {0: [0, 2, 3]}  # floor(0.3 * 4) = 1 unit goes
    assert depgraph.solve(a, 0.2).keep == {}  # floor(0.8) = 0: nothing removed
    small = depgraph.prune(net, depgraph.solve(a, 0.5))
    assert small[0].out_features == 2 and torch.equal(small[0].weight[:, 0], torch.tensor([3.0, 4.0]))


def test_l1_and_l2_rank_differently() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[6.0, 0.0], [3.0, 4.0]]))
        net[0].bias.zero_()
        net[2].weight.zero_()
    a = depgraph.analyze(net, torch.zeros(1, 2))
    assert _kept(depgraph.solve(a, 0.5, importance="l1")) == {0: [1]}  # l1: 6 < 7
    assert _kept(depgraph.solve(a, 0.5, importance="l2")) == {0: [0]}  # l2: 6 > 5


def test_aggregate_over_members() -> None:
    # per member (0.weight, 0.bias, 2.weight): rows [1, 3, 2, 2.5], zeros, cols [2.6, 0, 1.5, 0]
    a = _analyze(_mlp([1.0, 3.0, 2.0, 2.5], [2.6, 0.0, 1.5, 0.0]))
    assert _kept(depgraph.solve(a, 0.5, importance="l1", aggregate="sum")) == {0: [0, 2]}  # 3.6 3 3.5 2.5
    assert _kept(depgraph.solve(a, 0.5, importance="l1", aggregate="mean")) == {0: [0, 2]}  # the same / 3
    assert _kept(depgraph.solve(a, 0.5, importance="l1", aggregate="max")) == {0: [0, 1]}  # 2.6 3 2 2.5


def _conv_bn(bn_weight: list[float]) -> nn.Sequential:
    net = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([10.0, 0.1, 0.1, 10.0]).view(4, 1, 1, 1))
        net[1].weight.copy_(torch.tensor(bn_weight))
    return net


def test_bn_scale_reads_only_normalization_weights() -> None:
    a = depgraph.analyze(_conv_bn([0.5, -2.0, 1.0, 0.1]), torch.zeros(1, 1, 2, 2))
    assert _kept(depgraph.solve(a, 0.5, importance="bn_scale")) == {0: [1, 2]}  # |w|: .5 2 1 .1
    assert _kept(depgraph.solve(a, 0.5, importance="l1", aggregate="max")) == {0: [0, 3]}  # conv rows win


def test_bn_scale_without_a_normalization_names_the_group() -> None:
    with pytest.raises(InputError, match=r"group 0 \(0, 2\) has none: use importance='l2'"):
        depgraph.solve(_analyze(_mlp([1.0, 2.0])), 0.5, importance="bn_scale")


def test_random_is_seeded_and_ignores_the_global_random_state() -> None:
    a = _analyze(_mlp([1.0] * 8))
    torch.manual_seed(1)
    first = _kept(depgraph.solve(a, 0.5, importance="random", seed=3))
    torch.manual_seed(2)
    assert _kept(depgraph.solve(a, 0.5, importance="random", seed=3)) == first
    assert len(first[0]) == 4
    plans = {tuple(_kept(depgraph.solve(a, 0.5, importance="random", seed=s))[0]) for s in range(6)}
    assert len(plans) > 1


def test_a_callable_gets_the_group_and_its_tensors() -> None:
    net = _mlp([1.0, 2.0, 3.0, 4.0])
    seen = {}

    def reverse(group: depgraph.Group, tensors: dict[str, Tensor]) -> Tensor:
        seen.update(size=group.size, names=sorted(tensors), weight=tensors["0.weight"])
        return torch.tensor([4.0, 3.0, 2.0, 1.0])

    assert _kept(depgraph.solve(_analyze(net), 0.5, importance=reverse)) == {0: [0, 1]}
    assert seen["size"] == 4 and seen["names"] == ["0.bias", "0.weight", "2.weight"]
    assert torch.equal(seen["weight"], net[0].weight)
    with pytest.raises(InputError, match=r"returned shape \(3,\) for group 0 \(0, 2\); expected \(4,\)"):
        depgraph.solve(_analyze(net), 0.5, importance=lambda g, t: torch.ones(3))


def test_a_meta_model_needs_random_or_a_callable() -> None:
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    a = depgraph.analyze(net, torch.zeros(1, 2, device="meta"))
    with pytest.raises(InputError, match="meta device.*importance='random' or a callable"):
        depgraph.solve(a, 0.5)
    assert len(depgraph.solve(a, 0.5, importance="random", seed=0).keep[0]) == 2


def test_a_ratio_per_group() -> None:
    a = _analyze(Branches([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [1.0, 1.0]))
    assert _kept(depgraph.solve(a, {1: 0.5, 0: 0.25})) == {0: [1, 2, 3], 1: [0, 1]}
    with pytest.raises(InputError, match=r"sparsity names groups \[7\]; the analysis has groups 0..2"):
        depgraph.solve(a, {7: 0.5})


@pytest.mark.parametrize("ratio, round_to, kept", [
    (0.5, 3, [5, 6, 7]),     # wants 4; multiples of 3 allowed: 3, 6 (and all 8): 3 is nearest
    (0.5, 4, [4, 5, 6, 7]),  # wants 4, a multiple
    (0.75, 3, [5, 6, 7]),    # wants 2; the fewest allowed is 3
    (0.25, 4, None),         # wants 6: 4 and 8 (the whole group) tie, the larger wins
])
def test_round_to_keeps_a_multiple(ratio: float, round_to: int, kept: list[int] | None) -> None:
    a = _analyze(_mlp([float(i + 1) for i in range(8)]))
    plan = depgraph.solve(a, ratio, round_to=round_to)
    assert _kept(plan) == ({0: kept} if kept else {})


def test_round_to_without_an_allowed_multiple_is_an_error() -> None:
    a = _analyze(_mlp([float(i + 1) for i in range(8)]))
    with pytest.raises(InputError, match="round_to=3: group 0 .* must keep between 4 and 4"):
        depgraph.solve(a, 0.5, global_ranking=True, min_sparse_ratio=0.5, max_sparse_ratio=0.5, round_to=3)


# -- global ranking -----------------------------------------------------------------------

# normalized (score / mean score): a = [1, 2, 3, 4] -> .4 .8 1.2 1.6; b = [10, 20, 30, 100] -> .25 .5 .75 2.5
A, B = [1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 100.0]


def test_global_ranking_normalizes_each_group() -> None:
    a = _analyze(Branches(A, B))
    # budget 4 of 8: b0 .25, a0 .4, b1 .5, b2 .75
    assert _kept(depgraph.solve(a, 0.5, global_ranking=True)) == {0: [1, 2, 3], 1: [3]}
    # at most 2 per group: b0, a0, b1, then a1 .8 instead of b2
    assert _kept(depgraph.solve(a, 0.5, global_ranking=True, max_sparse_ratio=0.5)) == {0: [2, 3], 1: [2, 3]}


def test_a_global_group_with_a_minimum_and_an_untouched_group() -> None:
    a = _analyze(Branches(A, B, [1.0, 1.0, 1.0, 1.0]))
    config = [
        {"op_names": ["a"], "global_group_id": "g", "sparse_ratio": 0.5, "min_sparse_ratio": 0.75},
        {"op_names": ["b"], "global_group_id": "g"},
    ]
    # a must lose 3 (a0 a1 a2) and keeps one; the last of the 4 is b's lowest, b0
    assert _kept(depgraph.solve(a, config_list=config)) == {0: [3], 1: [1, 2, 3]}


# -- dependency groups and the combination -------------------------------------------------

# a = [4, 1, 3, 2], b = [1, 5, 1, 4]: together (mean) [2.5, 3, 2, 3]; c = [1, 2, 3, 10]
AB, C = ([4.0, 1.0, 3.0, 2.0], [1.0, 5.0, 1.0, 4.0]), [1.0, 2.0, 3.0, 10.0]


def test_a_dependency_group_keeps_the_same_positions() -> None:
    a = _analyze(Branches(*AB, C))
    alone = [{"op_names": ["a", "b"], "sparse_ratio": 0.5}]
    assert _kept(depgraph.solve(a, config_list=alone)) == {0: [0, 2], 1: [1, 3]}
    together = [{"op_names": ["a", "b"], "sparse_ratio": 0.5, "dependency_group_id": "ab"}]
    assert _kept(depgraph.solve(a, config_list=together)) == {0: [1, 3], 1: [1, 3]}  # drops 2 (2) and 0 (2.5)


def test_a_dependency_group_inside_a_global_group() -> None:
    model = Branches(*AB, C)
    a = _analyze(model)
    before = _snapshot(model, a)
    # normalized: ab = [2.5, 3, 2, 3] / 2.625 = .952 1.143 .762 1.143; c = .25 .5 .75 2.5; budget 4 of 8
    config = [
        {"op_names": ["a", "b"], "dependency_group_id": "ab", "global_group_id": "g", "sparse_ratio": 0.5},
        {"op_names": ["c"], "global_group_id": "g"},
    ]
    assert _kept(depgraph.solve(a, config_list=config)) == {0: [0, 1, 3], 1: [0, 1, 3], 2: [3]}
    config[1]["max_sparse_ratio"] = 0.5  # c loses c0, c1; then ab2 .762 and ab0 .952
    assert _kept(depgraph.solve(a, config_list=config)) == {0: [1, 3], 1: [1, 3], 2: [2, 3]}
    assert _snapshot(model, a) == before


# -- selection -------------------------------------------------------------------------------


def test_selection_by_type_pattern_and_exclusion() -> None:
    a = _analyze(Branches(A, B, C))
    pick = {"op_types": ["Linear"], "op_names_re": ["[ab]"], "sparse_ratio": 0.5}
    assert sorted(depgraph.solve(a, config_list=[pick]).keep) == [0, 1]
    assert sorted(depgraph.solve(a, config_list=[{**pick, "exclude_op_names": ["b"]}]).keep) == [0]
    every = {"op_types": ["Linear"], "sparse_ratio": 0.5, "exclude_op_names_re": ["c"]}
    assert sorted(depgraph.solve(a, config_list=[every]).keep) == [0, 1]  # head's out axis is pinned


def test_in_channel_selects_the_consumer_side() -> None:
    a = _analyze(_mlp([3.0, 1.0, 4.0, 2.0]))
    config = [{"op_names": ["2"], "granularity": "in_channel", "sparse_ratio": 0.5}]
    assert _kept(depgraph.solve(a, config_list=config)) == {0: [0, 2]}
    wide = depgraph.analyze(nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 2)), torch.zeros(1, 1))
    output_pinned = r"selects no prunable out_channel axis \(2.weight dim 0: axis of a model output"
    with pytest.raises(InputError, match=output_pinned):
        depgraph.solve(wide, config_list=[{"op_names": ["2"], "sparse_ratio": 0.5}])


def test_align_within_a_group_is_accepted() -> None:
    a = depgraph.analyze(_conv_bn([0.5, -2.0, 1.0, 0.1]), torch.zeros(1, 1, 2, 2))
    align = {"module_name": "0", "target_name": "weight", "dims": [0]}
    config = [{"op_names": ["1"], "target_settings": {"weight": {"align": align}}},
              {"op_names": ["0"], "sparse_ratio": 0.5}]
    assert _kept(depgraph.solve(a, config_list=config)) == {0: [0, 3]}


def test_apply_methods_are_recorded_and_saved(tmp_path: Any) -> None:
    a = _analyze(Branches(A, B))
    config = [
        {"op_names": ["a"], "sparse_ratio": 0.5, "apply_method": "mul"},
        {"op_names": ["head"], "target_names": ["_input_", "weight"], "apply_method": "bypass",
         "target_settings": {"_input_": {"apply_method": "add"}}},
    ]
    plan = depgraph.solve(a, config_list=config)
    expected = {"a.weight": {"apply_method": "mul"}, "head._input_": {"apply_method": "add"},
                "head.weight": {"apply_method": "bypass"}}
    assert plan.settings == expected and _kept(plan) == {0: [2, 3]}
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").settings == expected


# -- errors: each names the fix, and nothing is modified -------------------------------------


def _cfg(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"config_list": list(entries)}


ALIGN_B_TO_A = {"module_name": "a", "target_name": "weight", "dims": [0]}
_ERRORS = [
    (_cfg({"op_names": ["a"], "sparse_ration": 0.5}), "key 'sparse_ration'; did you mean 'sparse_ratio'"),
    (_cfg({"op_names": ["a"], "sparsity": 0.5}), "NNI 2's name; use sparse_ratio"),
    (_cfg({"op_names": ["a"], "granularity": "per_channel"}), "supported: out_channel, in_channel"),
    (_cfg({"op_names": ["a"], "apply_method": "zero"}), "supported: mul, add, bypass"),
    (_cfg({"op_names": ["a"], "target_names": ["we ight"]}), "targets are parameter or buffer names"),
    (_cfg({"op_names": ["a"], "target_names": ["scale"]}), "targets 'scale', which none of its modules has"),
    (_cfg({"op_names": ["a"], "target_settings": {"bias": {"apply_method": "mul"}}}),
     r"names 'bias', not in target_names \['weight'\]: add it there"),
    (_cfg({"op_names": ["a"], "target_settings": {"weight": {"sparse_ratio": 0.5}}}), "set it at the top"),
    (_cfg({"op_names": ["z"], "sparse_ratio": 0.5}), r"names modules the model does not have: \['z'\]"),
    (_cfg({"op_types": ["Conv2d"], "sparse_ratio": 0.5}), "selects no module .*Linear"),
    (_cfg({"sparse_ratio": 0.5}), "give op_types, op_names or op_names_re"),
    (_cfg({"op_names": ["a"], "sparse_ratio": 1.0}), r"must be a number in \[0, 1\), got 1.0"),
    (_cfg({"op_names": ["a"], "min_sparse_ratio": 0.6, "max_sparse_ratio": 0.4}), "min_sparse_ratio above"),
    (_cfg({"op_names": ["a"], "sparse_ratio": 0.5}, {"op_names": ["a"], "sparse_ratio": 0.25}),
     r"config_list\[0\] and config_list\[1\] give different sparse_ratio \(0.5 vs 0.25\) to the same "
     r"group 0 \(a, head\).*exclude_op_names"),
    (_cfg({"op_names": ["a"], "dependency_group_id": 1, "sparse_ratio": 0.5},
          {"op_names": ["b"], "dependency_group_id": 1, "sparse_ratio": 0.25}),
     r"group 0 \(a, head\) and group 1 \(b, head\), which dependency_group_id prunes together"),
    (_cfg({"op_names": ["a"], "dependency_group_id": 1}, {"op_names": ["c"], "dependency_group_id": 1}),
     r"couples group 0 \(a, head\) \(4 units.*group 2 \(c, head\) \(2 units.*need equal sizes"),
    (_cfg({"op_names": ["a"], "global_group_id": "g", "sparse_ratio": 0.5},
          {"op_names": ["b"], "global_group_id": "g", "sparse_ratio": 0.25}),
     "share global_group_id 'g' but give sparse_ratio 0.5 and sparse_ratio 0.25"),
    (_cfg({"op_names": ["a"], "global_group_id": "g"}), "global_group_id 'g' .* has no sparse_ratio"),
    (_cfg({"op_names": ["a"], "sparse_ratio": 0.5}, {"op_names": ["a"], "max_sparse_ratio": 0.25}),
     r"sparse_ratio 0.5 \(config_list\[0\]\) outside its bound 0.25 \(config_list\[1\]\)"),
    (_cfg({"op_names": ["a", "b"], "global_group_id": "g", "sparse_ratio": 0.75, "max_sparse_ratio": 0.5}),
     "removes 6 of its 8 units .* allow 4"),
    (_cfg({"op_names": ["a"], "apply_method": "mul"}, {"op_names": ["a"], "apply_method": "add"}),
     r"give a.weight different apply_method \('mul' vs 'add'\)"),
    (_cfg({"op_names": ["b"], "align": ALIGN_B_TO_A}),
     "aligns b.weight to a.weight dim 0, but the analysis does not prune them together"),
    ({"config_list": [{"op_names": ["a"]}], "sparsity": 0.5}, "exactly one of sparsity="),
    ({"sparsity": 0.5, "max_sparse_ratio": 0.5}, "apply to global_ranking=True"),
    ({"sparsity": {0: 0.5}, "global_ranking": True}, "needs one fraction for all groups"),
    ({"sparsity": 0.5, "importance": "l3"}, "importance must be one of l1, l2, bn_scale, random"),
    ({"sparsity": 0.5, "round_to": 0}, "round_to must be a positive integer"),
]


@pytest.mark.parametrize("kwargs, message", _ERRORS)
def test_errors_name_the_fix_and_touch_nothing(kwargs: dict[str, Any], message: str) -> None:
    model = Branches(A, B, [1.0, 2.0])
    a = _analyze(model)
    before = _snapshot(model, a)
    with pytest.raises(InputError, match=message):
        depgraph.solve(a, **kwargs)
    assert _snapshot(model, a) == before


# -- reconciling external masks ------------------------------------------------------------------


def test_external_masks_are_reconciled_per_group() -> None:
    a = _analyze(_mlp([1.0, 2.0, 3.0, 4.0]))
    masks = {"0.weight": torch.tensor([True, False, True, False]),
             ("2.weight", 1): torch.tensor([True, True, False, False])}
    union = Plan.from_masks(a, masks)
    assert _kept(union) == {0: [0, 1, 2]}  # only unit 3 is removed by both
    # 8 masked entries, 4 removed by the masks, 2 by the plan; units 1 and 2 lost their removal
    assert union.reconciliation == depgraph.Reconciliation(0.5, 0.25, 2, 0)
    both = Plan.from_masks(a, masks, policy="intersection")
    assert _kept(both) == {0: [0]}
    assert both.reconciliation == depgraph.Reconciliation(0.5, 0.75, 0, 2)
