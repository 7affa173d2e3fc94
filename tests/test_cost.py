"""The cost of a plan (``depgraph.cost``) equals counting the pruned model.

The reference counts the pruned model itself: ``sum(p.numel())`` and
``torch.utils.flop_counter`` (FLOPs / 2, with the CPU kernel of scaled dot-product
attention counted as its other kernels are). The cost is computed from the analysis
alone, for random plans on the zoo, a torchvision slice (on the meta device), attention
in its forms, recurrent layers and a grouped-query Llama through torch.export.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from zoo import ZOO, tiny_llama

import depgraph
from depgraph import Cost, CostModel, fuzz

aten = torch.ops.aten


def _cpu_attention(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(q, k, v)


def counted(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Cost:
    """Parameters and FLOPs / 2 of one forward pass, counted on the model itself (with
    autograd on: nn.MultiheadAttention's fused inference path is not counted otherwise)."""
    with FlopCounterMode(display=False, custom_mapping={aten._scaled_dot_product_flash_attention_for_cpu:
                                                        _cpu_attention}) as counter:
        model(*args, **(kwargs or {}))
    return Cost(sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2)


def random_plan(a: depgraph.Analysis, seed: int = 0) -> depgraph.Plan:
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for group in a.groups:
        n = int(torch.randint(group.min_keep, group.size + 1, (1,), generator=g))
        keep[group.index] = torch.randperm(group.size, generator=g)[:n].sort().values
    return depgraph.Plan.from_keep(a, keep)


def assert_exact(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None,
                 seeds: tuple[int, ...] = (0, 1)) -> depgraph.Analysis:
    model.eval()
    a = depgraph.analyze(model, kwargs or args)
    assert depgraph.cost(a) == counted(model, args, kwargs)
    for seed in seeds:
        plan = random_plan(a, seed)
        assert depgraph.cost(a, plan) == counted(depgraph.prune(model, plan), args, kwargs), seed
    return a


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo(name: str) -> None:
    assert_exact(ZOO[name].factory(), ZOO[name].example_inputs())


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_large", "densenet121", "vit_b_16", "googlenet",
                                  "shufflenet_v2_x1_0", "swin_t", "regnet_y_800mf"])
def test_torchvision_on_meta(name: str) -> None:
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    model = getattr(tvm, name)(weights=None, **kwargs).to("meta")
    assert_exact(model, (torch.randn(1, 3, 224, 224, device="meta"),), seeds=(0,))


def test_a_depthwise_multiplier_makes_a_stem_channel_cost_its_multiple() -> None:
    """Conv(3→4) → depthwise ×4 (4→16, groups=4) → Conv(16→2) on 8x8: one stem channel
    removes a stem row (3·1 + bias), four depthwise filters (4·1·9 + 4) and four columns
    of the last conv (4·2): 58 parameters, and per position 3 + 4·9 + 4·2 MACs."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 16, 3, padding=1, groups=4), nn.Conv2d(16, 2, 1))
    a = assert_exact(model, (torch.randn(2, 3, 8, 8),))
    (stem,) = [g for g in a.groups if ("0.weight", 0) in {(m.name, m.dim) for m in g.members}]
    assert CostModel(a).per_unit()[stem.index] == Cost(3 + 1 + 4 * 9 + 4 + 4 * 2, 2 * 64 * (3 + 4 * 9 + 4 * 2))


class _Attend(nn.Module):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.i, self.o = nn.Linear(8, 16), nn.Linear(16, 3)
        self.m = nn.MultiheadAttention(16, 4, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.i(x)
        return self.o(self.m(h, h, h, need_weights=False)[0])


@pytest.mark.parametrize("options", [{}, {"add_bias_kv": True}, {"add_zero_attn": True}, {"batch_first": True}])
def test_multihead_attention(options: dict[str, Any]) -> None:
    assert_exact(_Attend(**options), (torch.randn(5, 2, 8),))


@pytest.mark.parametrize("kind", [nn.GRU, nn.RNN])
def test_recurrent_layers_against_the_flop_counter(kind: type[nn.RNNBase]) -> None:
    model = nn.Sequential(nn.Linear(8, 8), kind(8, 6, num_layers=2, bidirectional=True))
    a = depgraph.analyze(model.eval(), torch.randn(5, 2, 8))
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(5, 2, 8))
    assert depgraph.cost(a).macs == counter.get_total_flops() // 2


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.i, self.r, self.o = nn.Linear(8, 8), nn.LSTM(8, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.r(self.i(x))[0])


def test_lstm_by_hand() -> None:
    """The flop counter does not see LSTM's CPU kernel: steps · batch · 4h · (in + h), with
    the pruned hidden width, beside the two linear layers."""
    model = _Recurrent()
    a = depgraph.analyze(model.eval(), torch.randn(5, 2, 8))
    (hidden,) = [g for g in a.groups if g.size == 6]
    plan = depgraph.Plan.from_keep(a, {hidden.index: [0, 2, 3]})
    assert depgraph.cost(a).macs == 5 * 2 * (8 * 8 + 24 * (8 + 6) + 2 * 6)
    assert depgraph.cost(a, plan).macs == 5 * 2 * (8 * 8 + 12 * (8 + 3) + 2 * 3)
    assert depgraph.cost(a, plan).params == sum(p.numel() for p in depgraph.prune(model, plan).parameters())


def test_grouped_query_llama_through_export() -> None:
    model = tiny_llama(layers=2)
    assert_exact(model, (), {"input_ids": torch.randint(0, 64, (2, 7)), "use_cache": False})


def test_a_plan_for_another_analysis_is_refused() -> None:
    a = depgraph.analyze(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), torch.zeros(1, 4))
    b = depgraph.analyze(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)), torch.zeros(1, 4))
    with pytest.raises(depgraph.PlanError):
        depgraph.cost(a, depgraph.solve(b, 0.5))


def test_einsum_with_an_ellipsis() -> None:
    class Project(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w, self.o = nn.Parameter(torch.randn(8, 4)), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(torch.einsum("...ij,jk->...ik", x, self.w))

    assert_exact(Project(), (torch.randn(2, 5, 8),))


def test_a_product_its_axes_cannot_express_is_reported() -> None:
    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(4, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("ij,jk,kl->il", x, self.a, self.b)

    a = depgraph.analyze(Chain(), torch.randn(2, 8))
    with pytest.warns(UserWarning, match=r"the MACs of einsum cannot be written over their axes"):
        assert depgraph.cost(a).macs == 0


def _one_entry_einsum(program: fuzz.Program) -> bool:
    """An einsum contracting one entry: torch runs it as an elementwise product, which the
    flop counter does not see (depgraph counts its multiplies)."""
    return any((op.kind == "einsum_attention" and op.get("dim") == 1)
               or (op.kind == "matmul" and op.get("how") == "einsum" and op.shapes[0][1 if op.rank == 4 else -1] == 1)
               for op in program.ops)


@pytest.mark.parametrize("first", [0, 20, 40])
def test_random_models(first: int) -> None:
    """Fuzzer models (``depgraph.fuzz``) with plans that keep at least two units per group:
    the cost equals counting the pruned model (parameters the forward reads)."""
    wrong = {}
    for seed in range(first, first + 20):
        program = fuzz.generate(seed)
        if _one_entry_einsum(program) or any(op.get("how") == "lstm" for op in program.ops):
            continue
        model, x = fuzz.build(program).eval(), fuzz.example(program)
        try:
            a = depgraph.analyze(model, x, tracer=program.tracer)
        except depgraph.DepgraphError:
            continue
        g = torch.Generator().manual_seed(seed)
        plan = depgraph.Plan.from_keep(a, {
            group.index: torch.randperm(group.size, generator=g)[:max(2, group.min_keep, group.size // 2)].sort().values
            for group in a.groups
        })
        pruned = depgraph.prune(model, plan)
        read = Cost(sum(p.numel() for n, p in pruned.named_parameters() if n in a.params), counted(pruned, (x,)).macs)
        if depgraph.cost(a, plan) != read:
            wrong[seed] = (depgraph.cost(a, plan), read)
    assert not wrong
