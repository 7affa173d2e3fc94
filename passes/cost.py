"""Parameters and multiply-accumulates of a model as polynomials over its axes.

Every parameter's size is the product of its axes' sizes, and every matrix product or
convolution costs the product of a few axes' sizes: a convolution ``N · spatial ·
prod(weight)``, a linear layer ``prod(output) · in_features``, a matmul ``prod(output) ·
contracted``. Written over the axis expressions of the analysis (not their sizes), a
cost is a sum of :class:`Term` whose value under any plan is the same products over the
kept sizes: the cost of a pruned model without building it.

What counts as a MAC: convolutions (transposed too), linear layers, matmul / mm / bmm /
addmm / baddbmm / einsum of two operands, scaled dot-product attention (q·kᵀ and
attention·v), nn.MultiheadAttention (projections, attention, output projection) and
recurrent layers (input and hidden products per step). Elementwise ops, norms and
softmax cost nothing here, as in ``torch.utils.flop_counter``.

Needs: the traced graph, the resolved axes of every node (``nodes``) and parameter
(``params``). Does not run the model.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .dims import Atom, Concat, Expr, Product
from .mha import PrunedMultiheadAttention
from .rules.context import arg

__all__ = ["Term", "mac_terms", "kept_size"]


@dataclass(frozen=True)
class Term:
    """``coefficient`` times the product of the sizes of ``factors``, from node ``node``."""

    coefficient: int
    factors: tuple[Expr, ...]
    node: str = ""


def kept_size(expr: Expr, kept: dict[Atom, int], memo: dict[Expr, int] | None = None) -> int:
    """The size of ``expr`` when each atom in ``kept`` has that many units (others whole)."""
    if isinstance(expr, Atom):
        return kept.get(expr, expr.size)
    if memo is not None and expr in memo:
        return memo[expr]
    if isinstance(expr, Product):
        size = math.prod(kept_size(f, kept, memo) for f in expr.factors)
    else:
        assert isinstance(expr, Concat)
        size = sum(kept_size(p, kept, memo) for p in expr.parts)
    if memo is not None:
        memo[expr] = size
    return size


def mac_terms(gm: fx.GraphModule, params: dict[str, tuple[Expr, ...]], nodes: dict[str, Any],
              lowered: dict[str, tuple[fx.GraphModule, dict[str, Any]]] | None = None) -> tuple[list[Term], list[str]]:
    """The MACs of every matrix product and convolution of ``gm`` (module doc) as terms,
    and the names of the nodes that multiply but whose axes could not express their MACs.

    A node related through its ATen decomposition (``lowered``: its mini-graph and that
    graph's axes) costs what its mini-graph costs; a region export keeps opaque (under
    ``torch.no_grad()``) costs what its ops cost at their traced sizes (its axes are pinned)."""
    terms: list[Term] = []
    unmodeled: list[str] = []
    lowered = lowered or {}
    for node in gm.graph.nodes:
        region = _opaque_region(gm, node)
        inner = lowered.get(node.name) or ((region, _traced(region)) if region is not None else None)
        if inner is not None:
            found, missing = mac_terms(inner[0], {}, inner[1])
            terms.extend(Term(t.coefficient, t.factors, node.name) for t in found)
            unmodeled.extend(f"{node.name} ({m})" for m in missing)
            continue
        if node.op == "call_module":
            found_here = _module_terms(gm.get_submodule(str(node.target)), str(node.target), node, params, nodes)
        elif node.op in ("call_function", "call_method"):
            found_here = _function_terms(node, nodes)
        else:
            continue
        if found_here is None:
            unmodeled.append(node.name)
        else:
            terms.extend(Term(c, f, node.name) for c, f in found_here)
    return terms, unmodeled


Found = list[tuple[int, tuple[Expr, ...]]]
"""(coefficient, factors) of each term; None from a rule means: a multiplying op whose axes
could not express its MACs."""


_WRAPS = ("wrap_with_set_grad_enabled", "wrap_with_autocast", "wrap")
"""Export's higher-order ops that run their subgraph once (a region under ``no_grad`` or
autocast)."""


def _opaque_region(gm: fx.GraphModule, node: fx.Node) -> fx.GraphModule | None:
    """The subgraph that a wrapping higher-order op of export (:data:`_WRAPS`) runs."""
    wraps = [getattr(torch.ops.higher_order, n, None) for n in _WRAPS]
    if node.op != "call_function" or node.target not in [w for w in wraps if w is not None]:
        return None
    for sub in node.args:
        if isinstance(sub, fx.Node) and sub.op == "get_attr":
            region = gm.get_submodule(str(sub.target))
            if isinstance(region, fx.GraphModule):
                return region
    return None


def _traced(gm: fx.GraphModule) -> dict[str, tuple[Expr, ...]]:
    """Axes of fixed size (the traced shapes) for every tensor of a graph from torch.export."""
    found: dict[str, tuple[Expr, ...]] = {}
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            found[node.name] = tuple(Atom(-1, int(n)) for n in value.shape)
    return found


def _axes(value: Any, nodes: dict[str, Any]) -> tuple[Expr, ...] | None:
    axes = nodes.get(value.name) if isinstance(value, fx.Node) else None
    return axes if isinstance(axes, tuple) else None


def _conv(x: Any, out: Any, w: Any, transposed: bool) -> Found | None:
    """``N · spatial · prod(weight)``: spatial of the output (of the input when transposed)."""
    if not (isinstance(x, tuple) and isinstance(out, tuple) and isinstance(w, tuple)):
        return None
    spatial = len(w) - 2
    batched = len(x) == spatial + 2
    positions = (x if transposed else out)[-spatial:] if spatial else ()
    return [(1, (*x[:1 if batched else 0], *positions, *w))]


def _contract(out: Any, *contracted: Any) -> Found | None:
    """``prod(output) · prod(contracted)``: a matrix product."""
    if not isinstance(out, tuple) or any(c is None for c in contracted):
        return None
    return [(1, (*out, *contracted))]


def _last(axes: Any, rank: int | None = None) -> Expr | None:
    """The last axis of ``axes`` (of a tensor of rank ``rank`` when given), or None."""
    if not isinstance(axes, tuple) or not axes or (rank is not None and len(axes) != rank):
        return None
    return axes[-1]


_CONV = {F.conv1d: False, F.conv2d: False, F.conv3d: False, F.conv_transpose1d: True, F.conv_transpose2d: True,
         F.conv_transpose3d: True}
_ATEN_CONV = {"conv1d": False, "conv2d": False, "conv3d": False, "conv_transpose1d": True, "conv_transpose2d": True,
              "conv_transpose3d": True}
_MATMUL = {torch.matmul, operator.matmul, torch.mm, torch.bmm, "matmul", "mm", "bmm", "__matmul__"}
_ATEN_MATMUL = {"matmul", "mm", "bmm"}


def _function_terms(node: fx.Node, nodes: dict[str, Any]) -> Found | None:
    target, out = node.target, nodes.get(node.name)
    name = str(getattr(target, "__name__", "")).split(".")[0] if isinstance(target, torch._ops.OpOverload) else None
    x = _axes(node.args[0], nodes) if node.args else None
    if target in _CONV or name in _ATEN_CONV or name in ("convolution", "_convolution"):
        transposed = _CONV[target] if target in _CONV else _ATEN_CONV.get(name or "", False)
        if name in ("convolution", "_convolution"):
            transposed = bool(node.args[6])
        return _conv(x, out, _axes(arg(node, 1, "weight"), nodes), transposed)
    if target is F.linear or name == "linear":
        return _contract(out, _last(_axes(arg(node, 1, "weight"), nodes), 2))
    if target in _MATMUL or name in _ATEN_MATMUL:
        return _contract(out, _last(x))
    if target in (torch.addmm, torch.baddbmm, "addmm", "baddbmm") or name in ("addmm", "baddbmm"):
        return _contract(out, _last(_axes(node.args[1], nodes)))
    if target is torch.einsum or name == "einsum":
        return _einsum(node, nodes, out)
    if target is F.scaled_dot_product_attention or name == "scaled_dot_product_attention":
        q, k, v = (_axes(arg(node, i, n), nodes) for i, n in enumerate(("query", "key", "value")))
        if q is None or k is None or v is None or len(k) < 2:
            return None
        return [(1, (*q[:-1], k[-2], q[-1])), (1, (*q[:-1], k[-2], v[-1]))]
    if name in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        return _aten_recurrent(node, nodes)
    return []


def _einsum(node: fx.Node, nodes: dict[str, Any], out: Any) -> Found | None:
    """Two operands: ``prod(output) · prod(contracted)`` (indices in both operands, not in
    the output; an index in one operand only is summed before the product, at no MAC).
    ``...`` stands for the same trailing-aligned dimensions in every operand."""
    equation = node.args[0]
    operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    if not isinstance(equation, str) or "->" not in equation or len(operands) != 2:
        return None
    inputs, output = equation.replace(" ", "").split("->")
    a, b = (_axes(o, nodes) for o in operands)
    subs = inputs.split(",")
    if a is None or b is None or len(subs) != 2:
        return None
    left, right = _spelled(subs[0], len(a)), _spelled(subs[1], len(b))
    width = max(len(a) - len(subs[0].replace("...", "")), len(b) - len(subs[1].replace("...", "")))
    kept = _spelled(output, width + len(output.replace("...", "")))
    if left is None or right is None or kept is None:
        return None
    by_index: dict[str, Expr] = {}
    for letters, found in ((left, a), (right, b)):
        for letter, e in zip(letters, found):
            if letter not in by_index or by_index[letter].size == 1:
                by_index[letter] = e
    return _contract(out, *(by_index[c] for c in dict.fromkeys(left) if c in right and c not in kept))


def _spelled(subscripts: str, rank: int) -> list[str] | None:
    """The index letters of an operand of this rank, ``...`` spelled out as digits counted
    from the right (``'...ij'`` of rank 4: ``['1', '0', 'i', 'j']``)."""
    if "..." not in subscripts:
        return list(subscripts) if len(subscripts) == rank else None
    head, _, tail = subscripts.partition("...")
    n = rank - len(head) - len(tail)
    return [*head, *(str(i) for i in reversed(range(n))), *tail] if n >= 0 else None


def _sequence(x: tuple[Expr, ...], batch_first: bool) -> tuple[Expr, ...]:
    """The (steps, batch) axes of a recurrent layer's input (steps only when unbatched)."""
    if len(x) == 2:
        return (x[0],)
    return (x[1], x[0]) if batch_first else (x[0], x[1])


def _aten_recurrent(node: fx.Node, nodes: dict[str, Any]) -> Found | None:
    """``aten.lstm/gru/rnn_*.input``: every weight matrix costs ``steps · batch · prod(w)``."""
    x = _axes(node.args[0], nodes)
    weights = node.args[2]
    batch_first = bool(node.args[-1])
    if x is None or not isinstance(weights, (list, tuple)):
        return None
    found: Found = []
    for w in weights:
        axes = _axes(w, nodes)
        if axes is not None and len(axes) == 2:
            found.append((1, (*_sequence(x, batch_first), *axes)))
    return found


def _module_terms(module: nn.Module, target: str, node: fx.Node, params: dict[str, tuple[Expr, ...]],
                  nodes: dict[str, Any]) -> Found | None:
    out = nodes.get(node.name)
    x = _axes(node.args[0], nodes) if node.args else None
    weight = params.get(f"{target}.weight")
    if isinstance(module, nn.modules.conv._ConvNd):
        return _conv(x, out, weight, isinstance(module, nn.modules.conv._ConvTransposeNd))
    if isinstance(module, nn.Linear):
        return _contract(out, _last(weight, 2))
    if isinstance(module, nn.RNNBase):
        names = [f"{target}.{n}" for n, p in module.named_parameters() if n.startswith("weight_") and p.dim() == 2]
        if x is None or any(n not in params for n in names):
            return None
        return [(1, (*_sequence(x, module.batch_first), *params[n])) for n in names]
    if isinstance(module, (nn.MultiheadAttention, PrunedMultiheadAttention)):
        return _multihead_attention(module, target, node, params, nodes)
    return []


def _multihead_attention(module: nn.Module, target: str, node: fx.Node, params: dict[str, tuple[Expr, ...]],
                         nodes: dict[str, Any]) -> Found | None:
    """Projections ``tokens · width · in_width``, q·kᵀ ``batch · L · S' · q_width`` and
    attention·v ``batch · L · S' · v_width`` (S' counts bias_k and the zero attention),
    the output projection ``tokens · prod(out_proj.weight)``."""
    q, k, v = (_axes(arg(node, i, n), nodes) for i, n in enumerate(("query", "key", "value")))
    widths = _projections(target, params)
    out_w = params.get(f"{target}.out_proj.weight")
    if q is None or k is None or v is None or widths is None or out_w is None:
        return None
    batch_first = getattr(module, "batch_first", False)
    tokens_q, tokens_k, tokens_v = q[:-1], k[:-1], v[:-1]
    src = k[-2] if len(k) == 2 else (k[1] if batch_first else k[0])
    lead = tokens_q  # (L, N) or (N, L) or (L,)
    extra = int(module.bias_k is not None) + int(bool(module.add_zero_attn))
    found: Found = [
        (1, (*tokens_q, widths[0], q[-1])), (1, (*tokens_k, widths[1], k[-1])), (1, (*tokens_v, widths[2], v[-1])),
        (1, (*lead, src, widths[0])), (1, (*lead, src, widths[2])),
        (1, (*tokens_q, *out_w)),
    ]
    if extra:
        found += [(extra, (*lead, widths[0])), (extra, (*lead, widths[2]))]
    return found


def _projections(target: str, params: dict[str, tuple[Expr, ...]]) -> tuple[Expr, ...] | None:
    """The q, k and v widths of an attention module: the parts of its packed projection's
    rows, or its separate projections' rows."""
    packed = params.get(f"{target}.in_proj_weight")
    if packed is not None:
        rows = packed[0]
        return rows.parts if isinstance(rows, Concat) and len(rows.parts) == 3 else None
    separate = [params.get(f"{target}.{p}_proj_weight") for p in ("q", "k", "v")]
    return tuple(w[0] for w in separate if w is not None) if all(w is not None for w in separate) else None
