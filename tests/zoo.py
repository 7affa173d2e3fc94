"""A zoo of tiny hand-written models, one per coupling pattern of DESIGN.md ("Worked cases").

Each model is small (4 to 16 channels, 8x8 images, 5-token sequences; attention
uses a hidden size of 32 = 4 heads x 8) so that its groups can be worked out by
hand, and runs on CPU so that the oracles (shape, simulate-vs-prune) can execute it.

``ZOO`` maps a name to a :class:`Case`: ``factory()`` builds the model with
deterministic weights, ``example_inputs()`` returns a tuple of deterministic CPU
tensors for ``forward``. Both calls leave the global random state untouched.

>>> model = ZOO["conv_bn_relu"].factory()
>>> [tuple(t.shape) for t in ZOO["conv_bn_relu"].example_inputs()]
[(2, 4, 8, 8)]
>>> tuple(model(*ZOO["conv_bn_relu"].example_inputs()).shape)
(2, 6, 8, 8)

Import it from any test as ``from zoo import ZOO`` (``tests/conftest.py`` puts
``tests/`` on ``sys.path``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Branchy", "Case", "ZOO", "channel_sort", "tiny_llama"]

SEED = 0


def _define_channel_sort() -> Callable[[Tensor], Tensor]:
    """``zoo::channel_sort``: sorts the channel axis (dim 1) at every position.

    A custom op with a fake (meta) kernel: shape propagation runs it, but it is opaque
    to ATen lowering (``make_fx`` records it as one call), so no rule can relate it.
    Defined once per process even if this module is imported under two names.
    """
    try:
        return torch.ops.zoo.channel_sort.default
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("zoo::channel_sort", mutates_args=())
    def op(x: Tensor) -> Tensor:
        return torch.sort(x, dim=1).values

    @op.register_fake
    def _(x: Tensor) -> Tensor:
        return torch.empty_like(x)

    return torch.ops.zoo.channel_sort.default


channel_sort = _define_channel_sort()


def _randn(*shape: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(SEED))


# -- convolutions --------------------------------------------------------------


class ConvBNReLU(nn.Module):
    """conv -> BN -> relu -> conv: the 8 channels of ``conv1`` form one group."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.relu(self.bn(self.conv1(x))))

    @staticmethod
    def example_inputs() -> tuple[Tensor, ...]:
        return (_randn(2, 4, 8, 8),)


class Classifier(nn.Module):
    """conv -> BN -> relu -> pool -> flatten -> linear: the model's input channels and
    its class axis are pinned; the 8 hidden channels are one group."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    @staticmethod
    def example_inputs() -> tuple[Tensor, ...]:
        return (_randn(2, 4, 8, 8),)


class Residual(nn.Module):
    """A stream written by ``stem`` and ``conv_b`` (``s + conv_b(conv_a(s))``), read by
    ``conv_a`` and ``head``: one group for the stream, one for the branch's width."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(4, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(8, 6, 3, padding=1)
        self.conv_b = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = F.relu(self.stem(x))
        s = F.relu(s + self.conv_b(F.relu(self.conv_a(s))))
        return self.head(s)

    @staticmethod
    def example_inputs() -> tuple[Tensor, ...]:
        return (_randn(2, 4, 8, 8),)


class Concat(nn.Module):
    """``cat([a(x), b(x)], 1)`` into ``c``: two groups, ``c.weight[1]`` a member of both at offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, padding=1)
        self.b = nn.Conv2d(4, 8, 3, padding=1)
        self.c = nn.Conv2d(14, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(F.relu(torch.cat([self.a(x), self.b(x)], 1)))

    @staticmethod
    def example_inputs() -> tuple[Tensor, ...]:
        return (_randn(2, 4, 8, 8),)


class Depthwise(nn.Module):
    """A depthwise conv with channel multiplier 2 (6 -> 12 channels, groups=6)."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(4, 6, 1)
        self.dw = nn.Conv2d(6, 12, 3, padding=1, groups=6)
        self.project = nn.Conv2d(12, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(F.relu(self.dw(F.relu(self.expand(x)))))

    @staticmethod
    def example_inputs() -> tuple[Tensor, ...]:
        return (_randn(2, 4, 8, 8),)


class GroupedConv(nn.Module):
    """ResNeXt-style: 1x1 conv -> grouped 3x3 (groups=4, 2 inputs and 3 outputs per group) -> 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(4, 8, 1)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.restore = nn.Conv2d(12, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.restore(F.relu(self.grouped(F.relu(self.reduce(x)))))

    @staticmethod
    def example_inputs() -> tuple[Tensor, ...]:
        return (_randn(2, 4, 8, 8),)


class FlattenLinear(nn.Module):
    """conv (6 channels, 4x4 output) -> flatten -> linear: a channel is 16 columns of ``fc1``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(96, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(F.relu(self.conv(x)), 1)
        return self.fc2(F.relu(self.fc1(x)))

    @staticmethod
    def example_inputs() -> tuple[Tensor, ...]:
        return (_randn(2, 4, 8, 8),)


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle (view into 2 x 4, transpose, view back) between two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        b, c, h, w = x.size()
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        return self.conv2(x)

    @staticmethod
    def example_inputs() -> tuple[Tensor, ...]:
        return (_randn(2, 4, 8, 8),)


class NoRule(nn.Module):
    """An op with no rule (the custom op ``zoo::channel_sort``) between two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = channel_sort(F.relu(self.conv1(x)))
        return self.conv3(F.relu(self.conv2(x)))

    @staticmethod
    def example_inputs() -> tuple[Tensor, ...]:
        return (_randn(2, 4, 8, 8),)


# -- tokens and attention -----------------------------------------------------------

HIDDEN, HEADS, HEAD_DIM = 32, 4, 8
SCALE = HEAD_DIM**-0.5


def _attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ * SCALE) v, written with matmul (as most hand-written attention is)."""
    return torch.softmax((q @ k.transpose(-2, -1)) * SCALE, dim=-1) @ v


class _Tokens(nn.Module):
    @staticmethod
    def example_inputs() -> tuple[Tensor, ...]:
        return (_randn(2, 5, HIDDEN),)


class Attention(_Tokens):
    """Separate q/k/v projections viewed into heads with literal sizes (``view(b, n, 4, 8)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(HIDDEN, HIDDEN)
        self.k = nn.Linear(HIDDEN, HIDDEN)
        self.v = nn.Linear(HIDDEN, HIDDEN)
        self.o = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, 8).transpose(1, 2)
        k = self.k(x).view(b, n, 4, 8).transpose(1, 2)
        v = self.v(x).view(b, n, 4, 8).transpose(1, 2)
        return self.o(_attend(q, k, v).transpose(1, 2).reshape(b, n, 32))


class GroupedQueryAttention(_Tokens):
    """4 query heads sharing 2 key/value heads (``repeat_interleave(2, dim=1)``), through
    ``F.scaled_dot_product_attention`` with an explicit scale."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(HIDDEN, HIDDEN)
        self.k = nn.Linear(HIDDEN, 16)
        self.v = nn.Linear(HIDDEN, 16)
        self.o = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, 8).transpose(1, 2)
        k = self.k(x).view(b, n, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
        v = self.v(x).view(b, n, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, scale=SCALE)
        return self.o(y.transpose(1, 2).reshape(b, n, 32))


class FusedQKVChunk(_Tokens):
    """One projection to q, k and v, split with ``chunk(3, -1)``, each viewed into heads."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.o = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q.view(b, n, 4, 8).transpose(1, 2)
        k = k.view(b, n, 4, 8).transpose(1, 2)
        v = v.view(b, n, 4, 8).transpose(1, 2)
        return self.o(_attend(q, k, v).transpose(1, 2).reshape(b, n, 32))


class FusedQKVReshape(_Tokens):
    """timm's ViT attention: ``qkv(x).reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.o = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return self.o(_attend(q, k, v).transpose(1, 2).reshape(b, n, 32))


class IntIndex(nn.Module):
    """A token-mixing linear (6 -> 5 tokens) whose output is read at token 0 (``x[:, 0]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 12)
        self.mix = nn.Linear(6, 5)
        self.head = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mix(self.embed(x).transpose(1, 2)).transpose(1, 2)
        return self.head(h[:, 0])

    @staticmethod
    def example_inputs() -> tuple[Tensor, ...]:
        return (_randn(2, 6, 8),)


class LayerScaleBlock(nn.Module):
    """An MLP branch scaled by a learned per-channel ``gamma`` (CaiT/ConvNeXt layer scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 12)
        self.gamma = nn.Parameter(torch.full((12,), 0.1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gamma * self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    """embed -> residual block with layer scale -> mean over tokens -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 12)
        self.block = LayerScaleBlock()
        self.head = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.embed(x)).mean(1))

    @staticmethod
    def example_inputs() -> tuple[Tensor, ...]:
        return (_randn(2, 5, 8),)


class ClsToken(nn.Module):
    """ViT-style: patches (4x4 conv, 12 channels) with a cls token in front, plus a position
    embedding, normalized; the head reads the cls token (``x[:, 0]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(4, 12, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 12))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 12))
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(x)[:, 0])

    @staticmethod
    def example_inputs() -> tuple[Tensor, ...]:
        return (_randn(2, 4, 8, 8),)


# -- the registry ----------------------------------------------------------------


class Case(NamedTuple):
    """A zoo entry: a model factory and its example inputs (both deterministic)."""

    factory: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple[Tensor, ...]]


def _case(cls: type[nn.Module]) -> Case:
    def factory() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            return cls()

    return Case(factory, cls.example_inputs)  # type: ignore[attr-defined]


ZOO: dict[str, Case] = {
    "conv_bn_relu": _case(ConvBNReLU),
    "classifier": _case(Classifier),
    "residual": _case(Residual),
    "concat": _case(Concat),
    "depthwise": _case(Depthwise),
    "grouped_conv": _case(GroupedConv),
    "flatten_linear": _case(FlattenLinear),
    "channel_shuffle": _case(ChannelShuffle),
    "no_rule": _case(NoRule),
    "attention": _case(Attention),
    "gqa": _case(GroupedQueryAttention),
    "fused_qkv_chunk": _case(FusedQKVChunk),
    "fused_qkv_reshape": _case(FusedQKVReshape),
    "int_index": _case(IntIndex),
    "layer_scale": _case(LayerScale),
    "cls_token": _case(ClsToken),
}
"""Every zoo model by name, in the order of DESIGN.md's worked cases."""


class Branchy(nn.Module):
    """A branch on a tensor's value (fx cannot trace it; the recording tracer can): Linear(8, 6)
    then Linear(6, 2) of the hidden values or of their negation."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.a(x)
        return self.b(y if y.sum() > 0 else -y)


def tiny_llama(layers: int = 1, **config: object) -> nn.Module:
    """A grouped-query ``LlamaForCausalLM`` (64 tokens, hidden 32, MLP 48, 4 query heads on 2
    key/value heads) with seeded random weights, in eval mode; ``config`` overrides fields.
    Skips the calling test where transformers is absent."""
    import pytest

    transformers = pytest.importorskip("transformers")
    settings = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": layers,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32, **config}
    rng = torch.get_rng_state()
    torch.manual_seed(SEED)
    try:
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval()
    finally:
        torch.set_rng_state(rng)
