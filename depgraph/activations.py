"""Activation statistics from calibration data, and the importance criteria built on them.

:func:`activation_stats` runs a few batches through the model with a forward pre-hook on
every ``nn.Linear``, ``nn.Conv{1,2,3}d`` and ``nn.ConvTranspose{1,2,3}d`` and keeps, per
input channel of each, the count of positions seen and running sums of the values and of
their squares (float64; never the activations themselves). Hooks sit on the model's own
modules, so the statistics do not depend on the tracer an analysis used (fx, export,
record) and keyword inputs (Hugging Face ``input_ids=``) work as in any forward. A weight
that a forward reads through ``F.linear`` instead of its module gets no statistics.

Criteria (:func:`activation_importance`), per entry ``w`` of a consumer's weight, where
``x`` is the input channel that entry reads:

- ``"activation"`` (Wanda-sp): ``|w| · rms(x)``, the root mean square of the channel over
  every position seen (Wanda's norm, divided by the square root of the count so that
  layers at different resolutions compare);
- ``"fluctuation"`` (FLAP): ``w² · var(x)``, so a unit scores the variance its removal
  adds to each consumer's output; with ``prune(..., compensate=stats)`` the removed
  channels' means are folded into the consumers' biases (FLAP's bias compensation).

A unit's score sums its entries in each *consumer* member (the member whose axis is the
weight's input channels) and averages over the consumers; a group no hooked module reads
is scored over the entries of whichever of its members have scores.

>>> import torch, depgraph
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
>>> stats = depgraph.activation_stats(net, [torch.ones(4, 2)])
>>> stats["2.weight"].count, stats["0.weight"].mean.tolist()  # broadcastable to the (3, 2) weight
(4, [[1.0, 1.0]])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from passes.errors import InputError
from passes.trace import first_names

from .calibrate import _call, progress_bar
from .groups import Group
from .importance import ElementScores

__all__ = ["ChannelStats", "ActivationStats", "activation_stats", "activation_importance", "recording",
           "ACTIVATION_KINDS"]

ACTIVATION_KINDS = ("activation", "fluctuation")
_CONSUMERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class ChannelStats:
    """Statistics of the input channels one weight reads, each broadcastable to the weight:
    entry ``w[i...]`` reads the channel whose values are at the same index (a grouped
    convolution's entries read the channels of their group). ``dim`` is the weight's axis of
    input channels (1, or 0 for a transposed convolution); ``count`` the positions seen."""

    dim: int
    count: int
    mean: torch.Tensor
    var: torch.Tensor
    rms: torch.Tensor


class ActivationStats(dict):  # type: ignore[type-arg]
    """:class:`ChannelStats` by weight name (``"layer1.0.conv1.weight"``)."""

    def criterion(self, score: Callable[[Group, Mapping[str, torch.Tensor], "ActivationStats"], Any]
                  ) -> Callable[[Group, Mapping[str, torch.Tensor]], Any]:
        """An importance callable for ``solve`` that calls ``score(group, tensors, stats)``.

        ``tensors`` holds every member's weight (see :mod:`depgraph.importance`) and
        ``stats`` is this mapping; ``Member.unit_sums`` turns per-entry values into per-unit
        sums. Wanda-sp, as such a callable:

        >>> import torch, depgraph
        >>> def wanda(group, tensors, stats):
        ...     readers = [m for m in group.members if m.name in stats and stats[m.name].dim == m.dim]
        ...     return sum(m.unit_sums(tensors[m.name].abs() * stats[m.name].rms) for m in readers)
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> a = depgraph.analyze(net, torch.zeros(1, 2))
        >>> stats = depgraph.activation_stats(net, [torch.randn(8, 2)])
        >>> depgraph.solve(a, 0.5, importance=stats.criterion(wanda)).keep[0].numel()
        2
        """
        return lambda group, tensors: score(group, tensors, self)


def activation_stats(model: nn.Module, batches: Iterable[Any], *, progress: bool | None = None,
                     inputs: Callable[[Any], Any] | None = None) -> ActivationStats:
    """Per-input-channel statistics of every linear and convolution layer of ``model`` over
    ``batches`` (each a tensor, a tuple of positional inputs or a dict of keyword inputs).

    Runs in the model's current mode under ``torch.no_grad``; buffers a forward updates
    (batch-norm statistics in training mode) are restored and the hooks removed, so the
    model is not changed. ``progress`` shows a progress bar on stderr (default: when stderr is
    a terminal); ``inputs(batch)`` picks the model's inputs from a batch that holds more."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, _CONSUMERS)}
    if not modules:
        raise InputError(f"{type(model).__name__} has no nn.Linear or convolution: no activation statistics to collect")
    sums: dict[str, list[Any]] = {}
    handles = [m.register_forward_pre_hook(_collector(name, m, sums)) for name, m in modules.items()]
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    seen = 0
    try:
        with torch.no_grad():
            for batch in progress_bar(batches, "activation statistics", progress):
                _call(model, batch, inputs)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
    if not seen:
        raise InputError("batches gave no batch: pass an iterable of inputs (tensors, tuples or dicts)")
    return ActivationStats({f"{name}.weight": _stats(modules[name], *totals) for name, totals in sums.items()})


@contextmanager
def recording(module: nn.Module, prefix: str = "") -> Iterator[ActivationStats]:
    """Collect the statistics of :func:`activation_stats` over the forwards run inside the
    ``with`` block, which the caller runs (under ``torch.no_grad``, with any arguments): the
    yielded :class:`ActivationStats` is filled when the block ends, each weight named
    ``prefix.name.weight`` (a model's name for a submodule: ``prefix="model.layers.3"``).
    Buffers are not restored; the hooks are removed.

    >>> import torch
    >>> layer = torch.nn.Sequential(torch.nn.Linear(2, 3))
    >>> with torch.no_grad(), recording(layer, "block") as stats:
    ...     _ = layer(torch.ones(4, 2))
    >>> list(stats), stats["block.0.weight"].count
    (['block.0.weight'], 4)
    """
    modules = {name: m for name, m in module.named_modules() if isinstance(m, _CONSUMERS)}
    sums: dict[str, list[Any]] = {}
    handles = [m.register_forward_pre_hook(_collector(name, m, sums)) for name, m in modules.items()]
    stats = ActivationStats()
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
    for name, totals in sums.items():
        stats[".".join(p for p in (prefix, name, "weight") if p)] = _stats(modules[name], *totals)


def activation_importance(
    model: nn.Module, batches: Iterable[Any] | ActivationStats, *, kind: str = "activation",
    progress: bool | None = None, inputs: Callable[[Any], Any] | None = None,
) -> ElementScores:
    """Per-entry scores of every hooked weight for ``solve(..., importance=scores)``:
    ``kind="activation"`` (Wanda-sp, ``|w| · rms(x)``) or ``"fluctuation"`` (FLAP,
    ``w² · var(x)``), from ``batches`` or from statistics already collected.

    >>> import torch, depgraph
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> scores = depgraph.activation_importance(net, [torch.randn(8, 2)])
    >>> sorted(scores), scores.reads
    (['0.weight', '2.weight'], {'0.weight': 1, '2.weight': 1})
    """
    if kind not in ACTIVATION_KINDS:
        raise InputError(f"kind must be one of {', '.join(ACTIVATION_KINDS)}, got {kind!r}")
    stats = batches if isinstance(batches, ActivationStats) else activation_stats(
        model, batches, progress=progress, inputs=inputs)
    params, first = checked_params(model, stats), first_names(model)
    scores = ElementScores()
    for name, s in stats.items():  # by the weight's first name: a tied lm_head.weight scores the embedding's
        w, key = params[name].detach().float(), first[name]
        score = w.abs() * s.rms if kind == "activation" else w.square() * s.var
        if key in scores and scores.reads[key] != s.dim:
            raise InputError(f"{key} is read along dim {scores.reads[key]} by one module and along dim {s.dim} "
                             f"as {name}: activation scores need one axis of input channels per weight")
        scores[key] = scores[key] + score if key in scores else score  # each module reading it adds its share
        scores.reads[key] = s.dim
    return scores


def checked_params(model: nn.Module, stats: ActivationStats) -> dict[str, torch.Tensor]:
    """``model``'s parameters by every name (tied aliases too), after checking that ``stats``
    describes its weights."""
    params: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    for name, s in stats.items():
        weight = params.get(name)
        if weight is None or torch.broadcast_shapes(s.mean.shape, weight.shape) != weight.shape:
            found = "has no such weight" if weight is None else f"has a weight of shape {tuple(weight.shape)}"
            raise InputError(
                f"the statistics of {name} do not fit this {type(model).__name__}, which {found}: collect them on "
                "this model with depgraph.activation_stats(model, batches)"
            )
    return params


def _collector(name: str, module: nn.Module, sums: dict[str, list[Any]]) -> Callable[..., None]:
    dims = _weight(module).dim()

    def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0].detach()
        if isinstance(module, nn.Linear):
            rows = x.reshape(-1, x.shape[-1])
        else:  # (N, C, *spatial) or unbatched (C, *spatial)
            batched = x.dim() == dims
            rows = x.movedim(1 if batched else 0, -1).reshape(-1, x.shape[1 if batched else 0])
        rows = rows.double()
        totals = sums.setdefault(name, [0, torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device),
                                        torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)])
        totals[0] += rows.shape[0]
        totals[1] += rows.sum(0)
        totals[2] += rows.square().sum(0)

    return hook


def _stats(module: nn.Module, count: int, total: torch.Tensor, squares: torch.Tensor) -> ChannelStats:
    mean = total / count
    var = (squares / count - mean.square()).clamp_min(0) * (count / max(count - 1, 1))
    rms = (squares / count).sqrt()
    channels = _channels(module)
    dim = 0 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 1
    device = _weight(module).device

    def along(values: torch.Tensor) -> torch.Tensor:
        return values.float().to(device)[channels.to(device)]

    return ChannelStats(dim, count, along(mean), along(var), along(rms))


def _channels(module: nn.Module) -> torch.Tensor:
    """The input channel each entry of ``module.weight`` reads, broadcastable to the weight."""
    shape = _weight(module).shape
    ones = (1,) * (len(shape) - 2)
    if isinstance(module, nn.Linear):
        return torch.arange(shape[1]).reshape(1, shape[1])
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # (in, out / groups, *kernel)
        return torch.arange(shape[0]).reshape(shape[0], 1, *ones)
    per_group_out, per_group_in = shape[0] // int(cast(int, module.groups)), shape[1]  # (out, in / groups, *kernel)
    group = torch.arange(shape[0]) // per_group_out
    return (group[:, None] * per_group_in + torch.arange(per_group_in)[None, :]).reshape(shape[0], shape[1], *ones)



def compensated_biases(model: nn.Module, plan: Any, analysis: Any, stats: ActivationStats) -> dict[str, torch.Tensor]:
    """FLAP's bias compensation: for every linear layer and convolution of ``model`` that
    ``plan`` removes input channels from, its pruned bias plus ``Σ w[:, removed] · mean(x_removed)``
    (the removed channels' mean contribution), by layer name; read before pruning. Exact in
    expectation for linear layers; a padded convolution's border positions see fewer terms.
    Transposed convolutions are left out."""
    params, first = checked_params(model, stats), first_names(model)
    entries = plan.removed_entries(analysis)
    biases = {}
    for name, s in stats.items():
        layer = name.rpartition(".")[0]
        module = _submodule(model, layer)
        if module is None or isinstance(module, nn.modules.conv._ConvTransposeNd):
            continue
        w = params[name].detach()
        removed_in = entries.get((first[name], 1), torch.zeros(w.shape[1], dtype=torch.bool))
        removed_out = entries.get((first[name], 0), torch.zeros(w.shape[0], dtype=torch.bool))
        if not removed_in.any():
            continue
        taken = removed_in.nonzero().flatten().to(w.device)
        delta = (w.float().index_select(1, taken) * s.mean.expand(w.shape).index_select(1, taken)).flatten(1).sum(1)
        old = getattr(module, "bias", None)
        total = delta if not isinstance(old, torch.Tensor) else old.detach().float() + delta
        biases[layer] = total[~removed_out.to(w.device)].to(w.dtype)
    return biases


def set_biases(result: nn.Module, biases: Mapping[str, torch.Tensor], tracer: str) -> list[str]:
    """Give each layer of ``result`` its bias from ``biases`` (creating the parameter where a
    module called as such has none); returns the layers it could not change (the rewritten
    graph of an ``export``/``record`` analysis reads no bias where the layer had none)."""
    skipped = []
    for layer, bias in biases.items():
        module = _submodule(result, layer)
        old = getattr(module, "bias", None)
        if isinstance(old, torch.Tensor):
            with torch.no_grad():
                old.copy_(bias)
        elif module is None or (tracer != "fx" and isinstance(result, torch.fx.GraphModule)):
            skipped.append(layer)
        else:
            module.bias = nn.Parameter(bias)
    return skipped


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _weight(module: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)
