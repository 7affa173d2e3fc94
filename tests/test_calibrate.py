"""Batch-norm statistics re-estimated after pruning (``depgraph.recalibrate_batch_norm``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import Branchy, tiny_llama

import depgraph


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.Dropout(0.5),
                         nn.Flatten(), nn.Linear(6 * 36, 2)).eval()


def test_statistics_are_the_average_of_each_batchs_after_pruning() -> None:
    net = _net()
    a = depgraph.analyze(net, torch.zeros(2, 3, 8, 8))
    pruned = depgraph.prune(net, depgraph.solve(a, 0.5))
    batches = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    fresh = depgraph.recalibrate_batch_norm(pruned, batches)
    with torch.no_grad():
        features = [pruned[2](pruned[1](pruned[0](x))) for x in batches]  # the batch norm's inputs
    means = torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0)
    variances = torch.stack([f.var((0, 2, 3), unbiased=True) for f in features]).mean(0)
    torch.testing.assert_close(fresh[3].running_mean, means)
    torch.testing.assert_close(fresh[3].running_var, variances)
    assert fresh[3].momentum == pruned[3].momentum and not fresh.training and not fresh[3].training
    assert pruned[3].num_batches_tracked.item() == 0  # the caller's model is untouched
    torch.testing.assert_close(pruned[3].running_mean, torch.zeros(3))
    assert fresh[3].running_mean.shape == (3,)


def test_inplace_and_keyword_batches() -> None:
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.net(image)

    model = Keyword()
    same = depgraph.recalibrate_batch_norm(model, [{"image": torch.randn(2, 3, 8, 8)}], inplace=True)
    assert same is model and model.net[3].num_batches_tracked.item() == 1


def test_clear_errors() -> None:
    with pytest.raises(depgraph.InputError, match="has no batch norm that tracks running statistics"):
        depgraph.recalibrate_batch_norm(nn.Linear(2, 2), [torch.zeros(1, 2)])
    with pytest.raises(depgraph.InputError, match="batches gave no batch"):
        depgraph.recalibrate_batch_norm(_net(), [])


def _two_layers() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2)).eval()


def test_taylor_and_hessian_by_hand() -> None:
    """Per entry: taylor = |w · Σ_b g_b|, hessian = w² · Σ_b g_b² / 2, with the mean square of
    the output as the loss; a unit's score sums its entries in every member (mean over the
    members, as the magnitude criteria)."""
    model = _two_layers()
    batches = [torch.randn(4, 2, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    grads = [torch.autograd.grad(model(x).square().mean(), list(model.parameters())) for x in batches]
    params = dict(model.named_parameters())
    taylor = depgraph.gradient_importance(model, batches)
    hessian = depgraph.gradient_importance(model, batches, kind="hessian")
    for i, name in enumerate(params):
        w = params[name].detach()
        torch.testing.assert_close(taylor[name], (w * (grads[0][i] + grads[1][i])).abs())
        torch.testing.assert_close(hessian[name], w.square() * (grads[0][i].square() + grads[1][i].square()) / 2)
    a = depgraph.analyze(model, torch.zeros(1, 2))
    by_unit = (taylor["0.weight"].sum(1) + taylor["0.bias"] + taylor["1.weight"].sum(0)) / 3
    weakest = int(by_unit.argmin())
    plan = depgraph.solve(a, 0.34, importance=taylor)
    assert plan.keep[0].tolist() == [u for u in range(3) if u != weakest]
    assert all(p.grad is None for p in model.parameters())  # no gradient left on the caller's model


def test_gradient_importance_leaves_the_model_as_it_was() -> None:
    model = _net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = depgraph.gradient_importance(model, [torch.randn(4, 3, 8, 8)], loss=lambda out, x: out.sum())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # batch norm buffers too
    assert set(scores) == {n for n, _ in model.named_parameters()} and model.training
    with pytest.raises(depgraph.InputError, match="kind must be one of taylor, hessian"):
        depgraph.gradient_importance(model, [torch.randn(4, 3, 8, 8)], kind="fisher")


def test_taylor_ranks_a_llama_analyzed_through_export() -> None:
    model = tiny_llama()
    ids = [torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    a = depgraph.analyze(model, {"input_ids": ids[0], "use_cache": False})
    scores = depgraph.gradient_importance(model, [{"input_ids": x, "labels": x} for x in ids],
                                          loss=lambda out, batch: out.loss)
    plan = depgraph.solve(a, 0.5, importance=scores)
    assert plan.keep and depgraph.solve(a, 0.5, importance=scores).keep.keys() == plan.keep.keys()
    assert all(torch.equal(plan.keep[i], depgraph.solve(a, 0.5, importance=scores).keep[i]) for i in plan.keep)


def test_taylor_ranks_a_recorded_model() -> None:
    torch.manual_seed(0)
    model, x = Branchy().eval(), torch.randn(2, 8)
    a = depgraph.analyze(model, x, tracer="record")
    scores = depgraph.gradient_importance(model, [x])
    by_unit = (scores["a.weight"].sum(1) + scores["a.bias"] + scores["b.weight"].sum(0)) / 3
    assert depgraph.solve(a, 0.5, importance=scores).keep[0].tolist() == sorted(by_unit.argsort()[3:].tolist())


def test_batches_with_labels_feed_the_model_their_inputs_and_the_loss_everything() -> None:
    model = _two_layers()
    data = [(torch.randn(4, 2, generator=torch.Generator().manual_seed(i)), torch.tensor([0, 1, 1, 0]))
            for i in range(2)]
    scores = depgraph.gradient_importance(model, data, inputs=lambda b: b[0],
                                          loss=lambda out, b: nn.functional.cross_entropy(out, b[1]))
    grads = [torch.autograd.grad(nn.functional.cross_entropy(model(x), y), model[0].weight)[0] for x, y in data]
    torch.testing.assert_close(scores["0.weight"], (model[0].weight.detach() * (grads[0] + grads[1])).abs())
    stats = depgraph.activation_stats(model, data, inputs=lambda b: b[0])
    assert stats["0.weight"].count == 8
    assert depgraph.recalibrate_batch_norm(_net(), [(torch.randn(2, 3, 8, 8), 0)], inputs=lambda b: b[0])
