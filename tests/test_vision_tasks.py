"""torchvision beyond classification: segmentation, video, and detection through the
recording tracer (``tracer="record"``, tried by ``"auto"`` after fx and export).

Detection outputs in eval mode depend on the data (score thresholds, NMS), and a recorded
graph is specialized to the run it recorded: pruned weights change how many boxes survive,
so the whole graph cannot run again. Its equivalence check compares what comes before the
first data-dependent op, on the example input: the RPN head's objectness and box deltas
on every FPN level, which depend on the backbone, the FPN and the RPN head.
"""

from __future__ import annotations

import pytest
import torch
from equivalence import FLOOR, RTOL, calibrate, check_plan, fingerprint, outputs_of, random_keep, weight_ops
from torch import nn
from torchvision.models import detection, segmentation, video

import depgraph
from depgraph import Analysis, TraceError


def _members(a: Analysis, index: int) -> list[tuple[str, int]]:
    return [(m.name, m.dim) for m in a.groups[index].members]


def _pruned_axes(a: Analysis) -> set[tuple[str, int]]:
    return {(m.name, m.dim) for g in a.groups for m in g.members}


def test_segmentation_lraspp_through_fx() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = calibrate(segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None), x)
    a = depgraph.analyze(model, x[:1])
    assert (a.tracer, len(a.groups), a.unsupported) == ("fx", 30, [])
    assert _members(a, 29) == [  # the high branch's 128 channels, gated by the scale branch
        ("classifier.cbr.0.weight", 0), ("classifier.cbr.1.weight", 0), ("classifier.cbr.1.bias", 0),
        ("classifier.cbr.1.running_mean", 0), ("classifier.cbr.1.running_var", 0),
        ("classifier.scale.1.weight", 0), ("classifier.high_classifier.weight", 1),
    ]
    classes = [p for p in a.pinned if ("classifier.low_classifier.weight", 0) in p.members]
    assert [(p.size, p.reason) for p in classes] == [(21, "axis of a model output")]
    check_plan(model, (x[:1],), depgraph.Plan.from_keep(a, random_keep(a, 0)))


def test_video_r3d_18_through_fx() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 32, 32)
    model = calibrate(video.r3d_18(weights=None), x)
    a = depgraph.analyze(model, x[:1])
    # as resnet18: the stem/layer1 stream, one per block's inner conv, layer2-4 streams
    assert (a.tracer, len(a.groups), a.unsupported) == ("fx", 12, [])
    assert _members(a, 11) == [
        ("layer4.1.conv1.0.weight", 0), ("layer4.1.conv1.1.weight", 0), ("layer4.1.conv1.1.bias", 0),
        ("layer4.1.conv1.1.running_mean", 0), ("layer4.1.conv1.1.running_var", 0), ("layer4.1.conv2.0.weight", 1),
    ]
    assert ("fc.weight", 0) not in _pruned_axes(a)
    check_plan(model, (x[:1],), depgraph.Plan.from_keep(a, random_keep(a, 1)))


# -- detection: the recording tracer ---------------------------------------------------------


def _fasterrcnn() -> tuple[nn.Module, tuple[list[torch.Tensor]]]:
    torch.manual_seed(0)
    model = detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, min_size=128, max_size=128
    )
    calibrate(model.backbone, torch.rand(2, 3, 128, 128))  # random-init batch norms fade activations
    return model.eval(), ([torch.rand(3, 128, 128)],)


def test_fasterrcnn_is_recorded_with_its_heads_prunable() -> None:
    model, inputs = _fasterrcnn()
    before = fingerprint(model)
    a = depgraph.analyze(model, inputs)
    assert fingerprint(model) == before
    assert (a.tracer, len(a.groups)) == ("record", 33)
    # roi_align has a rule; what selects boxes by their values has none
    assert sorted({u.op.rpartition(".")[0].rpartition(".")[2] for u in a.unsupported}) == [
        "index_put_", "nms", "topk", "where"]
    assert _members(a, 30) == [
        ("rpn.head.conv.0.0.weight", 0), ("rpn.head.conv.0.0.bias", 0),
        ("rpn.head.cls_logits.weight", 1), ("rpn.head.bbox_pred.weight", 1),
    ]
    assert _members(a, 32) == [
        ("roi_heads.box_head.fc7.weight", 0), ("roi_heads.box_head.fc7.bias", 0),
        ("roi_heads.box_predictor.cls_score.weight", 1), ("roi_heads.box_predictor.bbox_pred.weight", 1),
    ]
    # the FPN's lateral channels are prunable; its output channels are written into a zeros
    # tensor of literal size by MultiScaleRoIAlign (index_put_), so they are pinned
    assert ("backbone.fpn.inner_blocks.0.0.weight", 0) in _pruned_axes(a)
    assert ("backbone.fpn.layer_blocks.0.0.weight", 0) not in _pruned_axes(a)
    assert {("roi_heads.box_predictor.cls_score.weight", 0), ("rpn.head.cls_logits.weight", 0)}.isdisjoint(
        _pruned_axes(a))


def test_fasterrcnn_prune_and_simulate_agree_before_the_first_data_dependent_op() -> None:
    model, inputs = _fasterrcnn()
    a = depgraph.analyze(model, inputs, tracer="record")
    plan = depgraph.Plan.from_keep(a, random_keep(a, 0))
    simulated, pruned = depgraph.simulate(model, plan), depgraph.prune(model, plan)
    # the recorded graph cannot run again once pruned (it is specialized to the boxes of the
    # recorded run); the model's own class runs, and gave the graph's value in every module
    # the graph computed before it stopped, so prune returns it
    assert type(pruned) is type(model)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    heads = ("rpn.head.cls_logits", "rpn.head.bbox_pred")
    yp: list[torch.Tensor] = []
    hooks = [pruned.get_submodule(h).register_forward_hook(lambda _m, _i, out: yp.append(out)) for h in heads]
    with torch.no_grad():
        ys = outputs_of(simulated, weight_ops(a, {f"{h}.weight" for h in heads}))(*inputs[0])
        pruned(*inputs)
    for hook in hooks:
        hook.remove()
    assert [tuple(y.shape) for y in ys] == [(1, 15, 4, 4), (1, 60, 4, 4), (1, 15, 4, 4), (1, 60, 4, 4),
                                            (1, 15, 2, 2), (1, 60, 2, 2)]  # two FPN levels and the pool
    assert len(yp) == len(ys)
    for s, p in zip(ys, yp):
        scale = max(s.abs().max().item(), FLOOR)
        assert scale > FLOOR and (s - p).abs().max().item() <= RTOL * scale
    with torch.no_grad():  # any number of images, of any size
        out = pruned([torch.rand(3, 200, 160), torch.rand(3, 96, 128)])
    assert [sorted(d) for d in out] == [["boxes", "labels", "scores"]] * 2


def test_recording_needs_real_tensors() -> None:
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(TraceError, match="^the recording tracer runs Sequential on its example inputs, which cannot"):
        depgraph.analyze(net, torch.zeros(1, 4), tracer="record")
    with pytest.raises(TraceError, match="^the recording tracer runs the model on real example inputs"):
        depgraph.analyze(nn.Linear(4, 2), tracer="record")


class ValueGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(x) if x.sum() > 0 else x)


def test_auto_records_what_fx_and_export_cannot_trace_for_the_branch_taken() -> None:
    x = torch.ones(2, 4)
    a = depgraph.analyze(ValueGate(), x)
    assert a.tracer == "record"
    assert [(g.size, _members(a, g.index)) for g in a.groups] == [
        (4, [("fc.weight", 0), ("fc.bias", 0), ("out.weight", 1)])]
    assert depgraph.analyze(ValueGate(), -x).groups == []  # the other branch: x goes to out, pinned
    with pytest.raises(TraceError) as info:
        depgraph.analyze(ValueGate(), torch.ones(2, 4, device="meta"))
    reasons = str(info.value).split("\n- ")
    assert [r.split(" ", 3)[:3] for r in reasons[1:]] == [
        ["torch.fx", "could", "not"], ["torch.export", "could", "not"], ["the", "recording", "tracer"]]


def test_a_frontend_that_fails_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    # torch.export prints the graph it traced so far before raising; auto goes on to record
    depgraph.analyze(ValueGate(), torch.ones(2, 4))
    assert capsys.readouterr().err == ""


class _L2Norm(nn.Module):
    """SSD's VGG feature scaling: channels normalized to unit L2 norm, then scaled."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.full((8,), 20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale.view(1, -1, 1, 1) * nn.functional.normalize(torch.relu(self.conv(x)))


def test_simulated_l2_normalization_divides_removed_channels_by_one_not_zero() -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(_L2Norm(), nn.Conv2d(8, 4, 1)).eval(), torch.randn(2, 3, 8, 8)
    a = depgraph.analyze(model, (x,), tracer="export")  # fx keeps F.normalize whole; ATen divides
    assert (len(a.groups), set(_members(a, 0))) == (
        1, {("0.conv.weight", 0), ("0.conv.bias", 0), ("0.scale", 0), ("1.weight", 1)})
    plan = depgraph.Plan.from_keep(a, {0: torch.tensor([0, 2, 5])})
    simulated, pruned = check_plan(model, (x,), plan)
    simulated(x).sum().backward()  # 0 / 0 in a removed channel would make every gradient NaN
    assert all(torch.isfinite(p.grad).all() for p in simulated.parameters())
