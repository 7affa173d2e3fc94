"""Elementwise ops: every non-broadcast axis of every tensor input equals the output's.

One rule covers torch functions, ``operator`` functions, Tensor methods (and their
in-place ``_`` variants), activation and dropout functions. Ops not listed here but
tagged ``torch.Tag.pointwise`` in ATen are found by the fallback lowering.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from .context import Axes, Context, broadcast, tensor_args

__all__ = ["RULES", "pointwise"]


def pointwise(cx: Context, node: fx.Node) -> Axes:
    """Broadcasting elementwise op (on plain numbers, as in ``channels // 2``, no axes)."""
    if not cx.is_tensor(node):
        return None
    return broadcast(cx, node, tensor_args(cx, node))


def no_tensor(cx: Context, node: fx.Node) -> Axes:
    """Checks such as ``torch._assert(x.dim() == 3, ...)``: nothing comes out."""
    return None


def identity(cx: Context, node: fx.Node) -> Axes:
    """The output is the first argument, unchanged (contiguous, clone, detach, to, ...)."""
    return cx.axes[node.args[0]]


_ELEMENTWISE = """
abs absolute acos acosh add addcdiv addcmul asin asinh atan atan2 atanh bitwise_and
bitwise_not bitwise_or bitwise_xor ceil clamp clamp_max clamp_min clip cos cosh deg2rad
div divide eq erf erfc erfinv exp exp2 expm1 float_power floor floor_divide fmod frac ge
greater greater_equal gt hypot isfinite isinf isnan le lerp less less_equal lgamma log
log10 log1p log2 logaddexp logical_and logical_not logical_or logical_xor logit lt
maximum minimum mul multiply nan_to_num ne neg negative not_equal pow rad2deg reciprocal
remainder round rsqrt sigmoid sign signbit sin sinh sqrt square sub subtract tan tanh true_divide
trunc where xlogy relu relu6 hardtanh heaviside copysign nextafter fmax fmin
masked_fill
""".split()

_METHOD_ONLY = ["masked_fill"]

_ACTIVATIONS = [
    F.relu, F.relu_, F.relu6, F.elu, F.elu_, F.selu, F.celu, F.leaky_relu, F.leaky_relu_,
    F.rrelu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.hardtanh_, F.hardshrink, F.softshrink, F.tanhshrink, F.softplus, F.softsign,
    F.sigmoid, F.tanh, F.logsigmoid, F.threshold,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.feature_alpha_dropout,
]

_OPERATORS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
    operator.mod, operator.pow, operator.neg, operator.pos, operator.abs, operator.invert,
    operator.and_, operator.or_, operator.xor, operator.eq, operator.ne, operator.lt,
    operator.le, operator.gt, operator.ge, operator.iadd, operator.isub, operator.imul,
    operator.itruediv,
]

_IDENTITY_METHODS = (
    "contiguous clone detach to cpu cuda requires_grad_ float half double bfloat16 int long bool type_as"
).split()


def _table() -> dict[object, object]:
    table: dict[object, object] = {}
    for name in _ELEMENTWISE:
        for space in (torch, torch.special):
            fn = getattr(space, name, None)
            if fn is not None:
                table[fn] = pointwise
        table[name] = pointwise
        table[name + "_"] = pointwise
    for name in _METHOD_ONLY:
        table[name] = pointwise
    for fn in (*_ACTIVATIONS, *_OPERATORS):
        table[fn] = pointwise
    for name in _IDENTITY_METHODS:
        table[name] = identity
    table[torch._assert] = no_tensor
    table[torch.clone] = identity
    table[torch.detach] = identity
    return table


def _optional_identities() -> dict[object, object]:
    """Per-sample ops of optional libraries whose output has the input's axes."""
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:
        return {}
    return {stochastic_depth: identity}  # drops whole samples: channels are untouched


RULES = {**_table(), **_optional_identities()}
