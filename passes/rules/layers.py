"""Layers with parameters: convolutions, linear, normalizations, embedding, PReLU.

Each rule relates the layer's input and output channel axes to the axes of its
weight and bias (and the running statistics of batch norm, which are members too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..dims import Expr, Product
from .context import Axes, Context, Literal, arg

__all__ = ["RULES"]

KERNEL = "kernel size of a convolution"
SPATIAL = "spatial size computed by a convolution or pooling"
CONVOLVED = "convolved along this axis (a kernel mixes neighbouring positions)"


def _conv(
    cx: Context, x: tuple[Expr, ...], w: tuple[Expr, ...], bias: tuple[Expr, ...] | None, groups: int,
    out: tuple[int, ...], transposed: bool,
) -> tuple[Axes, Expr]:
    """Relate a convolution's input, weight, bias and output channels; pin the kernel axes.
    Returns the output's axes and the axis of the groups (what ``groups`` counts)."""
    for k in w[2:]:
        cx.u.pin(k, KERNEL)
    ch = 1 if len(x) == len(w) else 0
    # weight is (out, in/groups, k...) for conv and (in, out/groups, k...) for transposed conv
    w_in, w_out = (w[0], w[1]) if transposed else (w[1], w[0])
    group = cx.new(groups)
    y_ch: Expr
    if transposed:
        cx.unify(w_in, Product((group, cx.new(w_in.size // groups))))
        cx.unify(x[ch], w_in)
        y_ch = Product((group, w_out))
    else:
        cx.unify(x[ch], Product((group, w_in)))
        cx.unify(w_out, Product((group, cx.new(w_out.size // groups))))
        y_ch = w_out
    if bias is not None:
        cx.unify(bias[0], y_ch)
    cx.pin(x[ch + 1 :], CONVOLVED)  # a kernel mixes neighbouring positions: a learned token there is not prunable
    return (*x[:ch], y_ch, *cx.fresh(out[ch + 1 :], SPATIAL)), group


def _int_attr(cx: Context, node: fx.Node, name: str) -> int:
    """An integer attribute (``groups``, ``num_groups``) of the module called by ``node``."""
    return int(getattr(cx.module(node), name))


def _conv_module(cx: Context, node: fx.Node, transposed: bool) -> Axes:
    w = cx.param(f"{node.target}.weight")
    bias = cx.module_param(node, "bias")
    axes, group = _conv(cx, cx.of(node.args[0]), w, bias, _int_attr(cx, node, "groups"), cx.out(node).shape,
                        transposed)
    cx.measure(node, Literal(None, "groups", attr=True), group)
    return axes


def conv(cx: Context, node: fx.Node) -> Axes:
    """Conv1d/2d/3d: input channels = Product(groups, weight[1]); output = weight[0] =
    Product(groups, per-group outputs); spatial output axes are pinned."""
    return _conv_module(cx, node, transposed=False)


def conv_transpose(cx: Context, node: fx.Node) -> Axes:
    """ConvTranspose1d/2d/3d: weight[0] = input channels = Product(groups, per-group inputs);
    output = Product(groups, weight[1])."""
    return _conv_module(cx, node, transposed=True)


def _f_conv(cx: Context, node: fx.Node, transposed: bool) -> Axes:
    b = arg(node, 2, "bias")
    bias = cx.of(b) if b is not None else None
    groups = cx.value(arg(node, 6, "groups", 1))  # a literal, or a size computed in the graph
    x, w = cx.of(node.args[0]), cx.of(arg(node, 1, "weight"))
    axes, group = _conv(cx, x, w, bias, groups, cx.out(node).shape, transposed)
    cx.measure(node, Literal(6, "groups"), group)
    return axes


def f_conv(cx: Context, node: fx.Node) -> Axes:
    """F.conv1d/2d/3d(x, weight, bias, stride, padding, dilation, groups): as the module,
    with weight and bias as graph values."""
    return _f_conv(cx, node, transposed=False)


def f_conv_transpose(cx: Context, node: fx.Node) -> Axes:
    """F.conv_transpose1d/2d/3d(x, weight, bias, stride, padding, output_padding, groups)."""
    return _f_conv(cx, node, transposed=True)


def linear(cx: Context, node: fx.Node) -> Axes:
    """Linear: input[-1] = weight[1]; output[-1] = weight[0] = bias[0]."""
    x = cx.of(node.args[0])
    w = cx.param(f"{node.target}.weight")
    cx.unify(x[-1], w[1])
    bias = cx.module_param(node, "bias")
    if bias is not None:
        cx.unify(bias[0], w[0])
    return (*x[:-1], w[0])


def f_linear(cx: Context, node: fx.Node) -> Axes:
    """F.linear(x, weight, bias): as the module, with weight and bias as graph values."""
    x, w, b = cx.of(node.args[0]), cx.of(arg(node, 1, "weight")), arg(node, 2, "bias")
    cx.unify(x[-1], w[1])
    if b is not None:
        cx.unify(cx.of(b)[0], w[0])
    return (*x[:-1], w[0])


def _per_channel(cx: Context, channel: Expr, tensors: list[tuple[Expr, ...] | None]) -> None:
    for axes in tensors:
        if axes is not None:
            cx.unify(axes[0], channel)


def _module_state(cx: Context, node: fx.Node, attrs: tuple[str, ...]) -> list[tuple[Expr, ...] | None]:
    return [cx.module_param(node, attr) for attr in attrs]


def _values(cx: Context, node: fx.Node, where: tuple[tuple[int, str], ...]) -> list[tuple[Expr, ...] | None]:
    """Axes of the optional tensor arguments at (position, keyword) ``where``."""
    found = (arg(node, i, name) for i, name in where)
    return [cx.of(a) if cx.is_tensor(a) else None for a in found]


_NORM_STATE = ("weight", "bias", "running_mean", "running_var")


def batch_norm(cx: Context, node: fx.Node) -> Axes:
    """BatchNorm (any dim): every per-channel tensor is the channel axis."""
    x = cx.of(node.args[0])
    _per_channel(cx, x[1 if len(x) > 1 else 0], _module_state(cx, node, _NORM_STATE))
    return x


BATCH_STATISTICS = "batch norm in training mode needs more than one value per channel"


def f_batch_norm(cx: Context, node: fx.Node) -> Axes:
    """F.batch_norm(x, running_mean, running_var, weight, bias, training, ...): per-channel
    tensors on dim 1. In training mode it takes statistics over every other axis, which must
    keep more than one entry (weight standardization normalizes a weight this way)."""
    x = cx.of(node.args[0])
    where = ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))
    _per_channel(cx, x[1 if len(x) > 1 else 0], _values(cx, node, where))
    if arg(node, 5, "training", False) is True and len(x) > 1:
        cx.require(Product((x[0], *x[2:])), 2, BATCH_STATISTICS)
    return x


_INSTANCE_SPATIAL: dict[type, int] = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}


STATISTICS_OVER = "statistics of an instance or group norm are taken over this axis"


def instance_norm(cx: Context, node: fx.Node) -> Axes:
    """InstanceNorm1d/2d/3d: per-channel weight and stats on dim 1 (dim 0 when unbatched);
    the spatial axes it takes statistics over are pinned."""
    x = cx.of(node.args[0])
    spatial = _INSTANCE_SPATIAL[type(cx.module(node))]
    _per_channel(cx, x[len(x) - spatial - 1], _module_state(cx, node, _NORM_STATE))
    cx.pin(x[len(x) - spatial :], STATISTICS_OVER)
    return x


def f_instance_norm(cx: Context, node: fx.Node) -> Axes:
    """F.instance_norm(x, running_mean, running_var, weight, bias, ...): per-channel on dim 1;
    the axes after it (statistics) are pinned."""
    x = cx.of(node.args[0])
    where = ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))
    _per_channel(cx, x[1], _values(cx, node, where))
    cx.pin(x[2:], STATISTICS_OVER)
    return x


def _trailing(cx: Context, x: tuple[Expr, ...], tensors: list[tuple[Expr, ...] | None]) -> None:
    for axes in tensors:
        if axes is not None:
            cx.unify_all(axes, x[len(x) - len(axes) :])


def layer_norm(cx: Context, node: fx.Node) -> Axes:
    """LayerNorm/RMSNorm: weight and bias axes are the trailing normalized axes, which
    ``normalized_shape`` measures."""
    x = cx.of(node.args[0])
    _trailing(cx, x, _module_state(cx, node, ("weight", "bias")))
    k = len(cx.module(node).normalized_shape)
    cx.measure(node, Literal(None, "normalized_shape", attr=True), x[len(x) - k :])
    return x


def f_layer_norm(cx: Context, node: fx.Node) -> Axes:
    """F.layer_norm(x, shape, weight, bias) and F.rms_norm(x, shape, weight): weight and
    bias are the trailing normalized axes, which ``shape`` measures."""
    x = cx.of(node.args[0])
    _trailing(cx, x, _values(cx, node, ((2, "weight"), (3, "bias"))))
    shape = cx.value(arg(node, 1, "normalized_shape"))
    k = 1 if isinstance(shape, int) else len(shape)
    cx.measure(node, Literal(1, "normalized_shape"), x[len(x) - k :])
    return x


def groups_of(cx: Context, channel: Expr, num_groups: int) -> Expr:
    """State channel = Product(groups, channels per group); return the groups' axis."""
    groups = cx.new(num_groups)
    cx.unify(channel, Product((groups, cx.new(channel.size // num_groups))))
    return groups


def group_norm(cx: Context, node: fx.Node) -> Axes:
    """GroupNorm: channels = Product(groups, channels per group), ``num_groups`` measures the
    groups; weight and bias follow the channels."""
    x = cx.of(node.args[0])
    groups = groups_of(cx, x[1], _int_attr(cx, node, "num_groups"))
    cx.measure(node, Literal(None, "num_groups", attr=True), groups)
    _per_channel(cx, x[1], _module_state(cx, node, ("weight", "bias")))
    cx.pin(x[2:], STATISTICS_OVER)
    return x


def f_group_norm(cx: Context, node: fx.Node) -> Axes:
    """F.group_norm(x, num_groups, weight, bias): as the module."""
    x = cx.of(node.args[0])
    groups = groups_of(cx, x[1], cx.value(arg(node, 1, "num_groups")))
    cx.measure(node, Literal(1, "num_groups"), groups)
    _per_channel(cx, x[1], _values(cx, node, ((2, "weight"), (3, "bias"))))
    cx.pin(x[2:], STATISTICS_OVER)
    return x


EMBEDDING_ROWS = "rows of an embedding are addressed by index"


def embedding(cx: Context, node: fx.Node) -> Axes:
    """Embedding: output = indices' axes + weight[1]; the vocabulary axis weight[0] is pinned
    (indices address it)."""
    idx = cx.of(node.args[0])
    w = cx.param(f"{node.target}.weight", (0,), EMBEDDING_ROWS)
    return (*idx, w[1])


def f_embedding(cx: Context, node: fx.Node) -> Axes:
    """F.embedding(indices, weight, ...): as the module, with weight as a graph value."""
    w = cx.of(arg(node, 1, "weight"))
    cx.u.pin(w[0], EMBEDDING_ROWS)
    return (*cx.of(node.args[0]), w[1])


def prelu(cx: Context, node: fx.Node) -> Axes:
    """F.prelu(x, weight): a weight of more than one entry is per channel (dim 1)."""
    x, w = cx.of(node.args[0]), cx.of(arg(node, 1, "weight"))
    if w[0].size > 1:
        cx.unify(w[0], x[1 if len(x) > 1 else 0])
    return x


def prelu_module(cx: Context, node: fx.Node) -> Axes:
    x = cx.of(node.args[0])
    w = cx.param(f"{node.target}.weight")
    if w[0].size > 1:
        cx.unify(w[0], x[1 if len(x) > 1 else 0])
    return x


RULES: dict[object, object] = {
    nn.Conv1d: conv, nn.Conv2d: conv, nn.Conv3d: conv,
    nn.ConvTranspose1d: conv_transpose, nn.ConvTranspose2d: conv_transpose,
    nn.ConvTranspose3d: conv_transpose,
    F.conv1d: f_conv, F.conv2d: f_conv, F.conv3d: f_conv,
    F.conv_transpose1d: f_conv_transpose, F.conv_transpose2d: f_conv_transpose,
    F.conv_transpose3d: f_conv_transpose,
    nn.Linear: linear, F.linear: f_linear,
    nn.BatchNorm1d: batch_norm, nn.BatchNorm2d: batch_norm, nn.BatchNorm3d: batch_norm,
    nn.SyncBatchNorm: batch_norm, F.batch_norm: f_batch_norm,
    nn.InstanceNorm1d: instance_norm, nn.InstanceNorm2d: instance_norm,
    nn.InstanceNorm3d: instance_norm, F.instance_norm: f_instance_norm,
    nn.LayerNorm: layer_norm, nn.RMSNorm: layer_norm,
    F.layer_norm: f_layer_norm, torch.layer_norm: f_layer_norm, F.rms_norm: f_layer_norm,
    nn.GroupNorm: group_norm, F.group_norm: f_group_norm, torch.group_norm: f_group_norm,
    nn.Embedding: embedding, F.embedding: f_embedding,
    nn.PReLU: prelu_module, F.prelu: prelu,
}


def _optional_modules() -> dict[object, object]:
    """Module classes of optional libraries that a rule above describes."""
    try:
        from torchvision.ops import FrozenBatchNorm2d
    except ImportError:
        return {}
    return {FrozenBatchNorm2d: batch_norm}  # weight, bias, running_mean, running_var: one entry per channel


RULES.update(_optional_modules())
