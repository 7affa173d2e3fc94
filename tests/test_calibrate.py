"""Batch-norm statistics re-estimated after pruning (``depgraph.recalibrate_batch_norm``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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
