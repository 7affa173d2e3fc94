"""simulate: masks, masked statistics, apply methods, unsimulate."""

import pytest
import torch
from torch import fx, nn

import depgraph


def mlp_with_softmax() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Softmax(-1), nn.Linear(6, 2)).eval()


def values(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    class Record(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            seen[n.name] = result = super().run_node(n)
            return result

    Record(gm).run(x)
    return seen


def test_softmax_over_a_pruned_axis_sees_removed_positions_as_large_negative():
    model, x = mlp_with_softmax(), torch.randn(3, 4)
    a = depgraph.analyze(model, x)
    assert [(g.size, [m.name for m in g.members]) for g in a.groups] == [(6, ["0.weight", "0.bias", "2.weight"])]
    plan = depgraph.Plan.from_keep(a, {0: [0, 2, 3, 5]})
    torch.testing.assert_close(depgraph.simulate(model, plan)(x), depgraph.prune(model, plan)(x))


def test_apply_method_add_puts_a_large_negative_in_removed_output_positions():
    model, x = mlp_with_softmax(), torch.randn(3, 4)
    plan = depgraph.Plan.from_keep(depgraph.analyze(model, x), {0: [0, 2, 3, 5]})
    plan.settings = {"0._output_": {"apply_method": "add"}}
    sim = depgraph.simulate(model, plan)
    shifted = [v for k, v in values(sim, x).items() if k.startswith("masked_add")]
    assert len(shifted) == 1 and (shifted[0][:, [1, 4]] <= -1e8).all() and (shifted[0][:, [0, 2]] > -1e8).all()
    torch.testing.assert_close(sim(x), depgraph.prune(model, plan)(x))


def test_apply_method_bypass_leaves_the_parameter_unmasked_and_the_result_exact():
    model, x = mlp_with_softmax(), torch.randn(3, 4)
    plan = depgraph.Plan.from_keep(depgraph.analyze(model, x), {0: [0, 2, 3, 5]})
    plan.settings = {"0.weight": {"apply_method": "bypass"}}
    sim = depgraph.simulate(model, plan)
    assert not torch.nn.utils.parametrize.is_parametrized(sim.get_submodule("0"), "weight")
    assert torch.nn.utils.parametrize.is_parametrized(sim.get_submodule("0"), "bias")
    torch.testing.assert_close(sim(x), depgraph.prune(model, plan)(x))


def test_unsimulate_removes_masks_and_restores_the_original_function():
    model, x = mlp_with_softmax(), torch.randn(3, 4)
    plan = depgraph.Plan.from_keep(depgraph.analyze(model, x), {0: [0, 2, 3, 5]})
    plan.settings = {"0._output_": {"apply_method": "add"}}
    restored = depgraph.unsimulate(depgraph.simulate(model, plan))
    assert "mask" not in restored.code and "add" not in restored.code
    torch.testing.assert_close(restored(x), model(x))


def test_layer_norm_over_a_pruned_axis_uses_kept_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 4)
    plan = depgraph.Plan.from_keep(depgraph.analyze(model, x), {0: [1, 2, 4, 7]})
    small = depgraph.prune(model, plan)
    assert small[1].normalized_shape == (4,)
    torch.testing.assert_close(depgraph.simulate(model, plan)(x), small(x))


def test_unknown_apply_method_is_a_clear_error():
    model, x = mlp_with_softmax(), torch.randn(3, 4)
    plan = depgraph.Plan.from_keep(depgraph.analyze(model, x), {0: [0]})
    plan.settings = {"0.weight": {"apply_method": "add"}}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(depgraph.InputError, match="'<module>._input_'"):
        depgraph.simulate(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
