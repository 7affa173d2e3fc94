"""Recurrent layers: nn.LSTM, nn.GRU and nn.RNN, multi-layer, bidirectional, with projections.

One rule covers the three classes; they differ only in their number of gates G
(4 for LSTM, 3 for GRU, 1 for RNN).

Why pruning a hidden unit j is exact, and why masking weights simulates it: every
weight that reads unit j (column j of weight_hh and weight_hr, the columns of the next
layer's weight_ih) is a member, so once they are zero (simulate) or gone (prune) unit
j cannot reach a kept unit, whatever value it holds; the outputs' unit j is masked (or
gone) by the activation mask after the getitem that reads it. Masking j's rows too keeps
j itself at zero from a zero initial state: its gate pre-activations are 0, so an
LSTM gives c' = sigmoid(0) c + sigmoid(0) tanh(0) = c / 2 and h' = o tanh(c') = 0, a
GRU h' = (1 - z) tanh(0) + z h = h / 2, an RNN h' = tanh(0) or relu(0) = 0. Weight
masks are ``torch.nn.utils.parametrize`` parametrizations, which nn.RNNBase honours:
its forward re-reads every weight when ``getattr`` returns a tensor other than the one
it holds (``_update_flat_weights``), and a parametrized weight is a new tensor on each
read. The recurrence has no activation between time steps, so activation masks alone
are not enough: the ``bypass`` apply method on ``weight_hh`` (which holds both the rows
that compute unit j and the columns that read it) is not exact.

nn.LSTM's kernel decides that an LSTM has projections when proj_size != hidden_size
(it compares the sizes of h0 and c0): a plan that keeps as many hidden units as
projection units cannot be pruned into an nn.LSTM, and ``prune`` says so.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from ..dims import Concat, Expr, Product
from .context import Axes, Context, arg, iter_exprs

__all__ = ["GATES", "RULES"]

GATES: dict[type, int] = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}
"""Gate blocks stacked in the rows of every weight_ih, weight_hh, bias_ih and bias_hh."""

GATE = "gate blocks of a recurrent layer are addressed by position"
LAYERS = "layers and directions of a recurrent layer's state are addressed by position"
SEQUENCE = "time steps of a recurrence depend on the steps before them"
PACKED = "a recurrent layer called on a PackedSequence"


def recurrent(cx: Context, node: fx.Node) -> Axes:
    """nn.LSTM / nn.GRU / nn.RNN -> [output, h_n] ([output, [h_n, c_n]] for LSTM).

    With G gates (4, 3, 1), hidden atom H, output width R (= H, or the projection
    atom P when ``proj_size`` > 0) and D directions, for every layer l and direction
    (suffix ``""`` or ``"_reverse"``):

    - rows of ``weight_ih_l{l}``, ``weight_hh_l{l}``, ``bias_ih_l{l}``, ``bias_hh_l{l}``
      = Product(G, H), G pinned: the gates are stacked blocks, so hidden unit j is
      row j of every block;
    - ``weight_hh_l{l}[1]`` = R; with projections ``weight_hr_l{l}`` is (P, H);
    - ``weight_ih_l0[1]`` = the input's feature axis; ``weight_ih_l{l}[1]`` for l > 0 =
      the previous layer's output, Concat(R, R) when bidirectional (forward, reverse);
    - output: (seq, batch, Concat(R, R) or R) (batch first with ``batch_first``,
      no batch axis for 2-D input); h_n: (D * num_layers, batch, R); c_n:
      (D * num_layers, batch, H); h0 and c0, when given, have the same axes.

    One H (and one P) serves every layer and direction: nn.LSTM has a single
    ``hidden_size`` and ``proj_size``, so a pruned module keeps one width throughout.
    The gate, layer and sequence axes are pinned (the recurrence pairs time steps).
    A PackedSequence input pins everything.
    """
    m = cx.module(node)
    assert isinstance(m, nn.RNNBase)
    x_node = arg(node, 0, "input")
    if not cx.is_tensor(x_node):
        return _packed(cx, node)
    hidden = cx.new(m.hidden_size)
    width = cx.new(m.proj_size) if m.proj_size else hidden
    rows = Product((cx.new(GATES[type(m)], GATE), hidden))
    x = cx.of(x_node)
    directions = 2 if m.bidirectional else 1
    layer_out = Concat((width,) * directions) if directions == 2 else width
    layer_in = x[-1]
    for layer in range(m.num_layers):
        for suffix in ("", "_reverse")[:directions]:
            _layer(cx, f"{node.target}.", f"_l{layer}{suffix}", rows, layer_in, (hidden, width))
        layer_in = layer_out
    return _outputs(cx, node, x, layer_out, (hidden, width))


def _layer(cx: Context, prefix: str, suffix: str, rows: Expr, inputs: Expr, hidden: tuple[Expr, Expr]) -> None:
    """Relate one layer and direction's weights: rows, input columns, recurrent columns."""
    full, width = hidden
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        if cx.is_state(f"{prefix}{name}{suffix}"):
            cx.unify(cx.param(f"{prefix}{name}{suffix}")[0], rows)
    cx.unify(cx.param(f"{prefix}weight_ih{suffix}")[1], inputs)
    cx.unify(cx.param(f"{prefix}weight_hh{suffix}")[1], width)
    if cx.is_state(f"{prefix}weight_hr{suffix}"):
        cx.unify_all(cx.param(f"{prefix}weight_hr{suffix}"), (width, full))


def _outputs(cx: Context, node: fx.Node, x: tuple[Expr, ...], features: Expr, hidden: tuple[Expr, Expr]) -> Axes:
    """Output and final states; the initial states given as ``hx`` are related to them."""
    m = cx.module(node)
    assert isinstance(m, nn.RNNBase)
    full, width = hidden
    batched = len(x) == 3
    seq, batch = (x[1], x[0]) if batched and m.batch_first else (x[0], x[1] if batched else None)
    cx.u.pin(seq, SEQUENCE)
    layers = cx.new(m.num_layers * (2 if m.bidirectional else 1), LAYERS)
    lead = (layers, batch) if batch is not None else (layers,)
    states = [(*lead, width), (*lead, full)] if isinstance(m, nn.LSTM) else [(*lead, width)]
    for given, axes in zip(_initial_states(cx, arg(node, 1, "hx")), states):
        cx.unify_all(given, axes)
    output = (batch, seq, features) if batched and m.batch_first else (seq, *lead[1:], features)
    return [output, [*states]] if isinstance(m, nn.LSTM) else [output, states[0]]


def _initial_states(cx: Context, hx: Any) -> list[tuple[Expr, ...]]:
    """Axes of the initial states: none, one tensor (GRU, RNN), or a pair (LSTM)."""
    if hx is None:
        return []
    if cx.is_tensor(hx):
        return [cx.of(hx)]
    if isinstance(hx, fx.Node):  # a pair computed by another op
        pair = cx.axes[hx]
        return [axes for axes in pair if isinstance(axes, tuple)] if isinstance(pair, list) else []
    return [cx.of(h) for h in hx]


def _packed(cx: Context, node: fx.Node) -> Axes:
    """Pin the module's parameters, its inputs and its outputs."""
    for name, _ in cx.module(node).named_parameters():
        cx.pin(cx.param(f"{node.target}.{name}"), PACKED)
    for a in node.all_input_nodes:
        for expr in iter_exprs(cx.axes.get(a)):
            cx.u.pin(expr, PACKED)
    return cx.pinned_like(cx.value(node), PACKED)


RULES: dict[object, object] = dict.fromkeys(GATES, recurrent)
