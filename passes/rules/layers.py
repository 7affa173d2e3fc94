"""Layers with parameters: convolutions, linear, normalizations, embedding, PReLU.

Each rule relates the layer's input and output channel axes to the axes of its
weight and bias (and the running statistics of batch norm, which are members too).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn

from ..dims import Product
from .context import Axes, Context, arg

__all__ = ["RULES"]

KERNEL = "kernel size of a convolution"
SPATIAL = "spatial size computed by a convolution or pooling"


def _conv(cx: Context, node: fx.Node, transposed: bool) -> Axes:
    m = cx.module(node)
    x = cx.of(node.args[0])
    w = cx.param(f"{node.target}.weight", tuple(range(2, m.weight.ndim)), KERNEL)
    ch = 1 if len(x) == m.weight.ndim else 0
    out = cx.out(node).shape
    # weight is (out, in/groups, k...) for conv and (in, out/groups, k...) for transposed conv
    w_in, w_out = (w[0], w[1]) if transposed else (w[1], w[0])
    group = cx.new(m.groups)
    if transposed:
        cx.unify(w_in, Product((group, cx.new(w_in.size // m.groups))))
        cx.unify(x[ch], w_in)
        y_ch = Product((group, w_out))
    else:
        cx.unify(x[ch], Product((group, w_in)))
        cx.unify(w_out, Product((group, cx.new(w_out.size // m.groups))))
        y_ch = w_out
    bias = cx.module_param(node, "bias")
    if bias is not None:
        cx.unify(bias[0], y_ch)
    return (*x[:ch], y_ch, *cx.fresh(out[ch + 1 :], SPATIAL))


def conv(cx: Context, node: fx.Node) -> Axes:
    """Conv1d/2d/3d: input channels = Product(groups, weight[1]); output = weight[0] =
    Product(groups, per-group outputs); spatial output axes are pinned."""
    return _conv(cx, node, transposed=False)


def conv_transpose(cx: Context, node: fx.Node) -> Axes:
    """ConvTranspose1d/2d/3d: weight[0] = input channels = Product(groups, per-group inputs);
    output = Product(groups, weight[1])."""
    return _conv(cx, node, transposed=True)


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


def batch_norm(cx: Context, node: fx.Node) -> Axes:
    """BatchNorm (any dim): every per-channel tensor is the channel axis."""
    x = cx.of(node.args[0])
    ch = 1 if len(x) > 1 else 0
    for attr in ("weight", "bias", "running_mean", "running_var"):
        axes = cx.module_param(node, attr)
        if axes is not None:
            cx.unify(axes[0], x[ch])
    return x


def instance_norm(cx: Context, node: fx.Node) -> Axes:
    """InstanceNorm1d/2d/3d: per-channel weight and stats on dim 1 (dim 0 when unbatched)."""
    m = cx.module(node)
    x = cx.of(node.args[0])
    spatial = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}[type(m)]
    ch = len(x) - spatial - 1
    for attr in ("weight", "bias", "running_mean", "running_var"):
        axes = cx.module_param(node, attr)
        if axes is not None:
            cx.unify(axes[0], x[ch])
    return x


def layer_norm(cx: Context, node: fx.Node) -> Axes:
    """LayerNorm/RMSNorm: weight and bias axes are the trailing normalized axes."""
    x = cx.of(node.args[0])
    for attr in ("weight", "bias"):
        axes = cx.module_param(node, attr)
        if axes is not None:
            cx.unify_all(axes, x[len(x) - len(axes) :])
    return x


def group_norm(cx: Context, node: fx.Node) -> Axes:
    """GroupNorm: channels = Product(groups, channels per group); weight and bias follow."""
    m = cx.module(node)
    x = cx.of(node.args[0])
    cx.unify(x[1], Product((cx.new(m.num_groups), cx.new(m.num_channels // m.num_groups))))
    for attr in ("weight", "bias"):
        axes = cx.module_param(node, attr)
        if axes is not None:
            cx.unify(axes[0], x[1])
    return x


def embedding(cx: Context, node: fx.Node) -> Axes:
    """Embedding: output = indices' axes + weight[1]; the vocabulary axis weight[0] is pinned
    (indices address it)."""
    idx = cx.of(node.args[0])
    w = cx.param(f"{node.target}.weight", (0,), "rows of an embedding are addressed by index")
    return (*idx, w[1])


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
    nn.Linear: linear, F.linear: f_linear,
    nn.BatchNorm1d: batch_norm, nn.BatchNorm2d: batch_norm, nn.BatchNorm3d: batch_norm,
    nn.SyncBatchNorm: batch_norm,
    nn.InstanceNorm1d: instance_norm, nn.InstanceNorm2d: instance_norm,
    nn.InstanceNorm3d: instance_norm,
    nn.LayerNorm: layer_norm, nn.RMSNorm: layer_norm,
    nn.GroupNorm: group_norm,
    nn.Embedding: embedding,
    nn.PReLU: prelu_module, F.prelu: prelu,
}
