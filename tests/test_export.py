"""The torch.export frontend: ``depgraph.analyze(..., tracer="export" | "auto")``.

The fx frontend is the oracle: on every model both can trace, export must find the same
groups (sizes, member names, axes, indices). Models fx cannot trace (shape-dependent
control flow, a Python loop over ``chunk`` results) are analyzed by ``tracer="auto"``
through export, and pruning and simulating them must agree (``check_plan``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from equivalence import check_plan, fingerprint, random_keep
from torch import Tensor, fx, nn
from zoo import ZOO

import depgraph
from depgraph import Analysis, InputError, TraceError

Groups = list[tuple[int, list[tuple[str, int, list[int]]]]]


def _groups(a: Analysis) -> Groups:
    return [(g.size, [(m.name, m.dim, m.indices([0]).tolist()) for m in g.members]) for g in a.groups]


def _canonical(a: Analysis) -> list[Any]:
    """Groups and pins as sets: the order of first use may differ between frontends."""
    groups = sorted((size, sorted(members)) for size, members in _groups(a))
    pins = sorted((p.size, p.reason, sorted(p.members)) for p in a.pinned)
    return [groups, pins, sorted(u.op for u in a.unsupported)]


class ShapeGuarded(nn.Module):
    """``model`` behind a branch on the input's shape: torch.fx cannot trace it, export can."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *xs: Tensor) -> Any:
        if xs[0].shape[0] > 0:
            return self.model(*xs)
        raise ValueError("empty batch")


# -- export finds what fx finds ------------------------------------------------------------

ACCESS_ORDER = {"layer_scale"}
"""Models that read a parameter directly (``self.gamma * ...``) before the modules that
precede its use: fx meets it where Python reads it, export where an op first uses it, so
the member order (and the fingerprint) differs; the groups do not."""


@pytest.mark.parametrize("name", list(ZOO))
def test_export_finds_the_groups_fx_finds(name: str) -> None:
    case = ZOO[name]
    model, inputs = case.factory().eval(), case.example_inputs()
    by_fx = depgraph.analyze(model, inputs, tracer="fx")
    by_export = depgraph.analyze(model, inputs, tracer="export")
    assert (by_fx.tracer, by_export.tracer) == ("fx", "export")
    assert by_export.groups, "every zoo model has a group"
    assert _canonical(by_export) == _canonical(by_fx)
    if name not in ACCESS_ORDER:
        assert _groups(by_export) == _groups(by_fx)
        assert by_export.fingerprint == by_fx.fingerprint


class Mixed(nn.Module):
    """Pooling, resizing, padding, gather and an index by a buffer, einsum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 5)
        self.out = nn.Linear(5, 4)
        self.register_buffer("gidx", torch.tensor([0, 3, 5]).expand(2, 6, 3).clone(), persistent=False)
        self.register_buffer("idx", torch.tensor([1]), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv(x))
        h = F.interpolate(F.max_pool2d(h, 2) + F.avg_pool2d(h, 2), scale_factor=2)
        h = self.conv2(torch.constant_pad_nd(F.pad(h, (1, 1)), (0, 0, 1, 1))).flatten(2)
        h = torch.gather(h, 2, self.gidx)[:, :, self.idx]
        t = self.fc(F.adaptive_avg_pool1d(h, 1).squeeze(-1))
        return self.out(torch.einsum("bi,bj->bi", t, t))


def test_aten_rules_for_pooling_padding_gather_index_and_einsum() -> None:
    model, x = Mixed().eval(), torch.randn(2, 3, 8, 8)
    a = depgraph.analyze(model, x, tracer="export")
    assert _groups(a) == [
        (8, [("conv.weight", 0, [0]), ("conv.bias", 0, [0]), ("conv2.weight", 1, [0])]),
        # gather keeps the channel axis: the index buffer's channel axis goes with it
        (6, [("conv2.weight", 0, [0]), ("conv2.bias", 0, [0]), ("gidx", 1, [0]), ("fc.weight", 1, [0])]),
        (5, [("fc.weight", 0, [0]), ("fc.bias", 0, [0]), ("out.weight", 1, [0])]),
    ]
    assert a.unsupported == []
    reasons = {m: p.reason for p in a.pinned for m in p.members}
    assert reasons[("gidx", 2)] == "indexed by a tensor (advanced indexing)"
    assert _canonical(a) == _canonical(depgraph.analyze(model, x, tracer="fx"))


class Constants(nn.Module):
    """A plain tensor attribute (not a buffer) and a tensor made in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)
        self.shift = torch.linspace(-1, 1, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x) * torch.tensor([2.0]) + self.shift)


def test_tensor_constants_are_related_as_buffers_as_in_fx() -> None:
    model, x = Constants(), torch.randn(2, 4)
    a = depgraph.analyze(model, x, tracer="export")
    assert _groups(a) == [(8, [("a.weight", 0, [0]), ("a.bias", 0, [0]), ("shift", 0, [0]), ("b.weight", 1, [0])])]
    assert _groups(a) == _groups(depgraph.analyze(model, x, tracer="fx"))


def test_the_graph_reads_the_model_s_own_tensors_by_name_and_changes_nothing() -> None:
    model, inputs = ZOO["conv_bn_relu"].factory().train(), ZOO["conv_bn_relu"].example_inputs()
    before = fingerprint(model)
    a = depgraph.analyze(model, inputs, tracer="export")
    assert fingerprint(model) == before, "a training-mode batch norm must not update its statistics"
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    reads = {str(n.target) for n in a.graph.graph.nodes if n.op == "get_attr"}
    assert reads == set(own)
    assert all(a.graph.get_parameter(n) is own[n] for n, _ in model.named_parameters())
    assert [str(n.target) for n in a.graph.graph.nodes if n.op == "call_module"] == ["_guards_fn"]


def test_a_model_on_the_meta_device() -> None:
    case = ZOO["attention"]
    with torch.device("meta"):
        meta = case.factory()
    a = depgraph.analyze(meta, case.example_inputs(), tracer="export")
    assert _groups(a) == _groups(depgraph.analyze(case.factory(), case.example_inputs(), tracer="export"))
    with torch.device("meta"):
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    inferred = depgraph.analyze(net, tracer="export")  # a meta input of shape (1, 3, 224, 224)
    assert _groups(inferred) == [(8, [("0.weight", 0, [0]), ("0.bias", 0, [0]), ("2.weight", 1, [0])])]


# -- models fx cannot trace --------------------------------------------------------------


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.bn(self.conv(x)))


class C2f(nn.Module):
    """YOLOv8's C2f: a Python list of ``chunk`` results, extended in a loop."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1 = ConvBN(3, 8)
        self.m = nn.ModuleList([ConvBN(4, 4, 3)])
        self.cv2 = ConvBN(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def _bn(prefix: str, unit: int) -> list[tuple[str, int, list[int]]]:
    return [(f"{prefix}.{p}", 0, [unit]) for p in ("weight", "bias", "running_mean", "running_var")]


def test_c2f_is_analyzed_through_export_with_both_halves_of_the_chunk() -> None:
    a = depgraph.analyze(C2f().eval(), torch.randn(2, 3, 8, 8))
    assert a.tracer == "export"
    assert _groups(a) == [
        (4, [("cv1.conv.weight", 0, [0]), *_bn("cv1.bn", 0), ("cv2.conv.weight", 1, [0])]),
        (4, [("cv1.conv.weight", 0, [4]), *_bn("cv1.bn", 4), ("m.0.conv.weight", 1, [0]),
             ("cv2.conv.weight", 1, [4])]),
        (4, [("m.0.conv.weight", 0, [0]), *_bn("m.0.bn", 0), ("cv2.conv.weight", 1, [8])]),
    ]


def test_pruning_c2f_rewrites_the_chunk_into_the_kept_sizes() -> None:
    model, x = C2f().eval(), torch.randn(2, 3, 8, 8)
    a = depgraph.analyze(model, x)
    pruned, _ = check_plan(model, (x,), depgraph.Plan.from_keep(a, {0: [0, 1], 1: [1, 2, 3], 2: [0, 3]}))
    assert isinstance(pruned, fx.GraphModule)
    splits = [n.args[1] for n in pruned.graph.nodes if n.target is torch.ops.aten.split_with_sizes.default]
    assert splits == [[2, 3]]
    assert pruned.cv2.conv.weight.shape == (5, 7, 1, 1)


class ShapeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3)
        self.b = nn.Conv2d(6, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        if h.shape[1] > 3:
            h = F.relu(h)
        return self.b(h)


def test_shape_dependent_control_flow_is_analyzed_through_export() -> None:
    a = depgraph.analyze(ShapeBranch(), torch.randn(1, 3, 8, 8))
    assert a.tracer == "export"
    assert _groups(a) == [(6, [("a.weight", 0, [0]), ("a.bias", 0, [0]), ("b.weight", 1, [0])])]


class ValueGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) if x.sum() > 0 else x


def test_when_every_tracer_fails_the_error_gives_every_reason() -> None:
    with pytest.raises(TraceError) as info:  # a branch on values, and meta inputs nothing can record
        depgraph.analyze(ValueGate(), torch.randn(2, 4, device="meta"))
    message = str(info.value)
    assert message.startswith("no tracer could turn ValueGate into a graph:")
    assert "\n- torch.fx could not trace the top-level ValueGate.forward" in message
    assert "\n- torch.export could not trace ValueGate: GuardOnDataDependentSymNode" in message
    assert "\n- " in message.split("GuardOnDataDependentSymNode", 1)[1]  # the recording tracer's reason
    assert depgraph.analyze(ValueGate(), torch.randn(2, 4)).tracer == "record"  # real inputs: recorded
    with pytest.raises(TraceError, match="^torch.export could not trace ValueGate"):
        depgraph.analyze(ValueGate(), torch.randn(2, 4), tracer="export")


# -- arguments ---------------------------------------------------------------------------


class Keywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x: Tensor, scale: float = 1.0, y: Tensor | None = None) -> Tensor:
        h = self.a(x) * scale
        return self.b(h + self.a(y) if y is not None else h)


def test_keyword_inputs_go_to_export() -> None:
    kwargs = {"x": torch.randn(2, 4), "y": torch.randn(2, 4)}
    a = depgraph.analyze(Keywords(), kwargs)
    assert a.tracer == "export"
    assert _groups(a) == [(6, [("a.weight", 0, [0]), ("a.bias", 0, [0]), ("b.weight", 1, [0])])]
    with pytest.raises(InputError, match="keyword example_inputs need tracer='export'"):
        depgraph.analyze(Keywords(), kwargs, tracer="fx")


def test_tracer_arguments_are_checked() -> None:
    with pytest.raises(InputError, match=r"tracer must be one of \['auto', 'fx', 'export', 'record'\], got 'jit'"):
        depgraph.analyze(ShapeBranch(), torch.randn(1, 3, 8, 8), tracer="jit")
    with pytest.raises(InputError, match="leaf_modules= keeps modules whole, which only tracer='fx' can do"):
        depgraph.analyze(ShapeBranch(), torch.randn(1, 3, 8, 8), tracer="export", leaf_modules=["a"])
    with pytest.raises(TraceError, match="\n- leaf_modules= keeps modules whole"):  # auto: fx fails, export may not
        depgraph.analyze(ShapeBranch(), torch.randn(1, 3, 8, 8), leaf_modules=["a"])


# -- prune and simulate on exported graphs ------------------------------------------------


class Statistics(nn.Module):
    """Statistics over pruned axes in an ATen graph: group and layer norm, softmax, var, std,
    amax, logsumexp, and a slice of a pruned axis."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 12)
        self.ln = nn.LayerNorm(12)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        t = self.ln(self.fc(F.relu(self.gn(self.conv(x))).mean((2, 3))))
        t = (t.softmax(-1) + t.var(-1, keepdim=True) + t.std(-1, unbiased=False, keepdim=True)
             + t.amax(-1, keepdim=True) + t.logsumexp(-1, keepdim=True))
        return self.head(t[:, 2:10])


class Attention(nn.Module):
    """Heads through ``F.scaled_dot_product_attention`` with the default scale."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, 4, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, n, 32))


EQUIVALENCE = {
    **{name: (lambda name=name: ZOO[name].factory(), ZOO[name].example_inputs)
       for name in ("depthwise", "grouped_conv", "channel_shuffle", "gqa", "fused_qkv_chunk", "cls_token",
                    "layer_scale")},
    "statistics": (Statistics, lambda: (torch.randn(2, 4, 6, 6),)),
    "sdpa": (Attention, lambda: (torch.randn(2, 5, 32),)),
    "c2f": (C2f, lambda: (torch.randn(2, 3, 8, 8),)),
    "constants": (Constants, lambda: (torch.randn(2, 4),)),
}


@pytest.mark.parametrize("name", list(EQUIVALENCE))
def test_prune_and_simulate_agree_on_exported_graphs(name: str) -> None:
    factory, inputs = EQUIVALENCE[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, x = ShapeGuarded(factory()).eval(), inputs()
    a = depgraph.analyze(model, x)
    assert a.tracer == "export"
    for seed in range(4):
        check_plan(model, x, depgraph.Plan.from_keep(a, random_keep(a, seed)))


# -- torchvision -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_have_the_same_groups_through_export(name: str) -> None:
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    by_fx = depgraph.analyze(model, x, tracer="fx")
    by_export = depgraph.analyze(model, x, tracer="export")
    assert len(by_export.groups) == len(by_fx.groups) == {"resnet18": 12, "mobilenet_v3_small": 27}[name]
    assert _canonical(by_export) == _canonical(by_fx)
    assert by_export.unsupported == []
