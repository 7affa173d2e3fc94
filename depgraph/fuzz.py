"""Random models composed of ordinary PyTorch idioms, the property every plan must hold on
them, and a minimizer that cuts a failing model down to the ops that matter.

A :class:`Program` is plain data: the example input's shape, a list of :class:`Op` (each
reads earlier values by index and makes one new value) and the values the model returns.
:func:`build` turns it into an ``nn.Module`` whose ``forward`` walks the list (fx and
torch.export unroll the loop); its weights are random but fixed by the program's seed
and each op's id, so a program rebuilds bit for bit. :func:`generate` draws a program
from a seed; :func:`check` runs the property on it; :func:`minimize` deletes ops while
the failure keeps its signature.

The property (:func:`check`): ``analyze`` succeeds or refuses with a
:class:`~depgraph.DepgraphError`; for a random plan (random units of every group, and each
removable block removed with probability one half), ``prune`` and ``simulate`` agree
within 1e-4 of the output's scale at the example's batch size and at another one, in
eval mode and in train mode; the pruned model trains (a backward pass runs); pruning one
group alone gives a model that runs; a plan that keeps every unit computes what the model
computes, pruned and simulated; the caller's model is unchanged.

>>> program = generate(3)
>>> check(program) is None
True
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Op", "Program", "Failure", "KINDS", "generate", "build", "check", "outcome", "minimize", "describe"]

RTOL = 1e-4
"""Allowed max |prune - simulate| relative to the output's scale (``max |y|``, floored at 1e-3)."""

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Op:
    """One step of a program: ``kind`` (a key of :data:`KINDS`) applied to the values
    ``inputs``, with the choices in ``params``; ``id`` names its modules and fixes its
    weights."""

    id: int
    kind: str
    inputs: tuple[int, ...]
    params: tuple[tuple[str, Any], ...] = ()
    shapes: tuple[Shape, ...] = ()
    """The shapes of the inputs in the example: ``run`` branches on these, never on a
    traced tensor's (which torch.fx cannot follow)."""

    def get(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)

    @property
    def rank(self) -> int:
        """The rank of the first input."""
        return len(self.shapes[0])


@dataclass(frozen=True)
class Program:
    """A model as data: the input shape, the ops, and the values it returns (value 0 is
    the input; op ``i`` makes value ``i + 1``)."""

    seed: int
    input_shape: Shape
    ops: tuple[Op, ...]
    outputs: tuple[int, ...]
    tracer: str = "fx"


@dataclass(frozen=True)
class Failure:
    """Why a program broke the property: ``stage`` (analyze, prune, simulate, compare,
    train, group, caller) and a one-line ``message``; ``signature`` groups failures."""

    stage: str
    message: str

    @property
    def signature(self) -> str:
        text = "".join(c if not c.isdigit() else "#" for c in self.message.splitlines()[0] if c)
        return f"{self.stage}: {text[:160]}"


# -- the op catalogue ------------------------------------------------------------------


class FuzzModel(nn.Module):
    """The model a :class:`Program` describes (see :func:`build`)."""

    def __init__(self, program: Program) -> None:
        super().__init__()
        self.program = program
        self.layers = nn.ModuleDict()

    def forward(self, x: torch.Tensor) -> Any:
        values: list[Any] = [x]
        for op in self.program.ops:
            values.append(KINDS[op.kind].run(self, op, *(values[i] for i in op.inputs)))
        outs = tuple(values[i] for i in self.program.outputs)
        return outs[0] if len(outs) == 1 else outs

    def layer(self, op: Op, name: str = "m") -> Any:
        return self.layers[f"{op.id}_{name}"]

    def param(self, op: Op, name: str = "p") -> torch.Tensor:
        return getattr(self, f"p{op.id}_{name}")


@dataclass(frozen=True)
class Kind:
    """An op kind: ``applies`` says whether it takes values of these shapes, ``draw``
    picks its parameters, ``make`` builds its modules and parameters from them (named
    in the returned dict; a ``p_`` prefix puts a parameter at the model's root), ``run``
    computes it. ``arity`` values are read; the first is drawn first, others are drawn
    among the values ``partner`` accepts."""

    run: Callable[..., Any]
    applies: Callable[[Shape], bool]
    draw: Callable[[random.Random, list[Shape]], dict[str, Any] | None] = lambda rng, shapes: {}
    make: Callable[[dict[str, Any], list[Shape]], dict[str, Any]] = lambda params, shapes: {}
    arity: int = 1
    partner: Callable[[Shape, Shape], bool] = lambda a, b: a == b
    weight: float = 1.0


def _img(s: Shape) -> bool:
    return len(s) == 4


def _tok(s: Shape) -> bool:
    return len(s) == 3


def _vec(s: Shape) -> bool:
    return len(s) == 2


def _any(s: Shape) -> bool:
    return len(s) in (2, 3, 4)


def _ch(s: Shape) -> int:
    """The channel (image) or feature (token, vector) width."""
    return s[1] if len(s) == 4 else s[-1]


WIDTHS = (2, 3, 4, 6, 8, 12)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# convolutions ---------------------------------------------------------------------------


def _draw_conv(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    c = shapes[0][1]
    style = rng.choice(["plain", "plain", "grouped", "depthwise", "multiplier"])
    if style == "depthwise":
        return {"out": c, "groups": c, "k": 3, "bias": rng.random() < 0.5}
    if style == "multiplier":
        return {"out": c * rng.choice([2, 3]), "groups": c, "k": rng.choice([1, 3]), "bias": rng.random() < 0.5}
    out = rng.choice(WIDTHS)
    groups = 1
    if style == "grouped":
        common = [g for g in _divisors(c) if out % g == 0 and g > 1]
        if common:
            groups = rng.choice(common)
        else:
            out = c * 2
            groups = rng.choice(_divisors(c))
    return {"out": out, "groups": groups, "k": rng.choice([1, 3]), "bias": rng.random() < 0.7}


def _make_conv(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    return {"m": nn.Conv2d(shapes[0][1], p["out"], p["k"], padding=p["k"] // 2, groups=p["groups"], bias=p["bias"])}


def _draw_conv_t(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    c = shapes[0][1]
    groups = rng.choice(_divisors(c))
    out = groups * rng.choice([1, 2, 3])
    return {"out": out, "groups": groups, "k": rng.choice([1, 3]), "bias": rng.random() < 0.5}


def _make_conv_t(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    k = p["k"]
    return {"m": nn.ConvTranspose2d(shapes[0][1], p["out"], k, padding=k // 2, groups=p["groups"], bias=p["bias"])}


def _draw_f_conv(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    c = shapes[0][1]
    style = rng.choice(["literal", "from_shape", "plain"])
    if style == "from_shape":
        return {"style": style, "out": c, "groups": c}
    groups = rng.choice(_divisors(c)) if style == "literal" else 1
    return {"style": style, "out": groups * rng.choice([1, 2]), "groups": groups}


def _make_f_conv(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    c = shapes[0][1]
    return {"p_w": nn.Parameter(torch.randn(p["out"], c // p["groups"], 3, 3) * 0.3),
            "p_b": nn.Parameter(torch.randn(p["out"]) * 0.1)}


def _run_f_conv(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    groups = x.shape[1] if op.get("style") == "from_shape" else op.get("groups")
    return F.conv2d(x, m.param(op, "w"), m.param(op, "b"), 1, 1, 1, groups)


# normalizations ---------------------------------------------------------------------------


def _make_bn(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    c = _ch(shapes[0])
    bn = nn.BatchNorm2d(c) if _img(shapes[0]) else nn.BatchNorm1d(c)
    bn.running_mean.normal_(0, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.normal_(1, 0.3)
    bn.bias.data.normal_(0, 0.3)
    return {"m": bn}


def _run_bn(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    if op.rank == 3:
        return m.layer(op)(x.transpose(1, 2)).transpose(1, 2)
    return m.layer(op)(x)


def _draw_gn(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    return {"groups": rng.choice(_divisors(shapes[0][1]))}


def _make_gn(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    gn = nn.GroupNorm(p["groups"], shapes[0][1])
    gn.weight.data.normal_(1, 0.3)
    gn.bias.data.normal_(0, 0.3)
    return {"m": gn}


def _draw_ln(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    if _img(shapes[0]):
        return {"over": rng.choice(["c", "chw", "functional"])}
    return {"over": rng.choice(["last", "functional", "rms", "f_rms"])}


def _make_ln(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    s, over = shapes[0], p["over"]
    if over == "chw":
        return {"m": _affine(nn.LayerNorm(list(s[1:])))}
    if over == "rms":
        return {"m": _affine(nn.RMSNorm(s[-1]))}
    if over in ("functional", "f_rms"):
        return {"p_w": nn.Parameter(torch.randn(_ch(s)) * 0.3 + 1), "p_b": nn.Parameter(torch.randn(_ch(s)) * 0.3)}
    return {"m": _affine(nn.LayerNorm(_ch(s)))}


def _affine(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_(0, 0.3)
    return norm


def _run_ln(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    over = op.get("over")
    image = op.rank == 4
    if image and over != "chw":
        x = x.permute(0, 2, 3, 1)
    if over == "functional":
        y = F.layer_norm(x, x.shape[-1:], m.param(op, "w"), m.param(op, "b"))
    elif over == "f_rms":
        y = F.rms_norm(x, (x.size(-1),), m.param(op, "w"))
    else:
        y = m.layer(op)(x)
    return y.permute(0, 3, 1, 2) if image and over != "chw" else y


def _make_in(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    return {"m": _affine(nn.InstanceNorm2d(shapes[0][1], affine=True))}


# activations, pointwise ------------------------------------------------------------------

ACTIVATIONS = ("relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "leaky_relu", "softplus", "module_relu6")


def _draw_act(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    return {"fn": rng.choice(ACTIVATIONS)}


def _make_act(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    return {"m": nn.ReLU6()} if p["fn"] == "module_relu6" else {}


def _run_act(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    fn = op.get("fn")
    if fn == "module_relu6":
        return m.layer(op)(x)
    if fn in ("sigmoid", "tanh"):
        return getattr(torch, fn)(x)
    return getattr(F, fn)(x)


def _draw_scale(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    return {"how": rng.choice(["pow", "sqrt", "numel"])}


def _run_scale(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    """A factor computed from a size at run time (an attention scale)."""
    how = op.get("how")
    axis = 1 if op.rank == 4 else -1
    if how == "pow":
        return x * x.shape[axis] ** -0.5
    if how == "sqrt":
        return x / math.sqrt(x.size(axis))
    return x * (x.shape[0] / x.numel())


def _make_layer_scale(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    s = shapes[0]
    shape = (s[1], 1, 1) if _img(s) else (s[-1],)
    return {"p_g": nn.Parameter(torch.rand(shape) + 0.5)}


def _run_layer_scale(m: FuzzModel, op: Op, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + m.param(op, "g") * y


def _run_add(m: FuzzModel, op: Op, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + y


def _run_mul(m: FuzzModel, op: Op, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(y)


# joining and splitting -----------------------------------------------------------------


def _same_but_channels(a: Shape, b: Shape) -> bool:
    if len(a) != len(b):
        return False
    d = 1 if len(a) == 4 else len(a) - 1
    return a[:d] == b[:d] and a[d + 1 :] == b[d + 1 :]


def _run_cat(m: FuzzModel, op: Op, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, y], 1 if op.rank == 4 else -1)


def _draw_split(rng: random.Random, shapes: list[Shape]) -> dict[str, Any] | None:
    c = _ch(shapes[0])
    if c < 2:
        return None
    style = rng.choice(["split", "chunk", "slice", "narrow"])
    if style == "chunk" and c % 2:
        style = "split"
    first = rng.randint(1, c - 1)
    return {"style": style, "first": first, "take": rng.choice([0, 1, 2])}


def _run_split(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    """One piece of a split, or both pieces joined back in another order (or multiplied)."""
    d = 1 if op.rank == 4 else op.rank - 1
    style, first, take = op.get("style"), op.get("first"), op.get("take")
    c = x.shape[d]
    if style == "chunk":
        a, b = x.chunk(2, d)
    elif style == "slice":
        a, b = (x[:, :first], x[:, first:]) if d == 1 else (x[..., :first], x[..., first:])
    elif style == "narrow":
        a, b = x.narrow(d, 0, first), x.narrow(d, first, c - first)
    else:
        a, b = torch.split(x, [first, c - first], d)
    if take == 2:
        return torch.cat([b, a], d)
    return (a, b)[take]


def _draw_shuffle(rng: random.Random, shapes: list[Shape]) -> dict[str, Any] | None:
    groups = [g for g in _divisors(shapes[0][1]) if 1 < g < shapes[0][1]]
    if not groups:
        return None
    return {"groups": rng.choice(groups), "how": rng.choice(["view", "torch", "module"])}


def _make_shuffle(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    return {"m": nn.ChannelShuffle(p["groups"])} if p["how"] == "module" else {}


def _run_shuffle(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    g, how = op.get("groups"), op.get("how")
    if how == "module":
        return m.layer(op)(x)
    if how == "torch":
        return torch.channel_shuffle(x, g)
    n, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    return x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


# reductions over the channel axis ------------------------------------------------------------

REDUCTIONS = ("mean", "amax", "amin", "var", "std", "logsumexp", "sum", "norm", "prod", "nanmean", "median",
              "var_mean", "softmax", "log_softmax", "softmin", "normalize", "max", "min", "nansum")


def _draw_reduce(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    return {"fn": rng.choice(REDUCTIONS)}


def _run_reduce(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    """``x`` combined with a statistic over its channel axis (a softmax over it)."""
    fn = op.get("fn")
    d = 1 if op.rank == 4 else -1
    if fn in ("softmax", "log_softmax", "softmin"):
        return getattr(F, fn)(x, d)
    if fn == "normalize":
        return F.normalize(x, dim=d)
    if fn in ("max", "min", "median"):
        r = getattr(x, fn)(d, keepdim=True).values
    elif fn == "var_mean":
        v, mu = torch.var_mean(x, d, keepdim=True)
        r = v + mu
    elif fn == "prod":
        r = torch.tanh(x).prod(d, keepdim=True)
    else:
        r = getattr(torch, fn)(x, dim=d, keepdim=True)
    return x - r


# attention on tokens --------------------------------------------------------------------------


def _draw_attention(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    heads = rng.choice([1, 2, 3])
    kv = rng.choice([h for h in _divisors(heads)])
    return {"heads": heads, "kv": kv, "dim": rng.choice([2, 4]), "how": rng.choice(["manual", "sdpa", "sdpa_gqa"]),
            "scale": rng.choice(["literal", "pow", "sqrt"]), "repeat": rng.choice(["expand", "interleave"])}


def _make_attention(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    d, h, kv, hd = shapes[0][-1], p["heads"], p["kv"], p["dim"]
    return {"q": nn.Linear(d, h * hd), "k": nn.Linear(d, kv * hd), "v": nn.Linear(d, kv * hd),
            "o": nn.Linear(h * hd, d)}


def _run_attention(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    h, kv, hd, how = op.get("heads"), op.get("kv"), op.get("dim"), op.get("how")
    b, n = x.shape[0], x.shape[1]
    q = m.layer(op, "q")(x).view(b, n, h, hd).transpose(1, 2)
    k = m.layer(op, "k")(x).view(b, n, kv, -1).transpose(1, 2)
    v = m.layer(op, "v")(x).reshape(b, n, kv, hd).transpose(1, 2)
    if how == "sdpa_gqa" and h != kv:
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    else:
        if h != kv:
            rep = h // kv
            if op.get("repeat") == "expand":
                k = k[:, :, None].expand(b, kv, rep, n, hd).reshape(b, h, n, hd)
                v = v[:, :, None].expand(b, kv, rep, n, hd).reshape(b, h, n, hd)
            else:
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if how == "manual":
            scale = op.get("scale")
            s = q @ k.transpose(-2, -1)
            if scale == "literal":
                s = s * hd**-0.5
            elif scale == "pow":
                s = s * q.shape[-1] ** -0.5
            else:
                s = s / math.sqrt(q.size(-1))
            y = s.softmax(-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
    return m.layer(op, "o")(y.transpose(1, 2).reshape(b, n, h * hd))


def _draw_mha(rng: random.Random, shapes: list[Shape]) -> dict[str, Any] | None:
    d = shapes[0][-1]
    heads = [h for h in _divisors(d) if h < d or d == 1]
    return {"heads": rng.choice(heads), "weights": rng.random() < 0.3}


def _make_mha(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    return {"m": nn.MultiheadAttention(shapes[0][-1], p["heads"], batch_first=True)}


def _run_mha(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    y, w = m.layer(op)(x, x, x, need_weights=op.get("weights"))
    return y + w.sum(-1, keepdim=True) if op.get("weights") else y


def _draw_tokens(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    return {"count": rng.choice([1, 2, 3]), "use": rng.choice(["drop", "keep", "first"])}


def _make_tokens(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    return {"p_t": nn.Parameter(torch.randn(1, p["count"], shapes[0][-1]))}


def _run_tokens(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    """Learned tokens (a cls or register token) prepended to the sequence."""
    t = m.param(op, "t")
    return torch.cat([t.expand(x.shape[0], -1, -1), x], 1)


def _draw_linear(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    return {"out": rng.choice(WIDTHS), "bias": rng.random() < 0.7, "how": rng.choice(["module", "module", "f"])}


def _make_linear(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    d = _ch(shapes[0])
    if p["how"] == "f":
        weight = nn.Parameter(torch.randn(p["out"], d) / math.sqrt(d))
        return {"p_w": weight, "p_b": nn.Parameter(torch.randn(p["out"]))}
    return {"m": nn.Linear(d, p["out"], bias=p["bias"])}


def _run_linear(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    image = op.rank == 4
    if image:
        x = x.permute(0, 2, 3, 1)
    y = F.linear(x, m.param(op, "w"), m.param(op, "b")) if op.get("how") == "f" else m.layer(op)(x)
    return y.permute(0, 3, 1, 2) if image else y


def _run_glu(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, -1 if op.rank != 4 else 1)
    return a * F.silu(b)


# changing kind: image <-> tokens <-> vector ------------------------------------------------


def _run_to_tokens(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def _draw_to_image(rng: random.Random, shapes: list[Shape]) -> dict[str, Any] | None:
    n = shapes[0][1]
    side = math.isqrt(n)
    return {"side": side} if side * side == n and side > 1 else None


def _run_to_image(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    b, d = x.shape[0], x.shape[2]
    return x.transpose(1, 2).reshape(b, d, op.get("side"), -1)


def _draw_pool(rng: random.Random, shapes: list[Shape]) -> dict[str, Any] | None:
    if shapes[0][-1] < 4:
        return None
    return {"how": rng.choice(["max", "avg", "adaptive", "stride_conv"])}


def _make_pool(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    c = shapes[0][1]
    return {"m": nn.Conv2d(c, c, 2, stride=2)} if p["how"] == "stride_conv" else {}


def _run_pool(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    how = op.get("how")
    if how == "max":
        return F.max_pool2d(x, 2)
    if how == "avg":
        return F.avg_pool2d(x, 2)
    if how == "adaptive":
        return F.adaptive_avg_pool2d(x, (op.shapes[0][2] // 2, op.shapes[0][3] // 2))
    return m.layer(op)(x)


def _draw_flatten(rng: random.Random, shapes: list[Shape]) -> dict[str, Any] | None:
    s = shapes[0]
    if _img(s) and s[1] * s[2] * s[3] > 96:
        return {"how": "mean"}
    return {"how": rng.choice(["mean", "flatten", "view"] if _img(s) else ["mean", "first", "amax"])}


def _run_flatten(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    """To a vector: pool, or flatten (channels times positions)."""
    how = op.get("how")
    if op.rank == 4:
        if how == "flatten":
            return torch.flatten(x, 1)
        if how == "view":
            return x.view(x.size(0), -1)
        return x.mean((2, 3))
    if how == "first":
        return x[:, 0]
    if how == "amax":
        return x.amax(1)
    return x.mean(1)


def _draw_se(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    return {"mid": rng.choice([2, 3, 4])}


def _make_se(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    c = shapes[0][1]
    return {"a": nn.Conv2d(c, p["mid"], 1), "b": nn.Conv2d(p["mid"], c, 1)}


def _run_se(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    s = x.mean((2, 3), keepdim=True)
    return x * torch.sigmoid(m.layer(op, "b")(F.relu(m.layer(op, "a")(s))))


def _draw_reuse(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    return {}


def _make_reuse(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    c = _ch(shapes[0])
    return {"m": nn.Conv2d(c, c, 1) if _img(shapes[0]) else nn.Linear(c, c)}


def _run_reuse(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    """One module called twice (shared weights)."""
    layer = m.layer(op)
    y = layer(x)
    return layer(F.relu(y) if op.rank != 4 else torch.tanh(y)) + y


def _run_reshape(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    """A round trip through a reshape whose sizes are read at run time."""
    if op.rank == 4:
        y = x.reshape(x.shape[0], x.shape[1], -1)
        return y.view(x.size(0), x.size(1), x.size(2), x.size(3))
    b, n, d = x.shape[0], x.shape[1], x.shape[2]
    return x.reshape(b * n, d).view(b, n, d)


def _draw_resample(rng: random.Random, shapes: list[Shape]) -> dict[str, Any] | None:
    c, h = shapes[0][1], shapes[0][2]
    options = []
    if c % 4 == 0 and h <= 8:
        options.append("pixel_shuffle")
    if h % 2 == 0 and c <= 6:
        options.append("pixel_unshuffle")
    if h <= 8:
        options += ["nearest", "bilinear", "conv_t2"]
    return {"how": rng.choice(options)} if options else None


def _make_resample(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    c = shapes[0][1]
    return {"m": nn.ConvTranspose2d(c, c, 2, stride=2)} if p["how"] == "conv_t2" else {}


def _run_resample(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    how = op.get("how")
    if how == "pixel_shuffle":
        return F.pixel_shuffle(x, 2)
    if how == "pixel_unshuffle":
        return F.pixel_unshuffle(x, 2)
    if how == "conv_t2":
        return m.layer(op)(x)
    return F.interpolate(x, scale_factor=2, mode=how)


def _draw_pad(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    return {"where": rng.choice(["spatial", "channel", "reflect"]) if _img(shapes[0]) else "last"}


def _run_pad(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    """Padding: the spatial axes (constant or reflect, then cropped back), or the channels."""
    where = op.get("where")
    if where == "channel":
        return F.pad(x, (0, 0, 0, 0, 1, 0))
    if where == "last":
        return F.pad(x, (0, 1))
    y = F.pad(x, (1, 1, 1, 1), mode="reflect" if where == "reflect" else "constant")
    return y[:, :, 1:-1, 1:-1]


def _make_matmul(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    c = _ch(shapes[0])
    return {"p_w": nn.Parameter(torch.randn(c, p["out"]) / math.sqrt(c)), "p_b": nn.Parameter(torch.randn(p["out"]))}


def _draw_matmul(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    return {"out": rng.choice(WIDTHS), "how": rng.choice(["matmul", "einsum", "bmm"])}


def _run_matmul(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    """A product with a weight at the model's root: ``x @ W``, an einsum, or a bmm."""
    w, b, how = m.param(op, "w"), m.param(op, "b"), op.get("how")
    if op.rank == 4:
        if how == "einsum":
            return torch.einsum("bchw,cd->bdhw", x, w) + b[:, None, None]
        return (x.permute(0, 2, 3, 1) @ w + b).permute(0, 3, 1, 2)
    if how == "einsum":
        return torch.einsum("...d,de->...e", x, w) + b
    if how == "bmm" and op.rank == 3:
        return torch.bmm(x, w.expand(x.shape[0], -1, -1)) + b
    return x @ w + b


def _draw_affine(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    return {"how": rng.choice(["bias", "prelu_module", "prelu_f", "clamp", "where", "masked_fill", "pow"])}


def _make_affine(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    c, how = _ch(shapes[0]), p["how"]
    if how == "prelu_module":
        return {"m": nn.PReLU(c)}
    if how in ("bias", "prelu_f"):
        shape = (c, 1, 1) if _img(shapes[0]) and how == "bias" else (c,)
        return {"p_v": nn.Parameter(torch.randn(shape) * 0.3)}
    return {}


def _run_affine(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    """Elementwise ops with a per-channel parameter or a constant."""
    how = op.get("how")
    if how == "bias":
        return x + m.param(op, "v")
    if how in ("prelu_module", "prelu_f"):  # PReLU's weight is per channel: dim 1
        prelu = m.layer(op) if how == "prelu_module" else (lambda t: F.prelu(t, m.param(op, "v")))
        return prelu(x) if op.rank != 3 else prelu(x.transpose(1, 2)).transpose(1, 2)
    if how == "clamp":
        return x.clamp(-0.5, 1.0) + F.hardtanh(x)
    if how == "where":
        return torch.where(x > 0, x, 0.1 * x)
    if how == "masked_fill":
        return x.masked_fill(x < -0.5, 0.25)
    return torch.pow(x, 2) + x.abs().sqrt()


def _draw_positional(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    return {"how": rng.choice(["cumsum", "flip", "roll", "step", "index", "lrn", "softmax2d", "repeat", "interleave"])}


def _make_positional(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    return {"m": nn.Softmax2d()} if p["how"] == "softmax2d" and _img(shapes[0]) else {}


def _run_positional(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    """Ops that read positions along the channel axis (their axis must stay whole, or be
    pruned consistently)."""
    how = op.get("how")
    d = 1 if op.rank == 4 else op.rank - 1
    if how == "cumsum":
        return x.cumsum(d)
    if how == "flip":
        return x.flip(d)
    if how == "roll":
        return x.roll(1, d)
    if how == "step":
        return torch.cat([x, x.narrow(d, 0, 1)], d)[:, ::2] if d == 1 else x[..., ::2]
    if how == "index":
        return x[:, [0, 0]] if d == 1 else x[..., [0, 0]]
    if how == "lrn" and op.rank >= 3:
        return F.local_response_norm(x if d == 1 else x.transpose(1, 2), 2) if d == 1 else \
            F.local_response_norm(x.transpose(1, 2), 2).transpose(1, 2)
    if how == "softmax2d" and op.rank == 4:
        return m.layer(op)(x)
    if how == "repeat":
        return x.repeat(*([1, 2] + [1] * (op.rank - 2))) if d == 1 else x.repeat(*([1] * (op.rank - 1) + [2]))
    return x.repeat_interleave(2, dim=d)


def _draw_conv1d(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    d, n = shapes[0][-1], shapes[0][1]
    recurrent = ["gru", "lstm"] if n <= 16 else []  # torch.export unrolls a recurrent layer over the sequence
    return {"out": rng.choice(WIDTHS), "groups": rng.choice([g for g in _divisors(d) if g in (1, d)]),
            "how": rng.choice(["conv1d", *recurrent])}


def _make_conv1d(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    d = shapes[0][-1]
    if p["how"] == "gru":
        return {"m": nn.GRU(d, p["out"], batch_first=True)}
    if p["how"] == "lstm":
        return {"m": nn.LSTM(d, p["out"], batch_first=True, bidirectional=True)}
    out = p["out"] * p["groups"] if p["groups"] > 1 else p["out"]
    return {"m": nn.Conv1d(d, out, 3, padding=1, groups=p["groups"])}


def _run_conv1d(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    """Along the sequence: a Conv1d over the features as channels, or a recurrent layer."""
    if op.get("how") in ("gru", "lstm"):
        return m.layer(op)(x)[0]
    return m.layer(op)(x.transpose(1, 2)).transpose(1, 2)


def _draw_bmm_attention(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    return {"heads": rng.choice([1, 2, 3]), "dim": rng.choice([2, 3])}


def _make_bmm_attention(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    d, h, hd = shapes[0][-1], p["heads"], p["dim"]
    return {"qkv": nn.Linear(d, 3 * h * hd), "o": nn.Linear(h * hd, d)}


def _run_bmm_attention(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    """A fused qkv projection split three ways, heads folded into the batch (bmm)."""
    h, hd = op.get("heads"), op.get("dim")
    b, n = x.shape[0], x.shape[1]
    q, k, v = m.layer(op, "qkv")(x).split(h * hd, -1)
    q, k, v = (t.reshape(b, n, h, hd).transpose(1, 2).reshape(b * h, n, hd) for t in (q, k, v))
    a = torch.softmax(torch.bmm(q, k.transpose(1, 2)) / hd**0.5, -1)
    y = torch.bmm(a, v).reshape(b, h, n, hd).transpose(1, 2).reshape(b, n, h * hd)
    return m.layer(op, "o")(y)


def _draw_project(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    return {}


def _make_project(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    a, b = _ch(shapes[0]), _ch(shapes[1])
    return {"m": nn.Conv2d(a, b, 1) if _img(shapes[0]) else nn.Linear(a, b)}


def _run_project(m: FuzzModel, op: Op, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A shortcut: ``x`` projected to ``y``'s width, added to ``y``."""
    if op.rank == 4:
        return m.layer(op)(x) + y
    return m.layer(op)(x) + y


def _draw_ws_conv(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    return {"out": rng.choice(WIDTHS), "k": rng.choice([1, 3])}


def _make_ws_conv(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    return {"m": nn.Conv2d(shapes[0][1], p["out"], p["k"], padding=p["k"] // 2)}


def _run_ws_conv(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    """A weight-standardized conv (timm's ScaledStdConv2d): the weight normalized over its
    inputs by F.batch_norm in training mode."""
    conv = m.layer(op)
    w = F.batch_norm(conv.weight.reshape(1, conv.out_channels, -1), None, None, training=True, momentum=0.0)
    return F.conv2d(x, w.reshape_as(conv.weight), conv.bias, 1, op.get("k") // 2)


def _draw_einsum_attention(rng: random.Random, shapes: list[Shape]) -> dict[str, Any]:
    return {"heads": rng.choice([1, 2]), "dim": rng.choice([2, 3])}


def _run_einsum_attention(m: FuzzModel, op: Op, x: torch.Tensor) -> torch.Tensor:
    """Attention written with einsum, heads split by unflatten."""
    h, hd = op.get("heads"), op.get("dim")
    q, k, v = (m.layer(op, n)(x).unflatten(-1, (h, hd)) for n in ("q", "k", "v"))
    a = torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(-1)
    return m.layer(op, "o")(torch.einsum("bhqk,bkhd->bqhd", a, v).flatten(2))


def _make_einsum_attention(p: dict[str, Any], shapes: list[Shape]) -> dict[str, Any]:
    d, width = shapes[0][-1], p["heads"] * p["dim"]
    return {"q": nn.Linear(d, width), "k": nn.Linear(d, width), "v": nn.Linear(d, width), "o": nn.Linear(width, d)}


def _run_stack(m: FuzzModel, op: Op, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Two values stacked on a new axis and combined over it."""
    s = torch.stack([x, y], 1)
    return s.amax(1) + s.mean(1)


KINDS: dict[str, Kind] = {
    "conv": Kind(lambda m, op, x: m.layer(op)(x), _img, _draw_conv, _make_conv, weight=3.0),
    "conv_t": Kind(lambda m, op, x: m.layer(op)(x), _img, _draw_conv_t, _make_conv_t),
    "f_conv": Kind(_run_f_conv, _img, _draw_f_conv, _make_f_conv),
    "bn": Kind(_run_bn, lambda s: len(s) in (2, 3, 4), make=_make_bn, weight=1.5),
    "gn": Kind(lambda m, op, x: m.layer(op)(x), _img, _draw_gn, _make_gn),
    "ln": Kind(_run_ln, lambda s: _img(s) or _tok(s), _draw_ln, _make_ln, weight=1.5),
    "in": Kind(lambda m, op, x: m.layer(op)(x), _img, make=_make_in, weight=0.5),
    "act": Kind(_run_act, _any, _draw_act, _make_act, weight=2.0),
    "scale": Kind(_run_scale, lambda s: _img(s) or _tok(s), _draw_scale, weight=0.5),
    "add": Kind(_run_add, _any, arity=2, weight=2.0),
    "mul": Kind(_run_mul, _any, arity=2, weight=0.5),
    "layer_scale": Kind(_run_layer_scale, lambda s: _img(s) or _tok(s), make=_make_layer_scale, arity=2),
    "cat": Kind(_run_cat, _any, arity=2, partner=_same_but_channels, weight=1.5),
    "split": Kind(_run_split, _any, _draw_split),
    "shuffle": Kind(_run_shuffle, _img, _draw_shuffle, _make_shuffle),
    "reduce": Kind(_run_reduce, lambda s: _img(s) or _tok(s), _draw_reduce),
    "attention": Kind(_run_attention, _tok, _draw_attention, _make_attention, weight=1.5),
    "mha": Kind(_run_mha, _tok, _draw_mha, _make_mha, weight=0.7),
    "tokens": Kind(_run_tokens, _tok, _draw_tokens, _make_tokens, weight=0.5),
    "linear": Kind(_run_linear, _any, _draw_linear, _make_linear, weight=2.0),
    "glu": Kind(_run_glu, lambda s: _ch(s) % 2 == 0 and _any(s), weight=0.5),
    "to_tokens": Kind(_run_to_tokens, _img),
    "to_image": Kind(_run_to_image, _tok, _draw_to_image, weight=0.5),
    "pool": Kind(_run_pool, _img, _draw_pool, _make_pool, weight=0.7),
    "flatten": Kind(_run_flatten, lambda s: _img(s) or _tok(s), _draw_flatten, weight=0.5),
    "se": Kind(_run_se, _img, _draw_se, _make_se, weight=0.7),
    "reuse": Kind(_run_reuse, _any, _draw_reuse, _make_reuse, weight=0.7),
    "reshape": Kind(_run_reshape, lambda s: _img(s) or _tok(s), weight=0.5),
    "resample": Kind(_run_resample, _img, _draw_resample, _make_resample, weight=0.5),
    "pad": Kind(_run_pad, lambda s: _img(s) or _tok(s), _draw_pad, weight=0.4),
    "matmul": Kind(_run_matmul, lambda s: _img(s) or _tok(s), _draw_matmul, _make_matmul, weight=0.7),
    "affine": Kind(_run_affine, _any, _draw_affine, _make_affine),
    "positional": Kind(_run_positional, lambda s: _img(s) or _tok(s), _draw_positional, _make_positional, weight=0.6),
    "conv1d": Kind(_run_conv1d, _tok, _draw_conv1d, _make_conv1d, weight=0.6),
    "bmm_attention": Kind(_run_bmm_attention, _tok, _draw_bmm_attention, _make_bmm_attention, weight=0.7),
    "ws_conv": Kind(_run_ws_conv, _img, _draw_ws_conv, _make_ws_conv, weight=0.5),
    "einsum_attention": Kind(_run_einsum_attention, _tok, _draw_einsum_attention, _make_einsum_attention,
                             weight=0.5),
    "stack": Kind(_run_stack, _any, arity=2, weight=0.4),
    "project": Kind(_run_project, lambda s: _img(s) or _tok(s), _draw_project, _make_project, arity=2,
                    partner=lambda a, b: len(a) == len(b) and a[0] == b[0] and (a[2:] == b[2:] if len(a) == 4
                                                                                else a[1] == b[1]),
                    weight=1.5),
}
"""Every op kind the generator composes, by name."""


# -- building and generating --------------------------------------------------------------------


def _op_seed(seed: int, op_id: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{op_id}".encode()).digest()[:7], "little")


def example(program: Program, batch: int | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The program's example input (``batch`` replaces its batch size), fixed by its seed."""
    shape = program.input_shape if batch is None else (batch, *program.input_shape[1:])
    gen = torch.Generator().manual_seed(_op_seed(program.seed, -1 - (batch or 0)))
    return torch.randn(shape, generator=gen, dtype=dtype)


def build(program: Program, dtype: torch.dtype = torch.float64) -> FuzzModel:
    """The model ``program`` describes, in eval mode, with weights fixed by its seed.

    Raises ValueError when an op does not fit the values it reads (a program edited by
    hand, or by :func:`minimize`)."""
    model = FuzzModel(program)
    values: list[torch.Tensor] = [example(program, dtype=torch.float32)]
    for op in program.ops:
        shapes = [_shape(values[i]) for i in op.inputs]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_op_seed(program.seed, op.id))
            made = KINDS[op.kind].make(dict(op.params), shapes)
        for name, thing in made.items():
            if name.startswith("p_"):
                model.register_parameter(f"p{op.id}_{name[2:]}", thing)
            else:
                model.layers[f"{op.id}_{name}"] = thing
        try:
            with torch.no_grad():
                values.append(KINDS[op.kind].run(model, op, *(values[i] for i in op.inputs)))
        except (RuntimeError, IndexError, ValueError, TypeError) as exc:
            raise ValueError(f"op {op.id} ({op.kind}) does not fit its inputs {shapes}: {exc}") from exc
    return model.to(dtype).eval()


def _shape(value: Any) -> Shape:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def generate(seed: int, steps: tuple[int, int] = (3, 12)) -> Program:
    """A random valid program: an image or a token input, ``steps`` ops drawn from
    :data:`KINDS` (recent values preferred, so models grow deep as well as wide), and one
    or two outputs."""
    rng = random.Random(seed)
    image = rng.random() < 0.6
    shape: Shape = (2, rng.choice([3, 4]), 8, 8) if image else (2, rng.choice([4, 5]), rng.choice([4, 6, 8]))
    tracer = "export" if rng.random() < 0.25 else "fx"
    program = Program(seed, shape, (), (0,), tracer)
    model = FuzzModel(program)
    values: list[torch.Tensor] = [example(program, dtype=torch.float32)]
    ops: list[Op] = []
    for _ in range(rng.randint(*steps)):
        for _attempt in range(20):
            op = _draw_op(rng, len(ops), values)
            if op is None:
                continue
            trial = Program(seed, shape, (*ops, op), (len(ops) + 1,), tracer)
            try:
                model = build(trial, torch.float32)
            except ValueError:
                continue
            ops.append(op)
            with torch.no_grad():
                values = _values(model)
            break
    shapes = [_shape(v) for v in values]
    last = len(values) - 1
    outputs = (last,)
    others = [i for i in range(1, last) if shapes[i] and i not in {j for o in ops for j in o.inputs}]
    if others and rng.random() < 0.3:
        outputs = (last, rng.choice(others))
    return Program(seed, shape, tuple(ops), outputs, tracer)


def _values(model: FuzzModel) -> list[torch.Tensor]:
    values: list[Any] = [example(model.program, dtype=torch.float32)]
    for op in model.program.ops:
        values.append(KINDS[op.kind].run(model, op, *(values[i] for i in op.inputs)))
    return values


def _draw_op(rng: random.Random, op_id: int, values: list[torch.Tensor]) -> Op | None:
    shapes = [_shape(v) for v in values]
    names = list(KINDS)
    kind_name = rng.choices(names, weights=[KINDS[n].weight for n in names])[0]
    kind = KINDS[kind_name]
    recent = list(range(len(values)))[::-1]
    firsts = [i for i in recent if shapes[i] and kind.applies(shapes[i])]
    if not firsts:
        return None
    first = firsts[min(int(rng.expovariate(0.7)), len(firsts) - 1)]
    inputs = [first]
    if kind.arity == 2:
        partners = [i for i in recent if shapes[i] and kind.partner(shapes[first], shapes[i])]
        if kind_name in ("add", "mul", "layer_scale"):
            partners = [i for i in partners if i != first] or partners
        if not partners:
            return None
        inputs.append(rng.choice(partners))
    params = kind.draw(rng, [shapes[i] for i in inputs])
    if params is None:
        return None
    return Op(op_id, kind_name, tuple(inputs), tuple(sorted(params.items())), tuple(shapes[i] for i in inputs))


# -- the property -----------------------------------------------------------------------------


def check(program: Program, *, other_batch: int = 3, train: bool = True) -> Failure | None:
    """Run the property on ``program`` (module docstring); the first failure, or None.

    A :class:`~depgraph.DepgraphError` from ``analyze`` is a refusal, not a failure; from
    ``prune`` or ``simulate`` it is a failure (the plan came from the same analysis)."""
    status, failure = outcome(program, other_batch=other_batch, train=train)
    return failure if status == "failed" else None


def outcome(program: Program, *, other_batch: int = 3, train: bool = True) -> tuple[str, Failure | None]:
    """``("passed", None)``, ``("refused", why)`` (analyze refused the model with a clear
    error) or ``("failed", failure)``."""
    import depgraph

    model = build(program)
    x = example(program)
    before = _fingerprint(model)
    try:
        analysis = depgraph.analyze(model, x, tracer=program.tracer)
    except depgraph.DepgraphError as exc:
        return "refused", _failure("refused", exc)
    except Exception as exc:  # noqa: BLE001 -- any other error is a failure to report
        return "failed", _failure("analyze", exc)
    plan = depgraph.Plan.from_keep(analysis, _random_keep(analysis, program.seed),
                                   drop_blocks=_random_drop(analysis, program.seed))
    steps: list[tuple[str, Callable[[], Failure | None]]] = [
        ("compare", lambda: _compare(model, plan, [x, example(program, other_batch)], train=False)),
        ("group", lambda: _group_alone(model, analysis, x, program.seed)),
        ("whole", lambda: _whole(model, analysis, x)),
    ]
    if train:
        steps.append(("train", lambda: _compare(model, plan, [example(program, other_batch)], train=True)))
    for stage, step in steps:
        try:
            failure = step()
        except Exception as exc:  # noqa: BLE001
            failure = _failure(stage, exc)
        if failure is not None:
            return "failed", failure
    if _fingerprint(model) != before:
        return "failed", Failure("caller", "a public call changed the caller's model")
    return "passed", None


def _failure(stage: str, exc: BaseException) -> Failure:
    text = str(exc).strip().splitlines()
    return Failure(stage, f"{type(exc).__name__}: {text[0] if text else ''}")


def _random_keep(analysis: Any, seed: int) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in analysis.groups:
        count = int(torch.randint(g.min_keep, g.size + 1, (1,), generator=gen))
        keep[g.index] = torch.randperm(g.size, generator=gen)[:count].sort().values
    return keep


def _random_drop(analysis: Any, seed: int) -> list[int]:
    """Each block of the analysis with probability one half."""
    gen = torch.Generator().manual_seed(seed + 1)
    return [i for i in range(len(analysis.blocks)) if float(torch.rand((), generator=gen)) < 0.5]


def _compare(model: nn.Module, plan: Any, inputs: list[torch.Tensor], train: bool) -> Failure | None:
    import depgraph

    pruned = depgraph.prune(model, plan)
    simulated = depgraph.simulate(model, plan)
    for x in inputs:
        pruned.train(train)
        simulated.train(train)
        try:
            yp = _leaves(pruned(x))
        except Exception as exc:  # noqa: BLE001
            return _failure("prune-run" if x.shape[0] == plan_batch(plan) else "prune-batch", exc)
        try:
            ys = _leaves(simulated(x))
        except Exception as exc:  # noqa: BLE001
            return _failure("simulate-run", exc)
        if len(yp) != len(ys):
            return Failure("compare", f"{len(yp)} outputs pruned, {len(ys)} simulated")
        differ = _differ(yp, ys, "pruned", "simulated")
        if differ is not None:
            where = "train mode" if train else f"batch {x.shape[0]}"
            return Failure("compare", f"prune and simulate differ at {where}: {differ}")
        if train:
            loss = sum(y.sum() for y in yp if y.requires_grad)
            if isinstance(loss, torch.Tensor):
                loss.backward()
    return None


def _differ(first: list[torch.Tensor], second: list[torch.Tensor], a_name: str, b_name: str) -> str | None:
    """How two lists of outputs differ beyond :data:`RTOL` of the second's scale, or None."""
    if len(first) != len(second):
        return f"{len(first)} outputs {a_name}, {len(second)} {b_name}"
    for a, b in zip(first, second):
        if a.shape != b.shape:
            return f"shapes differ: {a_name} {tuple(a.shape)}, {b_name} {tuple(b.shape)}"
        a, b = a.detach(), b.detach()
        same_nan = a.isnan() & b.isnan()
        scale = max(b.nan_to_num(0.0).abs().max().item() if b.numel() else 0.0, 1e-3)
        err = torch.where(same_nan, 0.0, (a - b).abs()).max().item() if a.numel() else 0.0
        if not err <= RTOL * scale:
            return f"{err:.3g} (scale {scale:.3g})"
    return None


def _whole(model: nn.Module, analysis: Any, x: torch.Tensor) -> Failure | None:
    """A plan that keeps every unit: prune and simulate compute what the model computes (a
    defect that makes both wrong alike shows here)."""
    import depgraph

    plan = depgraph.Plan.from_keep(analysis, {})
    with torch.no_grad():
        want = _leaves(model(x))
        for name, result in (("prune", depgraph.prune(model, plan)), ("simulate", depgraph.simulate(model, plan))):
            differ = _differ(_leaves(result.eval()(x)), want, name, "original")
            if differ is not None:
                return Failure("whole", f"{name} with every unit kept differs from the model: {differ}")
    return None


def plan_batch(plan: Any) -> int:
    first = plan.inputs[0] if plan.inputs else None
    return first.shape[0] if first is not None else -1


def _group_alone(model: nn.Module, analysis: Any, x: torch.Tensor, seed: int) -> Failure | None:
    """Pruning one random group alone (one unit removed) gives a model that runs."""
    import depgraph

    if not analysis.groups:
        return None
    g = random.Random(seed).choice(analysis.groups)
    plan = depgraph.Plan.from_keep(analysis, {g.index: list(range(1 if g.size > g.min_keep else 0, g.size))})
    with torch.no_grad():
        depgraph.prune(model, plan)(x)
    return None


def _leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in value for t in _leaves(v)]


def _fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        digest.update(f"{name}|{tuple(t.shape)}|{id(t)}".encode())
        digest.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(repr([(n, type(m).__name__, m.training) for n, m in model.named_modules()]).encode())
    return digest.hexdigest()


# -- minimizing ----------------------------------------------------------------------------


def minimize(program: Program, failure: Failure, test: Callable[[Program], Failure | None] = check) -> Program:
    """The smallest program found (by deleting ops, rewiring their readers to another value
    of the same shape, and dropping outputs) that still fails with ``failure``'s signature."""
    best = program
    changed = True
    while changed:
        changed = False
        for candidate in _smaller(best):
            try:
                build(candidate)
                result = test(candidate)
            except ValueError:
                continue
            if result is not None and result.signature == failure.signature:
                best, changed = candidate, True
                break
    return best


def _smaller(program: Program) -> list[Program]:
    found = []
    if len(program.outputs) > 1:
        found += [replace(program, outputs=(o,)) for o in program.outputs]
    for k in range(len(program.ops) - 1, -1, -1):
        smaller = _without(program, k)
        if smaller is not None:
            found.append(smaller)
    return found


def _without(program: Program, k: int) -> Program | None:
    """``program`` without op ``k``: its readers read its first input instead, or another
    earlier value of the same shape; None if there is none."""
    model = build(program, torch.float32)
    with torch.no_grad():
        shapes = [_shape(v) for v in _values(model)]
    gone = k + 1
    substitutes = [i for i in range(gone) if shapes[i] == shapes[gone] and shapes[i]]
    readers = [o for o in program.ops if gone in o.inputs] + ([None] if gone in program.outputs else [])
    if readers and not substitutes:
        return None
    first = program.ops[k].inputs[0] if program.ops[k].inputs else None
    sub = first if first in substitutes else (substitutes[-1] if substitutes else 0)

    def renumber(i: int) -> int:
        i = sub if i == gone else i
        return i - 1 if i > gone else i

    ops = tuple(replace(o, inputs=tuple(map(renumber, o.inputs))) for j, o in enumerate(program.ops) if j != k)
    outputs = tuple(dict.fromkeys(renumber(i) for i in program.outputs))
    if outputs == (0,) and len(ops):
        return None
    return replace(program, ops=ops, outputs=outputs)


def describe(program: Program) -> str:
    """The program as readable lines (``v3 = conv(v1) groups=2 k=3 out=8``) with the shapes."""
    model = build(program, torch.float32)
    with torch.no_grad():
        shapes = [_shape(v) for v in _values(model)]
    lines = [f"# seed {program.seed}, tracer {program.tracer}", f"v0 = input {shapes[0]}"]
    for i, op in enumerate(program.ops, 1):
        args = ", ".join(f"v{j}" for j in op.inputs)
        params = " ".join(f"{k}={v}" for k, v in op.params)
        lines.append(f"v{i} = {op.kind}({args}) {params}  # {shapes[i]}")
    lines.append("return " + ", ".join(f"v{i}" for i in program.outputs))
    return "\n".join(lines)


def copy_program(program: Program) -> Program:
    return copy.deepcopy(program)
