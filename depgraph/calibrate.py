"""Calibration data: batch-norm statistics after pruning (``depgraph.recalibrate_batch_norm``)
and data-driven importance before it (``depgraph.gradient_importance``).

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
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from passes.errors import InputError

from .importance import ElementScores

__all__ = ["recalibrate_batch_norm", "gradient_importance", "KINDS"]

KINDS = ("taylor", "hessian")
"""``taylor``: ``|w · g|`` with ``g`` the gradient summed over the batches (first-order
Taylor, the group Taylor of the DepGraph paper once summed over a unit's entries);
``hessian``: ``w² · Σ g_b² / 2`` over batches ``b`` (the diagonal Fisher as the Hessian of
Optimal Brain Damage)."""


def recalibrate_batch_norm(
    model: nn.Module, batches: Iterable[Any], *, inplace: bool = False, progress: bool | None = None,
    inputs: Callable[[Any], Any] | None = None,
) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with the running statistics of every batch norm
    that tracks them recomputed from ``batches``: each a tensor (``model(batch)``), a tuple
    (``model(*batch)``) or a dict (``model(**batch)``). Statistics are the average over the
    batches of each batch's mean and unbiased variance (``momentum=None``); every module's
    train/eval mode and every batch norm's momentum are as they were afterwards. ``progress``
    shows a progress bar on stderr (default: when stderr is a terminal). ``inputs(batch)``
    picks the model's inputs from a batch that holds more (``lambda b: b[0]`` for ``(images,
    labels)``)."""
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
            for batch in progress_bar(batches, "batch-norm statistics", progress):
                _call(target, batch, inputs)
                seen += 1
    finally:
        for module, training in modes.items():
            module.training = training
        for norm, momentum in momenta.items():
            norm.momentum = momentum
    if not seen:
        raise InputError("batches gave no batch: pass an iterable of inputs (tensors, tuples or dicts)")
    return target


def progress_bar(items: Iterable[Any], what: str, show: bool | None, unit: str = "batch") -> Iterator[Any]:
    """``items`` behind a tqdm progress bar on stderr when ``show`` (None: when stderr is a
    terminal)."""
    if show is None:
        show = sys.stderr.isatty()
    yield from tqdm(items, desc=what, unit=unit, disable=not show, file=sys.stderr, leave=False)


def _call(model: nn.Module, batch: Any, inputs: Callable[[Any], Any] | None = None) -> Any:
    if inputs is not None:
        batch = inputs(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def gradient_importance(
    model: nn.Module, batches: Iterable[Any], *, loss: Callable[[Any, Any], torch.Tensor] | None = None,
    kind: str = "taylor", progress: bool | None = None, inputs: Callable[[Any], Any] | None = None,
) -> ElementScores:
    """Per-entry importance of every parameter that gets a gradient, from ``batches`` (as in
    :func:`recalibrate_batch_norm`), for ``solve(..., importance=scores)``. ``loss(output,
    batch)`` gives the loss of one batch (the mean square of the outputs when None). Runs
    in the model's current mode; gradients come from ``torch.autograd.grad`` (no ``.grad``
    written) and buffers a forward updates are restored: the model is not changed. Only
    running sums are kept (one tensor per parameter), never activations. ``progress`` and
    ``inputs`` as in :func:`recalibrate_batch_norm`: with ``inputs``, ``loss(output, batch)``
    still gets the whole batch, labels included::

        scores = gradient_importance(model, loader, inputs=lambda b: b[0],
                                     loss=lambda out, b: F.cross_entropy(out, b[1]))
    """
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise InputError(f"{type(model).__name__} has no parameter that requires a gradient")
    if any(p.is_meta for _, p in named):
        raise InputError("the model is on the meta device: gradients need real weights")
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    sums = [torch.zeros_like(p, dtype=torch.float32) for _, p in named]
    seen = 0
    try:
        for batch in progress_bar(batches, f"{kind} importance", progress):
            output = _call(model, batch, inputs)
            value = loss(output, batch) if loss is not None else _output_norm(output)
            grads = torch.autograd.grad(value, [p for _, p in named], allow_unused=True)
            for total, g in zip(sums, grads):
                if g is not None:
                    total.add_(g.float() if kind == "taylor" else g.float().square())
            seen += 1
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
    if not seen:
        raise InputError("batches gave no batch: pass an iterable of inputs (tensors, tuples or dicts)")
    scores = ElementScores()
    for (name, p), total in zip(named, sums):
        w = p.detach().float()
        scores[name] = (w * total).abs() if kind == "taylor" else w.square() * total / 2
    return scores


def _output_norm(output: Any) -> torch.Tensor:
    leaves = [t for t in _leaves(output) if t.is_floating_point() and t.requires_grad]
    if not leaves:
        raise InputError("the model's output holds no tensor that depends on its parameters: pass loss=")
    return sum((t.float().square().mean() for t in leaves), torch.zeros(()))


def _leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _leaves(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _leaves(v)]
    return []
