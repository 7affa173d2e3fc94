"""simulate(model, plan)(x) == prune(model, plan)(x) on the zoo and a torchvision slice
(the oracle is :func:`equivalence.check_plan`)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchvision.models as tvm
from equivalence import calibrate, check_plan, random_keep
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torchvision.models.convnext import CNBlockConfig
from zoo import ZOO

import depgraph
from depgraph import Analysis, Plan

SEEDS = (0, 1, 2)


@functools.cache
def _zoo_analysis(name: str) -> Analysis:
    case = ZOO[name]
    return depgraph.analyze(case.factory().eval(), case.example_inputs())


def _check_zoo(name: str, keep: dict[int, Any]) -> None:
    case = ZOO[name]
    plan = Plan.from_keep(_zoo_analysis(name), keep)
    check_plan(case.factory().eval(), case.example_inputs(), plan)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_random_plan(name: str, seed: int) -> None:
    _check_zoo(name, random_keep(_zoo_analysis(name), seed))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_keep_one_unit_everywhere(name: str) -> None:
    analysis = _zoo_analysis(name)
    _check_zoo(name, {g.index: [g.size - 1] for g in analysis.groups})


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_keep_all(name: str) -> None:
    analysis = _zoo_analysis(name)
    _check_zoo(name, {g.index: torch.arange(g.size) for g in analysis.groups})


def test_every_zoo_model_has_a_group() -> None:
    """Otherwise the plans above would prune nothing and prove nothing."""
    assert [name for name in sorted(ZOO) if not _zoo_analysis(name).groups] == []


def test_the_oracle_catches_an_unmasked_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_plan must fail when simulate ignores the plan: otherwise it proves nothing."""
    monkeypatch.setattr(depgraph, "simulate", lambda model, plan: fx.symbolic_trace(copy.deepcopy(model)))
    with pytest.raises(AssertionError, match="max \\|prune - simulate\\|"):
        _check_zoo("conv_bn_relu", {0: [0, 1]})


@st.composite
def _zoo_plans(draw: st.DrawFn) -> tuple[str, dict[int, list[int]]]:
    """A zoo model and, per group, either no entry (keep all) or a non-empty kept subset."""
    name = draw(st.sampled_from(sorted(ZOO)))
    keep = {}
    for g in _zoo_analysis(name).groups:
        units = draw(st.none() | st.sets(st.integers(0, g.size - 1), min_size=1))
        if units is not None:
            keep[g.index] = sorted(units)
    return name, keep


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_zoo_plans())
def test_zoo_any_plan(case: tuple[str, dict[int, list[int]]]) -> None:
    _check_zoo(*case)


# -- torchvision: random weights, small inputs, one random plan each ----------------------

NO_AUX = {"aux_logits": False, "init_weights": False}


def _vit() -> nn.Module:
    """A two-layer ViT. torchvision zero-initialises the head, so the output would be all
    zeros and any two models would agree: the head gets random weights instead."""
    model = tvm.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    nn.init.normal_(model.heads.head.weight, std=0.2)
    return model


def _convnext() -> nn.Module:
    """convnext_tiny's blocks at widths 16 and 32, one block per stage."""
    return tvm.ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10)


def _swin() -> nn.Module:
    """swin_t's blocks (shifted windows, relative position bias) at width 16, two stages."""
    return tvm.SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=10)


TORCHVISION: dict[str, tuple[Callable[[], nn.Module], int]] = {
    # name: (builder with random weights, image size)
    "resnet50": (lambda: tvm.resnet50(weights=None), 64),
    "resnext50_32x4d": (lambda: tvm.resnext50_32x4d(weights=None), 64),
    "densenet121": (lambda: tvm.densenet121(weights=None), 64),
    "mobilenet_v3_large": (lambda: tvm.mobilenet_v3_large(weights=None), 64),
    "efficientnet_b0": (lambda: tvm.efficientnet_b0(weights=None), 64),
    "convnext": (_convnext, 64),
    "vit": (_vit, 32),
    "swin": (_swin, 32),
    "regnet_y_800mf": (lambda: tvm.regnet_y_800mf(weights=None), 64),
    "shufflenet_v2_x1_0": (lambda: tvm.shufflenet_v2_x1_0(weights=None), 64),
    "googlenet": (lambda: tvm.googlenet(weights=None, **NO_AUX), 64),
    "inception_v3": (lambda: tvm.inception_v3(weights=None, **NO_AUX), 80),
}


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_random_plan(name: str) -> None:
    build, size = TORCHVISION[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build()
        x = torch.randn(2, 3, size, size)
    model = calibrate(model, x)
    x = x[:1]
    with torch.no_grad():
        scale = model(x).abs().max().item()
    assert scale > 1e-2, f"output scale {scale:.3g}: the comparison would be vacuous"
    analysis = depgraph.analyze(model, x)
    assert analysis.groups, "nothing to prune: the check would prove nothing"
    check_plan(model, (x,), Plan.from_keep(analysis, random_keep(analysis, seed=0)))
