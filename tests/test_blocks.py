"""Removable blocks (``Analysis.blocks``, :mod:`passes.blocks`): the residual branches
``y = x + f(x)`` whose removal (``f`` replaced by zero) leaves every shape valid.

Hand-built models cover each case of the rule (a layer scale, drop path, two branches of
one stream, a nested residual, and what is not a block: a downsampled residual, a branch
read elsewhere, a bias, a gate, a broadcast, a shared module); torchvision and Hugging Face
models check the exact lists of real architectures. Each block is compared by its modules
(and by ``Block.name``, the module holding them all, where that names it).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from zoo import ZOO, tiny_llama

import depgraph
from depgraph import Analysis, Block


def _modules(a: Analysis) -> list[tuple[str, ...]]:
    return [b.modules for b in a.blocks]


class MLP(nn.Module):
    def __init__(self, width: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class Residual(nn.Module):
    """``x + f(x)``, optionally ``x + gamma * f(x)`` (layer scale) and ``x + drop_path(f(x))``."""

    def __init__(self, scale: bool = False, drop: bool = False) -> None:
        super().__init__()
        self.f = MLP()
        self.gamma = nn.Parameter(torch.ones(8)) if scale else None
        self.drop = drop

    def forward(self, x: Tensor) -> Tensor:
        h = self.f(x)
        if self.gamma is not None:
            h = self.gamma * h
        if self.drop:  # drop path as in training: a random per-sample mask, rescaled
            h = h * h.new_empty((h.shape[0], 1)).bernoulli_(0.9) / 0.9
        return x + h


class Parallel(nn.Module):
    """Two branches of one stream: ``x + f(x) + g(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.f, self.g = MLP(), MLP()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.f(x) + self.g(x)


class ReadElsewhere(nn.Module):
    """``x + f(x)`` where ``f``'s output (or an inner value of ``f``) is also read by ``aux``."""

    def __init__(self, inner: bool) -> None:
        super().__init__()
        self.f, self.aux, self.inner = MLP(), nn.Linear(16 if inner else 8, 3), inner

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = F.relu(self.f.fc1(x))
        h = self.f.fc2(hidden)
        return x + h, self.aux(hidden if self.inner else h)


class Downsampled(nn.Module):
    """A ResNet block with a downsample: ``f(x) + down(x)``; neither term is the other's ancestor."""

    def __init__(self) -> None:
        super().__init__()
        self.f, self.down = MLP(8, 16), nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.f(x) + self.down(x)


class Nested(nn.Module):
    """``x + outer(x)`` where ``outer`` holds a residual ``y + inner(y)``."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.inner, self.post = nn.Linear(8, 8), MLP(), nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        y = self.pre(x)
        return x + self.post(y + self.inner(y))


class NotBlocks(nn.Module):
    """Additions that are no blocks: a bias, a gate (a product), a branch that broadcasts the
    stream to a larger shape, a parameter-free branch, and a branch whose module is used again."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(8))
        self.gate, self.wide, self.shared = nn.Linear(8, 8), nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.bias
        x = x * torch.sigmoid(self.gate(x))
        column = x[:, :1]  # (2, 1): the branch's (2, 24) output would widen the sum
        wide = column + self.wide(x)
        x = x + F.relu(x)
        x = x + self.shared(x)
        return self.shared(x) + wide[:, :8]


def _analyze(model: nn.Module, *shape: int, **kwargs: object) -> Analysis:
    return depgraph.analyze(model.eval(), torch.zeros(*shape), **kwargs)


def test_a_residual_mlp_is_one_block_with_its_modules_parameters_and_nodes() -> None:
    a = _analyze(nn.Sequential(Residual(), Residual()), 2, 8)
    first, second = a.blocks
    assert first == Block("add", "input_1", "_0_f_fc2", ("0.f.fc1", "0.f.fc2"),
                          ("0.f.fc1.weight", "0.f.fc1.bias", "0.f.fc2.weight", "0.f.fc2.bias"),
                          ("_0_f_fc1", "relu", "_0_f_fc2"))
    assert (second.name, second.stream) == ("1.f", "add")
    assert str(second) == "1.f: fc1, fc2 (at add_1, stream add)"


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_layer_scale_and_drop_path_are_inside_the_block(tracer: str) -> None:
    model = nn.Sequential(Residual(scale=True), Residual(drop=True)).train()
    a = depgraph.analyze(model, torch.zeros(2, 8), tracer=tracer)
    assert _modules(a) == [("0.f.fc1", "0.f.fc2", "0"), ("1.f.fc1", "1.f.fc2")]
    assert a.blocks[0].params[-1] == "0.gamma"
    assert str(a.blocks[0]).startswith("0: f.fc1, f.fc2, gamma (at ")


def test_two_branches_of_one_stream_are_two_blocks() -> None:
    a = _analyze(Parallel(), 2, 8)
    assert _modules(a) == [("f.fc1", "f.fc2"), ("g.fc1", "g.fc2")]
    assert [b.stream for b in a.blocks] == ["x", "x"]


@pytest.mark.parametrize("inner", [False, True], ids=["output", "inner value"])
def test_a_branch_read_elsewhere_is_not_removable(inner: bool) -> None:
    assert _analyze(ReadElsewhere(inner), 2, 8).blocks == []


def test_a_residual_with_a_downsample_is_not_a_block() -> None:
    assert _analyze(Downsampled(), 2, 8).blocks == []


def test_nested_residuals_list_the_inner_and_the_outer_block() -> None:
    a = _analyze(Nested(), 2, 8)
    assert _modules(a) == [("inner.fc1", "inner.fc2"), ("pre", "inner.fc1", "inner.fc2", "post")]
    assert set(a.blocks[0].nodes) < set(a.blocks[1].nodes)


def test_bias_gate_broadcast_parameter_free_and_shared_branches_are_not_blocks() -> None:
    assert _analyze(NotBlocks(), 2, 8).blocks == []


class BiasInTheSum(nn.Module):
    """``x + (f(x) + b)`` with a bias broadcast over the batch: removing ``f`` makes the inner
    sum ``b``, which is fine for the stream, unless a value also reads the inner sum."""

    def __init__(self, read: bool) -> None:
        super().__init__()
        self.f, self.b, self.read = nn.Linear(8, 8, bias=False), nn.Parameter(torch.zeros(8)), read

    def forward(self, x: Tensor) -> Tensor:
        inner = self.f(x) + self.b
        y = x + inner
        if self.read:
            torch.cat([y, inner], 1)  # computed and never used: it would read b's shape
        return y


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_a_term_whose_inner_sum_something_else_reads_is_no_block_where_removing_it_changes_that_sum_s_shape(
        tracer: str) -> None:
    assert _modules(depgraph.analyze(BiasInTheSum(False).eval(), torch.zeros(2, 8), tracer=tracer)) == [("f",)]
    assert depgraph.analyze(BiasInTheSum(True).eval(), torch.zeros(2, 8), tracer=tracer).blocks == []


def test_zoo_residual_and_a_model_without_additions() -> None:
    case = ZOO["residual"]
    assert _modules(depgraph.analyze(case.factory(), case.example_inputs())) == [("conv_a", "conv_b")]
    case = ZOO["conv_bn_relu"]
    assert depgraph.analyze(case.factory(), case.example_inputs()).blocks == []


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_resnet18_lists_the_blocks_without_a_downsample(tracer: str) -> None:
    a = _analyze(torchvision.models.resnet18(), 1, 3, 32, 32, tracer=tracer)
    assert [b.name for b in a.blocks] == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert a.blocks[2].modules == ("layer2.1.conv1", "layer2.1.bn1", "layer2.1.conv2", "layer2.1.bn2")


def test_mobilenet_v2_lists_the_inverted_residuals_with_a_skip() -> None:
    a = _analyze(torchvision.models.mobilenet_v2(), 1, 3, 32, 32)
    assert [b.name for b in a.blocks] == [f"features.{i}.conv" for i in (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)]
    assert a.blocks[0].modules == tuple(f"features.3.conv.{m}" for m in ("0.0", "0.1", "1.0", "1.1", "2", "3"))


def test_vision_transformer_attention_and_mlp_per_layer() -> None:
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64)
    a = _analyze(model, 1, 3, 32, 32)
    expected = []
    for i in range(2):
        layer = f"encoder.layers.encoder_layer_{i}"
        expected += [(f"{layer}.ln_1", f"{layer}.self_attention"),
                     (f"{layer}.ln_2", f"{layer}.mlp.0", f"{layer}.mlp.3")]
    assert _modules(a) == expected


def test_convnext_blocks_hold_their_layer_scale() -> None:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    model = ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 1)], stochastic_depth_prob=0.1)
    a = _analyze(model, 1, 3, 32, 32)
    assert [b.name for b in a.blocks] == ["features.1.0", "features.1.1", "features.3.0"]
    assert a.blocks[0].modules == ("features.1.0", *(f"features.1.0.block.{i}" for i in (0, 2, 3, 5)))
    assert a.blocks[0].params[0] == "features.1.0.layer_scale"


def _decoder_blocks(prefix: str, layers: int, attention: tuple[str, ...], mlp: tuple[str, ...]) -> list[tuple]:
    expected = []
    for i in range(layers):
        layer = f"{prefix}.{i}"
        expected += [tuple(f"{layer}.{m}" for m in attention), tuple(f"{layer}.{m}" for m in mlp)]
    return expected


def test_llama_attention_and_mlp_per_layer_with_their_pre_norms() -> None:
    a = depgraph.analyze(tiny_llama(2), torch.zeros(1, 5, dtype=torch.long))
    assert a.tracer == "export"
    assert _modules(a) == _decoder_blocks(
        "model.layers", 2,
        ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        ("post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


def test_phi3_fused_projections() -> None:
    from test_hf import _build, _inputs

    a = depgraph.analyze(_build("phi3"), _inputs("phi3"))
    assert _modules(a) == _decoder_blocks(
        "model.model.layers", 2, ("input_layernorm", "self_attn.qkv_proj", "self_attn.o_proj"),
        ("post_attention_layernorm", "mlp.gate_up_proj", "mlp.down_proj"))


def test_gpt2_attention_and_mlp_per_layer() -> None:
    from test_hf import _build, _inputs

    a = depgraph.analyze(_build("gpt2"), _inputs("gpt2"))
    assert _modules(a) == _decoder_blocks(
        "model.transformer.h", 2, ("ln_1", "attn.c_attn", "attn.c_proj"), ("ln_2", "mlp.c_fc", "mlp.c_proj"))


def test_bert_post_norm_blocks_leave_the_norm_after_the_sum_outside() -> None:
    from test_hf import _build, _inputs

    a = depgraph.analyze(_build("bert"), _inputs("bert"))
    assert _modules(a) == _decoder_blocks(
        "model.encoder.layer", 2,
        ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
        ("intermediate.dense", "output.dense"))
    assert not any("LayerNorm" in m for b in a.blocks for m in b.modules)
