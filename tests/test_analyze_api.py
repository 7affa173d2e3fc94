"""The public contract of ``depgraph.analyze`` and ``Analysis``: no mutation, meta models,
inferred inputs, exclusion, errors that say what to do, summary, networkx export, tied weights."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from zoo import ZOO

import depgraph
from depgraph import Analysis, InputError, TraceError


def _signature(a: Analysis) -> list[tuple[int, list[tuple[str, int, list[list[int]]]]]]:
    """Groups with every member's name, dim and removed indices for each unit."""
    return [
        (g.size, [(m.name, m.dim, [m.indices([u]).tolist() for u in range(g.size)]) for m in g.members])
        for g in a.groups
    ]


# -- the caller's model is not touched ------------------------------------------------


def _fingerprint(model: nn.Module) -> dict[str, Any]:
    state = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        state.update(name.encode())
        state.update(t.detach().numpy().tobytes())
    modules = dict(model.named_modules())
    return {
        "state": state.hexdigest(),
        "ids": [(n, id(t)) for n, t in (*model.named_parameters(), *model.named_buffers())],
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "training": {n: m.training for n, m in modules.items()},
        "hooks": {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in modules.items()},
    }


def test_analyze_leaves_a_training_model_unchanged() -> None:
    model = ZOO["conv_bn_relu"].factory().train()
    model.conv2.eval()
    model.conv1.bias.requires_grad_(False)
    model.bn.register_forward_hook(lambda m, i, o: None)
    model.conv2.register_forward_pre_hook(lambda m, i: None)
    model(*ZOO["conv_bn_relu"].example_inputs())  # running stats and the counter move off their init
    before = _fingerprint(model)
    running_mean = model.bn.running_mean.clone()
    depgraph.analyze(model, ZOO["conv_bn_relu"].example_inputs())
    assert _fingerprint(model) == before
    assert torch.equal(model.bn.running_mean, running_mean)
    assert int(model.bn.num_batches_tracked) == 1


# -- meta models -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["conv_bn_relu", "residual", "concat", "depthwise", "grouped_conv",
                                  "flatten_linear", "attention", "layer_scale", "cls_token"])
def test_a_model_on_the_meta_device_has_the_same_groups(name: str) -> None:
    case = ZOO[name]
    real = depgraph.analyze(case.factory(), case.example_inputs())
    with torch.device("meta"):
        model = case.factory()
    meta = depgraph.analyze(model, tuple(t.to("meta") for t in case.example_inputs()))
    assert real.groups and _signature(meta) == _signature(real)
    assert all(p.is_meta for p in model.parameters())


# -- inferred inputs -------------------------------------------------------------------


class _LanguageModel(nn.Module):
    """Embedding -> residual MLP -> head whose weight is the embedding's (tied)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.up = nn.Linear(6, 8)
        self.down = nn.Linear(8, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: Tensor) -> Tensor:
        h = self.emb(idx)
        return self.head(h + self.down(F.relu(self.up(h))))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))


def _conv1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(3, 5, 3), nn.ReLU(), nn.Conv1d(5, 2, 1))


@pytest.mark.parametrize(
    ("factory", "shape", "dtype", "explicit"),
    [
        (ZOO["classifier"].factory, (1, 4, 224, 224), torch.float32, torch.zeros(1, 4, 8, 8)),
        (_conv1d, (1, 3, 1024), torch.float32, torch.zeros(1, 3, 16)),
        (_mlp, (1, 4), torch.float32, torch.zeros(3, 4)),
        (_LanguageModel, (1, 16), torch.long, torch.zeros(2, 5, dtype=torch.long)),
    ],
)
def test_inputs_are_inferred_from_the_first_layer(factory: Any, shape: tuple[int, ...], dtype: torch.dtype,
                                                  explicit: Tensor) -> None:
    model = factory()
    (inferred,) = depgraph.infer_inputs(model)
    assert (tuple(inferred.shape), inferred.dtype, inferred.device.type) == (shape, dtype, "meta")
    assert _signature(depgraph.analyze(model)) == _signature(depgraph.analyze(model, explicit))


def test_an_input_that_cannot_be_inferred_says_to_pass_example_inputs() -> None:
    with pytest.raises(InputError, match="cannot infer an input for Sequential") as info:
        depgraph.analyze(nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()))
    assert "example_inputs=" in str(info.value)


# -- exclude -----------------------------------------------------------------------------


def test_exclude_pins_every_axis_of_the_module() -> None:
    model = _mlp()
    full = depgraph.analyze(model, torch.zeros(1, 4))
    assert [(g.size, g.layers) for g in full.groups] == [(8, ["0", "2"]), (6, ["2", "4"])]
    kept = depgraph.analyze(model, torch.zeros(1, 4), exclude=["4"])
    assert _signature(kept) == _signature(full)[:1]
    assert [(p.size, p.reason, p.members) for p in kept.pinned if p.size == 6] == [
        (6, "excluded by the caller (4.weight)", (("2.weight", 0), ("2.bias", 0), ("4.weight", 1)))
    ]


def test_excluding_a_grouped_conv_consumer_pins_the_groups_it_reads() -> None:
    case = ZOO["grouped_conv"]
    # restore.weight[1] = Product(conv groups, outputs per group): both go; the per-group
    # input width (reduce's outputs, grouped.weight[1]) stays
    a = depgraph.analyze(case.factory(), case.example_inputs(), exclude=["restore"])
    assert [(g.size, [(m.name, m.dim) for m in g.members]) for g in a.groups] == [
        (2, [("reduce.weight", 0), ("reduce.bias", 0), ("grouped.weight", 1)])
    ]
    assert depgraph.analyze(case.factory(), case.example_inputs(), exclude=["grouped"]).groups == []


def test_exclude_rejects_unknown_names_and_bare_strings() -> None:
    with pytest.raises(InputError, match=r"exclude names modules the model does not have: \['nope'\]"):
        depgraph.analyze(_mlp(), torch.zeros(1, 4), exclude=["0", "nope"])
    with pytest.raises(InputError, match="exclude must be a list of module names"):
        depgraph.analyze(_mlp(), torch.zeros(1, 4), exclude="0")


# -- trace errors ---------------------------------------------------------------------------


class _Gate(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return x
        return -x


def test_data_dependent_control_flow_names_the_module() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), _Gate()))
    with pytest.raises(TraceError, match=r"module '1\.1' \(_Gate\)") as info:
        depgraph.analyze(model, torch.zeros(1, 4), tracer="fx")
    assert "leaf_modules" in str(info.value)


# -- summary, networkx, tied weights -------------------------------------------------------


def test_summary_names_layers_and_unsupported_ops() -> None:
    case = ZOO["no_rule"]
    lines = depgraph.analyze(case.factory(), case.example_inputs()).summary().splitlines()
    assert lines[0].split() == ["group", "units", "members", "layers"]
    # conv1's channels meet the op with no rule (pinned); conv2's outputs are the one group
    assert lines[1].split() == ["0", "6", "3", "conv2,", "conv3"]
    assert lines[2].startswith("1 groups,") and lines[2].endswith("1 unsupported ops")
    assert "unsupported:" in lines[3] and "channel_sort" in lines[3]


def test_to_networkx_has_a_node_per_group_and_member() -> None:
    case = ZOO["concat"]
    g = depgraph.analyze(case.factory(), case.example_inputs()).to_networkx()
    # two groups; a, b weights and biases; c.weight[1] is one node shared by both groups
    assert (g.number_of_nodes(), g.number_of_edges()) == (7, 6)
    assert sorted(g.neighbors(("param", "c.weight", 1))) == [("group", 0), ("group", 1)]
    assert g.nodes[("group", 1)]["size"] == 8


def test_tied_weights_appear_once() -> None:
    a = depgraph.analyze(_LanguageModel(), torch.zeros(2, 5, dtype=torch.long))
    assert [(g.size, [(m.name, m.dim) for m in g.members]) for g in a.groups] == [
        # the residual stream: emb.weight[1] (also head.weight[1], the same tensor) once
        (6, [("emb.weight", 1), ("up.weight", 1), ("down.weight", 0), ("down.bias", 0)]),
        (8, [("up.weight", 0), ("up.bias", 0), ("down.weight", 1)]),
    ]
    assert [p.members for p in a.pinned if p.size == 10] == [(("emb.weight", 0),)]


def test_a_leaf_module_that_cannot_be_related_pins_its_own_parameters():
    class Opaque(torch.nn.Module):  # data-dependent output size: no rule, no ATen lowering
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nonzero_static(x @ self.w, size=4).float().sum() + x

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), Opaque(), torch.nn.Linear(8, 2))
    a = depgraph.analyze(model, torch.zeros(2, 4), leaf_modules=["1"])
    assert a.groups == []
    assert [u.op for u in a.unsupported] == ["Opaque module '1'"]
    reasons = {m: p.reason for p in a.pinned for m in p.members}
    assert reasons[("1.w", 0)] == reasons[("1.w", 1)] == "Opaque module '1' has no rule"


def test_an_atom_only_buffers_contain_is_not_a_group():
    class Positions(torch.nn.Module):  # BERT-style: a long position buffer sliced to the input length
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("position_ids", torch.arange(16)[None])
            self.table = torch.nn.Embedding(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.table(self.position_ids[:, : x.shape[1]])

    a = depgraph.analyze(Positions(), torch.zeros(1, 6, 4))
    assert a.groups == []  # the 10 unused positions touch only the buffer: nothing to learn there


def test_lookup_answers_what_goes_with_an_index() -> None:
    concat = depgraph.analyze(ZOO["concat"].factory(), ZOO["concat"].example_inputs())
    (answer,) = concat.lookup("c.weight", 1, 7)  # input 7 of c is channel 1 of b (after a's 6)
    assert answer.group is concat.groups[1] and answer.unit == 1
    assert answer.removed == {("b.weight", 0): [1], ("b.bias", 0): [1], ("c.weight", 1): [7]}
    assert [c.group.index for c in concat.lookup("c.weight", 1)] == [0, 1]  # both parts of the concat
    (pinned,) = concat.lookup("c.weight", 0, 2)
    assert pinned.group is None and "output" in pinned.pinned
    attention = depgraph.analyze(ZOO["attention"].factory(), ZOO["attention"].example_inputs())
    heads, within = attention.lookup("q.weight", 0, 13)  # 4 heads x 8: head 1, entry 5 of it
    assert (heads.group.size, heads.unit, within.group.size, within.unit) == (4, 1, 8, 5)
    assert heads.removed[("o.weight", 1)] == list(range(8, 16)) and within.removed[("k.weight", 0)] == [5, 13, 21, 29]
    with pytest.raises(depgraph.InputError, match="no parameter or buffer 'c.wieght'; did you mean 'c.weight'"):
        concat.lookup("c.wieght", 1)
    with pytest.raises(depgraph.InputError, match="index 14 is out of range"):
        concat.lookup("c.weight", 1, 14)
    with pytest.raises(depgraph.InputError, match="dim 4 is not one of them"):
        concat.lookup("c.weight", 4)


def test_errors_are_public_and_a_non_module_is_a_type_error() -> None:
    from depgraph.errors import DepgraphError, PlanError

    assert PlanError is depgraph.PlanError and issubclass(PlanError, DepgraphError)
    assert depgraph.InputError.__module__ == "depgraph.errors"
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        depgraph.analyze("torchvision:resnet18", torch.zeros(1, 3, 8, 8))


def test_a_tensor_computed_from_a_buffer_is_not_left_on_the_model() -> None:
    """fx stores ``self.scale[None, :]`` (a real tensor) on the traced root as ``_tensor_constant0``;
    the analysis takes it back, so the model is unchanged and prune accepts its own plan."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)
            self.register_buffer("scale", torch.arange(8.0))

        def forward(self, x: Tensor) -> Tensor:
            return self.fc2(self.fc1(x) * self.scale[None, :])

    model = Scaled().eval()
    before = set(vars(model))
    a = depgraph.analyze(model, torch.zeros(2, 4))
    assert set(vars(model)) == before
    plan = depgraph.solve(a, 0.5)
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="does not compute what the pruned graph computes"):
        pruned = depgraph.prune(model, plan)  # the buffer read as a constant: the graph is returned
    torch.testing.assert_close(pruned(x), depgraph.simulate(model, plan)(x))
