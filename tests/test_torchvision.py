"""A slice of torchvision, built with random weights on the meta device (no weight memory):
every op has a rule, the group counts match a count by hand, and the classifier's
class axis is never pruned."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import depgraph
from depgraph import Analysis

NO_AUX = {"aux_logits": False, "init_weights": False}

SLICE: dict[str, tuple[dict[str, Any], int, int | None, str]] = {
    # name: (builder kwargs, image size, groups, classifier)
    #
    # 16 bottlenecks x 2 inner groups (conv1 -> conv2, conv2 -> conv3) + 4 residual streams
    # (conv3 of every block + the first block's downsample, read by the next stage or fc) + the
    # stem (its 64 channels feed layer1.0's conv1 and downsample, which maps them to 256: they
    # are not the first stream) = 32 + 4 + 1
    "resnet50": ({}, 224, 37, "fc"),
    # as resnet50, but conv2 is grouped (32 groups): each block has 3 inner groups (whole conv
    # groups, inputs per group, outputs per group) instead of 2: 16 x 3 + 4 + 1
    "resnext50_32x4d": ({}, 224, 53, "fc"),
    # 58 dense layers x 2 (conv1's 128 bottleneck channels; conv2's 32 new features, read by
    # every later layer of the block through the concatenation) + the stem (conv0's 64) + one
    # per transition conv (3) = 116 + 1 + 3
    "densenet121": ({}, 224, 120, "classifier"),
    # 14 blocks with an expansion conv (expanded channels through the depthwise conv and SE)
    # + 8 SE squeeze widths + 6 streams (16, 24, 40, 80, 112, 160 channels; the stem's 16 is the
    # first, block 1 having no expansion) + the last conv's 960 + the classifier's hidden 1280
    "mobilenet_v3_large": ({}, 224, 30, "classifier.3"),
    # 16 MBConv blocks: 15 expanded widths (block 1 has none: its depthwise conv works on the
    # stem's 32 channels, one group) + 16 SE squeeze widths + 7 stage outputs (stochastic depth
    # is the identity on axes, so residual stages are one stream each) + the head conv's 1280
    # = 15 + 1 + 16 + 7 + 1
    "efficientnet_b0": ({}, 224, 40, "classifier.1"),
    # 18 blocks' MLP hidden widths (4 x dim) + 4 stage streams (patchify/downsample conv rows,
    # depthwise conv, LayerNorms, fc2 rows, layer scale, read by the next downsample or the head)
    "convnext_tiny": ({}, 224, 22, "classifier.2"),
    # the residual stream (768) + per layer its 12 heads and its MLP width (3072): 1 + 12 x 2
    # (head_dim stays whole; see test_vit_heads_per_layer_and_one_residual_stream)
    "vit_b_16": ({}, 224, 25, "heads.head"),
    # 14 blocks x 4 (whole conv groups of the grouped 3x3, inputs and outputs per group, SE
    # squeeze width) + 4 stage streams + the stem = 56 + 4 + 1
    "regnet_y_800mf": ({}, 224, 61, "fc"),
    # 9 inception modules x 6 (4 concatenated branch outputs, 2 reduce convs) + conv1, conv2,
    # conv3 = 54 + 3
    "googlenet": (NO_AUX, 224, 57, "fc"),
    # stem convs 1a, 2a, 2b, 3b, 4a (5); InceptionA x 3: 4 outputs + 3 inner (21); InceptionB:
    # 2 outputs + 2 inner, its max-pool branch passes the input's groups on (4); InceptionC x 4:
    # 4 outputs + 6 inner (40); InceptionD: 2 outputs + 4 inner (6); InceptionE x 2: 6 outputs
    # + 3 inner (18) = 94
    "inception_v3": (NO_AUX, 299, 94, "fc"),
    # counted in test_shufflenet_groups below
    "shufflenet_v2_x1_0": ({}, 224, None, "fc"),
}


@functools.cache
def _analysis(name: str) -> Analysis:
    kwargs, size, _, _ = SLICE[name]
    model = _build(name, kwargs)
    return depgraph.analyze(model, torch.zeros(1, 3, size, size, device="meta"))


def _build(name: str, kwargs: dict[str, Any]) -> nn.Module:
    if name.startswith("regnet"):  # its width schedule is computed with tensors: not on meta
        return getattr(tvm, name)(weights=None, **kwargs)
    with torch.device("meta"):
        return getattr(tvm, name)(weights=None, **kwargs)


@pytest.mark.parametrize("name", list(SLICE))
def test_every_op_has_a_rule(name: str) -> None:
    assert _analysis(name).unsupported == []


@pytest.mark.parametrize("name", [n for n, spec in SLICE.items() if spec[2] is not None])
def test_group_count(name: str) -> None:
    assert len(_analysis(name).groups) == SLICE[name][2]


@pytest.mark.parametrize("name", list(SLICE))
def test_the_class_axis_is_pinned_and_the_classifier_reads_a_group(name: str) -> None:
    a, classifier = _analysis(name), SLICE[name][3]
    members = {(m.name, m.dim) for g in a.groups for m in g.members}
    assert (f"{classifier}.weight", 0) not in members and (f"{classifier}.bias", 0) not in members
    assert (f"{classifier}.weight", 1) in members
    assert _pin_reasons(a, f"{classifier}.weight", 0) == ["axis of a model output"]


def _pin_reasons(a: Analysis, name: str, dim: int) -> list[str]:
    return [p.reason for p in a.pinned if (name, dim) in p.members]


@pytest.mark.parametrize("name", list(SLICE))
def test_every_group_removes_rows_of_some_weight(name: str) -> None:
    for g in _analysis(name).groups:
        assert any(m.dim == 0 and m.name.endswith("weight") for m in g.members), g


def test_resnet50_stem_is_its_own_group() -> None:
    stem = _analysis("resnet50").groups[0]
    assert [(m.name, m.dim) for m in stem.members] == [
        ("conv1.weight", 0), ("bn1.weight", 0), ("bn1.bias", 0), ("bn1.running_mean", 0),
        ("bn1.running_var", 0), ("layer1.0.conv1.weight", 1), ("layer1.0.downsample.0.weight", 1),
    ]


def test_resnext_block_has_three_grouped_conv_groups() -> None:
    groups = [g for g in _analysis("resnext50_32x4d").groups if "layer1.0.conv2" in g.layers]
    # layer1 width 128 = 32 groups x 4 channels
    assert [g.size for g in groups] == [32, 4, 4]
    conv2 = [[m.indices([0]).tolist() for m in g.members if m.name == "layer1.0.conv2.weight"]
             for g in groups]
    assert conv2 == [[[0, 1, 2, 3]], [[0]], [list(range(0, 128, 4))]]


def test_vit_heads_per_layer_and_one_residual_stream() -> None:
    a = _analysis("vit_b_16")
    layers = [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
    stream = {(m.name, m.dim) for m in a.groups[0].members}
    assert a.groups[0].size == 768
    assert {("conv_proj.weight", 0), ("class_token", 2), ("encoder.pos_embedding", 2), ("encoder.ln.weight", 0),
            ("heads.head.weight", 1)} <= stream
    for layer in layers:  # the query width of the packed projection, the rows written into the stream
        assert {(f"{layer}.self_attention.in_proj_weight", 1), (f"{layer}.self_attention.out_proj.weight", 0),
                (f"{layer}.mlp.3.weight", 0), (f"{layer}.ln_1.weight", 0)} <= stream
    # head h: rows h*64 .. h*64+63 of q, of k and of v in the packed projection, out_proj's columns
    head = [i for part in (0, 768, 1536) for i in range(part, part + 64)]
    attn = [f"{layer}.self_attention" for layer in layers]
    assert [(g.size, [(m.name, m.dim, m.indices([0]).tolist()) for m in g.members]) for g in a.groups[1::2]] == [
        (12, [(f"{x}.in_proj_weight", 0, head), (f"{x}.in_proj_bias", 0, head),
              (f"{x}.out_proj.weight", 1, list(range(64)))]) for x in attn]
    assert [g.layers for g in a.groups[2::2]] == [[f"{layer}.mlp.0", f"{layer}.mlp.3"] for layer in layers]
    assert {p.reason for p in a.pinned if (f"{attn[0]}.out_proj.weight", 1) in p.members} == {
        "head_dim of nn.MultiheadAttention (its attention scale reads it)"}


def test_shufflenet_groups() -> None:
    a = _analysis("shufflenet_v2_x1_0")
    inner = [g for g in a.groups if g.layers[0].endswith("branch2.0")]
    # every block's branch2: 1x1 conv -> BN -> depthwise conv -> BN -> 1x1 conv's columns;
    # 4 + 8 + 4 blocks with widths 58, 116, 232
    assert [g.size for g in inner] == [58] * 4 + [116] * 8 + [232] * 4
    assert all(len(g.layers) == 5 and g.layers[4].endswith("branch2.5") for g in inner)
    assert a.groups[0].layers == ["conv1.0", "conv1.1", "stage2.0.branch1.0", "stage2.0.branch1.1",
                                  "stage2.0.branch1.2", "stage2.0.branch2.0"]
    assert a.groups[-1].layers == ["conv5.0", "conv5.1", "fc"]
    # the rest are stream channels: the shuffle interleaves the pass-through half with the branch
    # output, so each starts at the first block of a stage, whose output is cat(branch1, branch2)
    inner_ids = {g.index for g in inner}
    streams = [g for g in a.groups[1:-1] if g.index not in inner_ids]
    assert len(streams) == len(a.groups) - 18
    stages = [g.layers[0].split(".")[0] for g in streams]
    assert sorted(set(stages)) == ["stage2", "stage3", "stage4"]
    for g, stage in zip(streams, stages):
        assert {(f"{stage}.0.branch1.2.weight", 0), (f"{stage}.0.branch2.5.weight", 0)} <= {
            (m.name, m.dim) for m in g.members
        }
