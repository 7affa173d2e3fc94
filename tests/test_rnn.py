"""Recurrent layers (passes/rules/rnn.py): exact groups, pins, and simulate == prune.

Groups are written ``(size, [(member, dim, indices removed by unit 1)])``. With hidden
size H and G gates, unit 1 of the hidden group is row 1 of every gate block:
rows 1, H + 1, ..., (G - 1) H + 1; in a bidirectional layer's output it is feature 1
of the forward half and feature H + 1 of the reverse half.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from axes import assert_axes_match_shapes
from equivalence import check_plan, random_keep
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import depgraph
from passes.dims import Unifier
from passes.errors import PlanError
from passes.rules import relate
from passes.rules import rnn as rnn_rules

Groups = list[tuple[int, list[tuple[str, int, list[int]]]]]


def groups(a: depgraph.Analysis) -> Groups:
    return [(g.size, [(m.name, m.dim, m.indices([1]).tolist()) for m in g.members]) for g in a.groups]


def analyze(model: nn.Module, *inputs: Tensor, **kwargs: Any) -> depgraph.Analysis:
    """Analyze, asserting that every op had a rule and every node's axes have its shape."""
    a = depgraph.analyze(model, inputs, **kwargs)
    assert a.unsupported == []
    assert_axes_match_shapes(a)
    return a




def pinned(a: depgraph.Analysis, words: str) -> set[tuple[str, int]]:
    """Parameter axes pinned with a reason containing ``words``."""
    return {m for p in a.pinned if words in p.reason for m in p.members}


def gate_rows(hidden: int, gates: int, unit: int = 1) -> list[int]:
    return [g * hidden + unit for g in range(gates)]


def layer_members(prefix: str, suffix: str, hidden: int, gates: int, inputs: list[int] | None,
                  bias: bool = True) -> list[tuple[str, int, list[int]]]:
    """Members of one layer and direction in the hidden group (``inputs``: the columns of
    weight_ih that unit 1 removes, None when weight_ih reads another group)."""
    rows = gate_rows(hidden, gates)
    found = [(f"{prefix}.weight_ih{suffix}", 0, rows)]
    if inputs is not None:
        found.append((f"{prefix}.weight_ih{suffix}", 1, inputs))
    found += [(f"{prefix}.weight_hh{suffix}", 0, rows), (f"{prefix}.weight_hh{suffix}", 1, [1])]
    if bias:
        found += [(f"{prefix}.bias_ih{suffix}", 0, rows), (f"{prefix}.bias_hh{suffix}", 0, rows)]
    return found


class Head(nn.Module):
    """A recurrent layer, its output read by a linear layer."""

    def __init__(self, rnn: nn.RNNBase, width: int) -> None:
        super().__init__()
        self.rnn, self.fc = rnn, nn.Linear(width, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.rnn(x)[0])


class Tagger(nn.Module):
    """Embedding -> LSTM -> Linear, reading the last layer's final state and the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.rnn, self.fc = nn.Embedding(20, 6), nn.LSTM(6, 5, batch_first=True), nn.Linear(5, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        out, (h, _) = self.rnn(self.emb(tokens))
        return self.fc(h[-1]) + self.fc(out[:, -1])


class Initial(nn.Module):
    """An LSTM whose initial states are computed from a context vector."""

    def __init__(self) -> None:
        super().__init__()
        self.h0, self.c0 = nn.Linear(4, 5), nn.Linear(4, 5)
        self.rnn, self.fc = nn.LSTM(3, 5), nn.Linear(5, 2)

    def forward(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        out, (_, c) = self.rnn(x, (self.h0(z).unsqueeze(0), torch.tanh(self.c0(z)).unsqueeze(0)))
        return self.fc(out), self.fc(c)


class GruInitial(nn.Module):
    """A batch-first GRU with an initial state from a context vector."""

    def __init__(self) -> None:
        super().__init__()
        self.h0, self.rnn, self.fc = nn.Linear(4, 5), nn.GRU(3, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return self.fc(self.rnn(x, self.h0(z).unsqueeze(0))[0])


X = torch.randn(4, 2, 3)


# -- groups ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_single_layer_hidden_group(cls: type[nn.RNNBase], gates: int) -> None:
    a = analyze(Head(cls(3, 6), 6), X)
    assert groups(a) == [(6, [*layer_members("rnn", "_l0", 6, gates, None), ("fc.weight", 1, [1])])]
    assert pinned(a, "gate blocks") == ({("rnn.weight_ih_l0", 0), ("rnn.weight_hh_l0", 0), ("rnn.bias_ih_l0", 0),
                                         ("rnn.bias_hh_l0", 0)} if gates > 1 else set())
    assert ("rnn.weight_ih_l0", 1) in pinned(a, "model input")


def test_two_layer_bidirectional_lstm_is_one_hidden_group() -> None:
    a = analyze(Head(nn.LSTM(3, 4, num_layers=2, bidirectional=True), 8), X)
    both_halves = [1, 5]
    expected = [
        *layer_members("rnn", "_l0", 4, 4, None),
        *layer_members("rnn", "_l0_reverse", 4, 4, None),
        *layer_members("rnn", "_l1", 4, 4, both_halves),
        *layer_members("rnn", "_l1_reverse", 4, 4, both_halves),
        ("fc.weight", 1, both_halves),
    ]
    assert groups(a) == [(4, expected)]


def test_lstm_without_bias() -> None:
    a = analyze(Head(nn.LSTM(3, 4, num_layers=2, bias=False), 4), X)
    expected = [*layer_members("rnn", "_l0", 4, 4, None, bias=False),
                *layer_members("rnn", "_l1", 4, 4, [1], bias=False), ("fc.weight", 1, [1])]
    assert groups(a) == [(4, expected)]


def test_projection_is_its_own_group() -> None:
    a = analyze(Head(nn.LSTM(3, 6, num_layers=2, proj_size=4), 4), X)
    rows = gate_rows(6, 4)
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    hidden = [(f"rnn.{w}_l{layer}", 0, rows) for layer in (0, 1) for w in names]
    hidden = [m for layer in (0, 1) for m in [*hidden[4 * layer : 4 * layer + 4], (f"rnn.weight_hr_l{layer}", 1, [1])]]
    projection = [("rnn.weight_hh_l0", 1, [1]), ("rnn.weight_hr_l0", 0, [1]), ("rnn.weight_ih_l1", 1, [1]),
                  ("rnn.weight_hh_l1", 1, [1]), ("rnn.weight_hr_l1", 0, [1]), ("fc.weight", 1, [1])]
    assert groups(a) == [(6, hidden), (4, projection)]


def test_embedding_lstm_linear() -> None:
    a = analyze(Tagger(), torch.randint(0, 20, (2, 4)))
    assert groups(a) == [
        (6, [("emb.weight", 1, [1]), ("rnn.weight_ih_l0", 1, [1])]),
        (5, [*layer_members("rnn", "_l0", 5, 4, None), ("fc.weight", 1, [1])]),
    ]


def test_initial_states_join_the_hidden_group() -> None:
    a = analyze(Initial(), X, torch.randn(2, 4))
    state = [("h0.weight", 0, [1]), ("h0.bias", 0, [1]), ("c0.weight", 0, [1]), ("c0.bias", 0, [1])]
    assert groups(a) == [(5, [*state, *layer_members("rnn", "_l0", 5, 4, None), ("fc.weight", 1, [1])])]


class Final(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.rnn(x)[1]


def test_returned_state_pins_hidden_and_layer_axes() -> None:
    a = analyze(Final(), X)
    assert groups(a) == []
    assert {("rnn.weight_hh_l0", 1), ("rnn.weight_hh_l0", 0)} <= pinned(a, "model output")


def test_output_and_final_state_axes() -> None:
    """A 3-layer GRU related as a subgraph (nothing pinned at its boundary), batch-first input (2, 4, 3):
    output (batch, seq, hidden) and h_n (layers, batch, hidden); seq and layers are pinned."""
    gm = analyze(Head(nn.GRU(3, 4, num_layers=3, batch_first=True), 4), X.transpose(0, 1)).graph
    u = Unifier()
    batch, seq, features = (u.new(n) for n in (2, 4, 3))
    cx = relate(gm, u, inputs=[(batch, seq, features)])
    out, h_n = (tuple(u.resolve(e) for e in axes) for axes in cx.axes[next(n for n in cx.axes if n.name == "rnn")])
    assert out[:2] == (batch, seq) and h_n[1:] == (batch, out[2])
    assert [u.pin_reason(a) for a in (batch, seq, features, out[2])] == [None, rnn_rules.SEQUENCE, None, None]
    assert (h_n[0].size, u.pin_reason(h_n[0])) == (3, rnn_rules.LAYERS)


class Packed(nn.Module):
    def forward(self, x: Tensor) -> PackedSequence:
        return pack_padded_sequence(x, [4, 3])


class PackedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pack, self.rnn, self.fc = Packed(), nn.GRU(3, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.rnn(self.pack(x))[1])


def test_packed_sequence_pins_everything() -> None:
    a = depgraph.analyze(PackedHead(), (X,), leaf_modules=["pack"])
    assert groups(a) == []
    assert pinned(a, "PackedSequence") == {("rnn.weight_ih_l0", 0), ("rnn.weight_ih_l0", 1), ("rnn.weight_hh_l0", 0),
                                           ("rnn.weight_hh_l0", 1), ("rnn.bias_ih_l0", 0), ("rnn.bias_hh_l0", 0),
                                           ("fc.weight", 1)}


# -- prune and simulate ----------------------------------------------------------------------


EQUIVALENCE = {
    "lstm-2x-bidirectional": (lambda: Head(nn.LSTM(3, 5, num_layers=2, bidirectional=True), 10), (X,)),
    "lstm-projection-bidirectional": (lambda: Head(nn.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=2), 4),
                                      (X,)),
    "gru-batch-first-initial-state": (GruInitial, (X.transpose(0, 1), torch.randn(2, 4))),
    "rnn-relu-unbatched-bidirectional": (lambda: Head(nn.RNN(3, 5, num_layers=2, nonlinearity="relu",
                                                             bidirectional=True), 10), (X[:, 0],)),
    "embedding-lstm-linear": (Tagger, (torch.randint(0, 20, (2, 4)),)),
    "lstm-initial-states": (Initial, (X, torch.randn(2, 4))),
}


@pytest.mark.parametrize("name", EQUIVALENCE)
def test_simulate_equals_prune_on_random_plans(name: str) -> None:
    torch.manual_seed(0)
    build, inputs = EQUIVALENCE[name]
    model = build().eval()
    a = depgraph.analyze(model, inputs)
    assert a.groups
    for keep in prunable_keeps(a, 3):
        check_plan(model, inputs, depgraph.Plan.from_keep(a, keep))


def prunable_keeps(a: depgraph.Analysis, count: int) -> list[dict[int, Tensor]]:
    """``count`` random keeps, leaving out those that keep as many hidden as projection units
    (groups 0 and 1 of a model whose LSTM has projections), which prune refuses."""
    projection = any(m.name.startswith("rnn.weight_hr") for g in a.groups for m in g.members)
    keeps = (random_keep(a, seed) for seed in range(100))
    return [k for k in keeps if not projection or len(k[0]) != len(k[1])][:count]


def test_pruned_lstm_is_an_lstm_that_reads_its_new_weights() -> None:
    model = Head(nn.LSTM(3, 5, num_layers=2, bidirectional=True), 10).eval()
    a = depgraph.analyze(model, (X,))
    small = depgraph.prune(model, depgraph.Plan.from_keep(a, {0: [0, 3]}))
    rnn = small.rnn
    assert type(rnn) is nn.LSTM and (rnn.input_size, rnn.hidden_size, rnn.proj_size) == (3, 2, 0)
    assert rnn.weight_ih_l1.shape == (8, 4) and small.fc.weight.shape == (2, 4)
    assert all(w is getattr(rnn, n) for w, n in zip(rnn._flat_weights, rnn._flat_weights_names))
    out, (h, c) = rnn(X)
    assert out.shape == (4, 2, 4) and h.shape == c.shape == (4, 2, 2)
    kept = [0, 3, 5, 8]  # units 0 and 3 of the forward and of the reverse half
    assert torch.equal(small.fc.weight, model.fc.weight[:, kept])
    kept_rows = [0, 3, 5, 8, 10, 13, 15, 18]
    assert torch.equal(rnn.weight_hh_l1_reverse, model.rnn.weight_hh_l1_reverse[kept_rows][:, [0, 3]])


def test_pruned_projection_sizes() -> None:
    model = Head(nn.LSTM(3, 6, proj_size=3), 3).eval()
    a = depgraph.analyze(model, (X,))
    rnn = depgraph.prune(model, depgraph.Plan.from_keep(a, {0: [0, 1, 4, 5], 1: [2]})).rnn
    assert (rnn.hidden_size, rnn.proj_size) == (4, 1)
    assert rnn(X)[0].shape == (4, 2, 1)


def test_equal_hidden_and_projection_widths_are_refused() -> None:
    model = Head(nn.LSTM(3, 6, proj_size=3), 3).eval()
    a = depgraph.analyze(model, (X,))
    plan = depgraph.Plan.from_keep(a, {0: [0, 1, 2], 1: [0, 1, 2]})
    with pytest.raises(PlanError, match="3 hidden and 3 projection units"):
        depgraph.prune(model, plan)
    depgraph.simulate(model, plan)(X)  # masks keep the shapes: nothing to refuse
