"""``depgraph.config``: parsing NNI-3.0-style entries and resolving them into blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import depgraph
from depgraph import InputError
from depgraph.config import Block, parse, resolve


class Branches(nn.Module):
    """Parallel ``Linear(1, n)`` branches concatenated into ``head``: group k is branch k."""

    def __init__(self, *widths: int) -> None:
        super().__init__()
        self.names = "abc"[: len(widths)]
        for name, n in zip(self.names, widths):
            setattr(self, name, nn.Linear(1, n))
        self.head = nn.Linear(sum(widths), 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.cat([F.relu(getattr(self, n)(x)) for n in self.names], -1))


def _resolve(config_list: list[dict], *widths: int) -> tuple[list[Block], dict]:
    return resolve(parse(config_list), depgraph.analyze(Branches(*widths), torch.zeros(1, 1)))


def test_parse_fills_defaults_and_keeps_what_was_given() -> None:
    [c] = parse([{"op_names": ["a"], "sparse_ratio": 0.5, "global_group_id": 3, "apply_method": "add",
                  "target_names": ["weight", "_output_"],
                  "target_settings": {"weight": {"apply_method": "mul"}}}])
    assert c.group_settings == {"sparse_ratio": 0.5, "global_group_id": 3}
    assert (c.granularity, c.targets, c.explicit_targets) == ("out_channel", ("weight", "_output_"), True)
    assert c.dependency is None
    assert c.target_settings == {"weight": {"apply_method": "mul"}, "_output_": {"apply_method": "add"}}
    [d] = parse([{"op_types": ["Linear"]}])
    assert (d.targets, d.explicit_targets, d.target_settings) == (("weight",), False, {})


def test_the_nni_example_parses() -> None:
    configs = parse([
        {"op_names": ["layer1.0.conv2", "conv1"], "sparse_ratio": 0.5, "granularity": "out_channel",
         "dependency_group_id": "res1"},
        {"op_names_re": [r"layer\d\.\d\.conv1"], "sparse_ratio": 0.5, "max_sparse_ratio": 0.8,
         "global_group_id": "g1"},
        {"op_names": ["bn1"], "target_names": ["weight"],
         "target_settings": {"weight": {"align": {"module_name": "conv1", "target_name": "weight",
                                                  "dims": [0]}}}},
    ])
    assert [c.dependency for c in configs] == ["res1", None, None]
    align = configs[2].target_settings["weight"]["align"]
    assert align == {"module_name": "conv1", "target_name": "weight", "dims": (0,)}


@pytest.mark.parametrize("config_list, message", [
    ({"op_names": ["a"]}, "must be a list of dicts"),
    (["a"], r"config_list\[0\] must be a dict"),
    ([{"op_names": "a"}], r"\['op_names'\] must be a list of strings"),
    ([{"op_names_re": ["("]}], "invalid regular expression"),
    ([{"op_names": ["a"], "global_group_id": 1.5}], "must be a string or an integer"),
    ([{"op_names": ["a"], "exclude": True}], "use exclude_op_names"),
    ([{"op_names": ["a"], "sparse_threshold": 0.1}], "thresholds are not supported"),
    ([{"op_names": ["a"], "target_names": ["_input_"], "sparse_ratio": 0.5}], "add 'weight' to target_names"),
    ([{"op_names": ["a"], "align": {"module_name": "b", "target_name": "weight"}}], "exactly the keys"),
    ([{"op_names": ["a"], "max_sparse_ratio": 0}], r"must be a number in \(0, 1\]"),
])
def test_parse_errors(config_list: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse(config_list)


def test_settings_from_several_entries_merge_per_key() -> None:
    config = [{"op_names": ["a"], "sparse_ratio": 0.25}, {"op_names": ["a"], "max_sparse_ratio": 0.5}]
    blocks, _ = _resolve(config, 4, 4)
    assert blocks == [Block((0,), 4, 0.25, 0.0, 0.5), Block((1,), 4)]


def test_dependency_ids_merge_transitively_and_carry_a_global_id() -> None:
    blocks, _ = _resolve([
        {"op_names": ["a", "b"], "dependency_group_id": 1},
        {"op_names": ["b", "c"], "dependency_group_id": 2, "global_group_id": "g", "sparse_ratio": 0.5},
    ], 4, 4, 4)
    assert blocks == [Block((0, 1, 2), 4, 0.5, 0.0, 1.0, "g")]


def test_a_global_block_gets_the_global_ratio() -> None:
    blocks, _ = _resolve([
        {"op_names": ["a"], "global_group_id": "g", "sparse_ratio": 0.5},
        {"op_names": ["b"], "global_group_id": "g", "min_sparse_ratio": 0.25},
    ], 4, 4, 2)
    assert blocks == [Block((0,), 4, 0.5, 0.0, 1.0, "g"), Block((1,), 4, 0.5, 0.25, 1.0, "g"), Block((2,), 2)]


def test_activation_targets_select_nothing_and_are_recorded() -> None:
    config = [{"op_types": ["Linear"], "target_names": ["_input_"], "apply_method": "add"}]
    blocks, recorded = _resolve(config, 4, 4)
    assert blocks == [Block((0,), 4), Block((1,), 4)]
    assert recorded == {f"{m}._input_": {"apply_method": "add"} for m in ("a", "b", "head")}


class _Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.up = nn.ConvTranspose2d(4, 6, 1)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.up(F.relu(self.conv(x)))))


@pytest.mark.parametrize("granularity, group_size", [("out_channel", 6), ("in_channel", 4)])
def test_conv_transpose_weight_axes_are_swapped(granularity: str, group_size: int) -> None:
    a = depgraph.analyze(_Transposed(), torch.zeros(1, 1, 2, 2))
    blocks, _ = resolve(parse([{"op_names": ["up"], "granularity": granularity, "sparse_ratio": 0.5}]), a)
    [chosen] = [b for b in blocks if b.ratio]
    assert chosen.size == group_size
    assert ("up.weight", 1 if granularity == "out_channel" else 0) in {
        (m.name, m.dim) for m in a.groups[chosen.groups[0]].members}
