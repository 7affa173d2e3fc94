"""Matrix products and attention: matmul, bmm, einsum, scaled dot-product attention,
and nn.MultiheadAttention.

A contracted axis is one axis of both operands: removing a unit removes its term
from every sum, on both sides. Batch axes broadcast: aligned axes of the same
non-1 size are equal.
"""

from __future__ import annotations

import operator
import string
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..dims import ONE, Concat, Expr, Product
from ..mha import PrunedMultiheadAttention
from .context import Axes, Context, arg

__all__ = ["RULES"]

BROADCAST = "size made by broadcasting"
CAUSAL = "positions related by a causal mask"
MHA_HEAD_DIM = "head_dim of nn.MultiheadAttention (its attention scale reads it)"
MHA_AVERAGED = "heads of nn.MultiheadAttention whose attention weights are averaged over heads and used"
MHA_EXTRA = "key positions added by bias_k or add_zero_attn"


def _broadcast(cx: Context, *operands: tuple[Expr, ...]) -> tuple[Expr, ...]:
    """Axes of the broadcast of ``operands`` (aligned from the right): equal non-1 axes unify."""
    ndim = max((len(axes) for axes in operands), default=0)
    found: list[Expr | None] = [None] * ndim
    sizes = [1] * ndim
    for axes in operands:
        for i, expr in enumerate(axes, ndim - len(axes)):
            if expr.size == 1:
                continue
            sizes[i] = expr.size
            seen = found[i]
            if seen is None:
                found[i] = expr
            else:
                cx.unify(seen, expr)
    return tuple(e if e is not None else cx.new(n, BROADCAST) for e, n in zip(found, sizes))


def _product(cx: Context, a: tuple[Expr, ...], b: tuple[Expr, ...]) -> tuple[Expr, ...]:
    """``a @ b`` with torch.matmul's semantics: a 1-D operand gains (and loses) a unit axis."""
    left = a if len(a) > 1 else (ONE, *a)
    right = b if len(b) > 1 else (*b, ONE)
    cx.unify(left[-1], right[-2])
    rows = (left[-2],) if len(a) > 1 else ()
    cols = (right[-1],) if len(b) > 1 else ()
    return (*_broadcast(cx, left[:-2], right[:-2]), *rows, *cols)


def matmul(cx: Context, node: fx.Node) -> Axes:
    """matmul/mm/bmm/mv/dot and ``@``: a(..., n, k) @ b(..., k, m) -> (..., n, m); the
    contracted k axes are equal; batch axes broadcast."""
    second = node.args[1] if len(node.args) > 1 else next(
        node.kwargs[k] for k in ("other", "mat2", "vec", "tensor") if k in node.kwargs
    )
    return _product(cx, cx.of(node.args[0]), cx.of(second))


def add_matmul(cx: Context, node: fx.Node) -> Axes:
    """addmm/baddbmm(input, a, b): the product as in :func:`matmul`, with ``input``
    broadcast against it."""
    names = ("mat1", "mat2") if node.target in (torch.addmm, "addmm") else ("batch1", "batch2")
    a, b = arg(node, 1, names[0]), arg(node, 2, names[1])
    return _broadcast(cx, _product(cx, cx.of(a), cx.of(b)), cx.of(node.args[0]))


def _einsum_args(node: fx.Node) -> tuple[str, list[Any]]:
    """The equation and operands of an einsum call, converting the sublist form."""
    first, rest = node.args[0], list(node.args[1:])
    if isinstance(first, str):
        return first, list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    items: list[Any] = [first, *rest]
    output = f"->{_sublist(items.pop())}" if len(items) % 2 else ""
    return ",".join(_sublist(sub) for sub in items[1::2]) + output, items[0::2]


def _sublist(labels: list[Any]) -> str:
    return "".join("..." if s is Ellipsis else _LETTERS[s] for s in labels)


_LETTERS = string.ascii_uppercase + string.ascii_lowercase
"""Sublist label ``i`` is letter ``i``; torch orders implicit outputs the same way."""


def _labels(term: str, ndim: int) -> list[str]:
    """One label per axis; ellipsis axes are named by their distance from the ellipsis' end."""
    head, dots, tail = term.partition("...")
    if not dots:
        return list(term)
    width = ndim - len(head) - len(tail)
    return [*head, *(f"...{width - 1 - j}" for j in range(width)), *tail]


def einsum(cx: Context, node: fx.Node) -> Axes:
    """einsum: axes with the same letter are equal (size-1 axes broadcast); the output
    has each of its letters' axes; ellipsis axes broadcast like matmul's batch axes."""
    equation, operands = _einsum_args(node)
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    axes = [cx.of(x) for x in operands]
    if not arrow:
        once = sorted(c for c in set(lhs) if c.isalpha() and lhs.count(c) == 1)
        rhs = ("..." if "..." in lhs else "") + "".join(once)
    width = max((len(x) - len(t.replace("...", "")) for t, x in zip(terms, axes) if "..." in t), default=0)
    found: dict[str, Expr] = {}
    for term, x in zip(terms, axes):
        for label, expr in zip(_labels(term, len(x)), x):
            if expr.size == 1:
                continue
            if label in found:
                cx.unify(found[label], expr)
            else:
                found[label] = expr
    return tuple(found.get(label, ONE) for label in _labels(rhs, width + len(rhs.replace("...", ""))))


def _attention_batch(cx: Context, node: fx.Node, q: tuple[Expr, ...], k: tuple[Expr, ...],
                     v: tuple[Expr, ...]) -> tuple[Expr, ...]:
    """Batch axes of q, k, v broadcast; with ``enable_gqa`` and fewer key/value heads, each
    query head axis is Product(key/value heads, repeat): the kernel reads the repeat from
    the shapes, so fewer query heads per key/value head is a prune."""
    if not (arg(node, 7, "enable_gqa", False) and len(q) > 2 and q[-3].size != k[-3].size):
        return _broadcast(cx, q[:-2], k[:-2], v[:-2])
    (kv_heads,) = _broadcast(cx, k[-3:-2], v[-3:-2])
    cx.unify(q[-3], Product((kv_heads, cx.new(q[-3].size // kv_heads.size))))
    return (*_broadcast(cx, q[:-3], k[:-3], v[:-3]), q[-3])


DEFAULT_SCALE = "the default scale 1/sqrt(E) of scaled_dot_product_attention depends on this axis' size"
"""Why E is pinned in ATen-level attention, where no shrink rewrite passes the original scale."""


def scaled_dot_product_attention(cx: Context, node: fx.Node) -> Axes:
    """q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev): q and k share E, k and v
    share S, batch axes broadcast, attn_mask broadcasts against (..., L, S).

    Without an explicit ``scale`` the kernel divides by sqrt(E): E stays prunable because
    shrinking passes the original ``scale=1/sqrt(E)`` (passes/shrink.py); ``is_causal``
    pins L and S (the mask pairs positions).
    """
    q, k, v = (cx.of(arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    cx.unify(q[-1], k[-1])
    cx.unify(k[-2], v[-2])
    batch = _attention_batch(cx, node, q, k, v)
    mask = arg(node, 3, "attn_mask")
    if cx.is_tensor(mask):
        _broadcast(cx, (*batch, q[-2], k[-2]), cx.of(mask))
    if arg(node, 5, "is_causal", False):
        cx.u.pin(q[-2], CAUSAL)
        cx.u.pin(k[-2], CAUSAL)
    return (*batch, q[-2], v[-1])


def _seq_batch(x: tuple[Expr, ...], batch_first: bool) -> tuple[Expr | None, Expr]:
    """(batch, sequence) axes of an nn.MultiheadAttention input; batch is None when unbatched."""
    if len(x) == 2:
        return None, x[0]
    return (x[0], x[1]) if batch_first else (x[1], x[0])


def _mha_projections(
    cx: Context, node: fx.Node, inputs: list[tuple[Expr, ...]], outputs: tuple[Expr, Expr, Expr]
) -> None:
    """Relate the query/key/value inputs and projected widths to the input projection weights."""
    prefix = str(node.target)
    if cx.module(node).in_proj_weight is not None:
        w = cx.param(f"{prefix}.in_proj_weight")
        cx.unify(w[0], Concat(tuple(outputs)))
        for x in inputs:
            cx.unify(x[-1], w[1])
    else:
        for name, x, out in zip("qkv", inputs, outputs):
            w = cx.param(f"{prefix}.{name}_proj_weight")
            cx.unify(w[0], out)
            cx.unify(x[-1], w[1])
    bias = cx.module_param(node, "in_proj_bias")
    if bias is not None:
        cx.unify(bias[0], Concat(tuple(outputs)))
    for name, out in (("bias_k", outputs[1]), ("bias_v", outputs[2])):
        extra = cx.module_param(node, name)
        if extra is not None:
            cx.unify(extra[2], out)


def _mha_masks(cx: Context, node: fx.Node, batch: Expr | None, heads: Expr, seq: tuple[Expr, Expr]) -> None:
    """key_padding_mask is (N, S); attn_mask is (L, S) or (N * heads, L, S)."""
    padding, mask = arg(node, 3, "key_padding_mask"), arg(node, 5, "attn_mask")
    if cx.is_tensor(padding):
        cx.unify_all(cx.of(padding), (seq[1],) if batch is None else (batch, seq[1]))
    if cx.is_tensor(mask):
        axes = cx.of(mask)
        lead = () if len(axes) == 2 else (heads if batch is None else Product((batch, heads)),)
        cx.unify_all(axes, (*lead, *seq))


def multihead_attention(cx: Context, node: fx.Node) -> Axes:
    """nn.MultiheadAttention (and PrunedMultiheadAttention) -> [attn_output, attn_weights or None].

    The projections are written out: in_proj_weight[0] (or q/k/v_proj_weight[0]) is
    Concat(q, k, v) with q = k = Product(heads, head_dim) (q·kᵀ contracts head_dim) and
    v = Product(heads, v_head_dim) = out_proj.weight[1]; in_proj_bias, bias_k and bias_v
    follow; out_proj.weight[0] = out_proj.bias[0] is the output width; the query, key and
    value widths are the projections' columns.

    nn.MultiheadAttention's own forward ties the query width, ``num_heads * head_dim`` and
    ``embed_dim // num_heads`` together; pruning replaces it by
    :class:`passes.mha.PrunedMultiheadAttention` (same arithmetic, sizes read from the
    projections), so the query width and the heads are prunable. head_dim stays pinned
    (the scale ``1 / sqrt(head_dim)`` is the module's), and so do the heads when the
    attention weights are averaged over heads and then used.
    """
    m = cx.module(node)
    inputs = [cx.of(arg(node, i, n)) for i, n in enumerate(("query", "key", "value"))]
    averaged = arg(node, 4, "need_weights", True) and arg(node, 6, "average_attn_weights", True)
    used = any(u.target is operator.getitem and u.args[1] == 1 and u.users for u in node.users)
    heads = cx.new(m.num_heads, MHA_AVERAGED if averaged and used else None)
    v_width = getattr(m, "v_head_dim", m.head_dim)
    head_dim, v_head_dim = cx.new(m.head_dim, MHA_HEAD_DIM), cx.new(v_width, MHA_HEAD_DIM)
    projected: tuple[Expr, Expr, Expr] = (
        Product((heads, head_dim)), Product((heads, head_dim)), Product((heads, v_head_dim))
    )
    _mha_projections(cx, node, inputs, projected)
    (batch, tgt), (k_batch, src), (v_batch, v_src) = (_seq_batch(x, m.batch_first) for x in inputs)
    cx.unify(src, v_src)
    if batch is not None and k_batch is not None and v_batch is not None:
        cx.unify(batch, k_batch)
        cx.unify(batch, v_batch)
    _mha_masks(cx, node, batch, heads, (tgt, src))
    w_out = cx.param(f"{node.target}.out_proj.weight")
    cx.unify(w_out[1], projected[2])
    if m.out_proj.bias is not None:
        cx.unify(cx.param(f"{node.target}.out_proj.bias")[0], w_out[0])
    weights = cx.value(node)[1]
    if weights is None:
        return [(*inputs[0][:-1], w_out[0]), None]
    extra = weights.shape[-1] - src.size
    keys = Concat((src, cx.new(extra, MHA_EXTRA))) if extra else src
    per_head = () if len(weights.shape) == 2 + (batch is not None) else (heads,)
    lead = () if batch is None else (batch,)
    return [(*inputs[0][:-1], w_out[0]), (*lead, *per_head, tgt, keys)]


_MATMUL = [torch.matmul, operator.matmul, "matmul", "__matmul__", torch.mm, "mm", torch.bmm, "bmm",
           torch.mv, "mv", torch.dot, "dot"]

RULES: dict[object, object] = {fn: matmul for fn in _MATMUL}
RULES.update({
    torch.addmm: add_matmul, "addmm": add_matmul, torch.baddbmm: add_matmul, "baddbmm": add_matmul,
    torch.einsum: einsum,
    F.scaled_dot_product_attention: scaled_dot_product_attention,
    nn.MultiheadAttention: multihead_attention,
    PrunedMultiheadAttention: multihead_attention,
})
