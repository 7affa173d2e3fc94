"""Re-estimating batch-norm statistics after pruning: ``depgraph.recalibrate_batch_norm``.

Pruning removes channels, so every later batch norm sees inputs whose statistics moved
(a conv that lost input channels sums fewer terms); its running mean and variance, kept
from the unpruned model, no longer match. A few batches of calibration data, run in
training mode for the batch norms only (every other module stays in eval mode, no
gradient), give each batch norm the average of its per-batch statistics again.

>>> import torch, depgraph
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).eval()
>>> batches = [torch.randn(8, 3, 4, 4) for _ in range(2)]
>>> fresh = depgraph.recalibrate_batch_norm(net, batches)
>>> fresh[1].num_batches_tracked.item(), net[1].num_batches_tracked.item()
(2, 0)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from passes.errors import InputError

__all__ = ["recalibrate_batch_norm"]


def recalibrate_batch_norm(model: nn.Module, batches: Iterable[Any], *, inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with the running statistics of every batch norm
    that tracks them recomputed from ``batches``: each a tensor (``model(batch)``), a tuple
    (``model(*batch)``) or a dict (``model(**batch)``). Statistics are the average over the
    batches of each batch's mean and unbiased variance (``momentum=None``); every module's
    train/eval mode and every batch norm's momentum are as they were afterwards."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    target = model if inplace else copy.deepcopy(model)
    norms = [m for m in target.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        raise InputError(f"{type(model).__name__} has no batch norm that tracks running statistics: nothing to "
                         "recalibrate")
    modes = {m: m.training for m in target.modules()}
    momenta = {m: m.momentum for m in norms}
    seen = 0
    try:
        target.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for batch in batches:
                _call(target, batch)
                seen += 1
    finally:
        for m, training in modes.items():
            m.training = training
        for m, momentum in momenta.items():
            m.momentum = momentum
    if not seen:
        raise InputError("batches gave no batch: pass an iterable of inputs (tensors, tuples or dicts)")
    return target


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)
