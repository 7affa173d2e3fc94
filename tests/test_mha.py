"""PrunedMultiheadAttention, the module prune puts in place of a pruned nn.MultiheadAttention.

Built from an unpruned nn.MultiheadAttention it must compute exactly what that module
computes, in every configuration of the constructor and the call; pruned, it must compute
what the simulated (masked) original computes.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from equivalence import check_plan, random_keep
from torch import Tensor, nn

import depgraph
from passes.mha import PrunedMultiheadAttention

E, H, L, S, N = 8, 2, 3, 4, 2

MODULES = [dict(zip(("batch_first", "separate", "bias", "add_bias_kv", "add_zero_attn"), flags))
           for flags in itertools.product([False, True], repeat=5)]
CALLS = [dict(zip(("need_weights", "average_attn_weights", "padding", "mask"), flags))
         for flags in itertools.product([True, False], [True, False], [False, True], [None, "bool", "float"])]


def _module(separate: bool, **kwargs: Any) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    extra = {"kdim": 6, "vdim": 5} if separate else {}
    return nn.MultiheadAttention(E, H, **extra, **kwargs).eval()


def _inputs(m: nn.MultiheadAttention, batched: bool, padding: bool, mask: str | None) -> tuple[list[Tensor], dict]:
    gen = torch.Generator().manual_seed(1)

    def x(n: int, width: int) -> Tensor:
        shape = ((N, n) if m.batch_first else (n, N)) if batched else (n,)
        return torch.randn(*shape, width, generator=gen)

    kwargs: dict[str, Any] = {}
    if padding and batched:
        kwargs["key_padding_mask"] = torch.tensor([[False, True, False, True], [False, False, True, False]])
    if mask == "bool":
        kwargs["attn_mask"] = torch.tensor([[False, True, False, False]] * L)
    elif mask == "float" and batched:
        kwargs["attn_mask"] = torch.randn(N * H, L, S, generator=gen)
    return [x(L, E), x(S, m.kdim), x(S, m.vdim)], kwargs


@pytest.mark.parametrize("config", MODULES, ids=lambda c: "-".join(k for k, v in c.items() if v) or "plain")
def test_unpruned_it_computes_what_nn_multihead_attention_computes(config: dict[str, bool]) -> None:
    m = _module(**config)
    same = PrunedMultiheadAttention(m).eval()
    assert (same.embed_dim, same.kdim, same.vdim, same.num_heads, same.head_dim) == (
        m.embed_dim, m.kdim, m.vdim, m.num_heads, m.head_dim)
    for call, batched in itertools.product(CALLS, [True, False]):
        (q, k, v), kwargs = _inputs(m, batched, call["padding"], call["mask"])
        options = {"need_weights": call["need_weights"], "average_attn_weights": call["average_attn_weights"]}
        with torch.no_grad():
            want, got = m(q, k, v, **kwargs, **options), same(q, k, v, **kwargs, **options)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        assert (got[1] is None) == (want[1] is None)
        if want[1] is not None:
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_is_causal_without_a_mask_is_refused_as_nn_multihead_attention_refuses_it() -> None:
    m = _module(separate=False)
    x = torch.randn(L, N, E)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        PrunedMultiheadAttention(m)(x, x, x, is_causal=True)


class Block(nn.Module):
    """Linear stream -> attention (keys and values from a memory) -> Linear, with padding."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.q, self.kv, self.out = nn.Linear(4, E), nn.Linear(4, E), nn.Linear(E, 3)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True, **kwargs)

    def forward(self, x: Tensor, memory: Tensor, padding: Tensor) -> Tensor:
        kv = self.kv(memory)
        y, _ = self.attn(self.q(x), kv, kv, key_padding_mask=padding, need_weights=False)
        return self.out(torch.relu(y))


@pytest.mark.parametrize("kwargs", [{}, {"add_bias_kv": True}, {"add_zero_attn": True}, {"bias": False}])
def test_pruned_attention_equals_the_simulated_one(kwargs: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = Block(**kwargs).eval()
    inputs = (torch.randn(N, L, 4), torch.randn(N, S, 4), torch.tensor([[False, False, True, False]] * N))
    a = depgraph.analyze(model, inputs)
    # the query width, the key/value width (one packed projection: the same), the heads, the output width
    assert [g.size for g in a.groups] == [E, H, E]
    for seed in range(3):
        pruned, _ = check_plan(model, inputs, depgraph.Plan.from_keep(a, random_keep(a, seed)))
        assert isinstance(pruned.attn, PrunedMultiheadAttention)
