"""Calibration statistics gathered by several processes: :func:`reduce_stats`.

Each process (rank) of a ``torch.distributed`` job runs :func:`depgraph.activation_stats` on
its own batches; :func:`reduce_stats` combines the statistics of every rank with
``torch.distributed.all_reduce``, so that every rank holds the statistics of all the batches,
as one process that saw them all computes them, up to the float32 in which
:class:`ChannelStats` keeps its fields: the mean and the root mean square to float32 rounding,
the variance (through the rounding of each rank's mean) to a relative error of about
``1e-7 · |mean| / std``. Exact float64 sums would need ``ChannelStats`` to keep them.

A channel's statistics over ``n`` positions are ``mean = Σx / n``, ``rms = sqrt(Σx² / n)`` and
the unbiased ``var = M2 / (n - 1)`` with ``M2 = Σ(x - mean)²``. Summed over the ranks ``r``:
``n``, ``n·mean`` and ``n·rms²`` give the mean and the root mean square, and
``M2 = Σ_r M2_r + n_r (mean_r - mean)²`` (the pairwise update of Chan, Golub and LeVeque) the
variance, which stays accurate where the variance is far below the squared mean (subtracting
``n·mean²`` from ``n·rms²`` would not, from float32 values). Two ``all_reduce`` calls in all,
each over one float64 buffer that holds every weight's statistics.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from passes.errors import InputError

from .activations import ActivationStats, ChannelStats

__all__ = ["reduce_stats"]


def reduce_stats(stats: ActivationStats, group: Any = None) -> ActivationStats:
    """The statistics of every rank's batches, from each rank's :func:`~depgraph.activation_stats`.

    A collective: every rank of ``group`` (default: the default process group) calls it with the
    statistics of the same model, collected on its own batches (at least one per rank), and every
    rank gets the same result. The buffers travel on the CPU, or on the current CUDA device
    under the ``nccl`` backend; each result is on the device of the rank's own statistics.

    Parameters
    ----------
    stats
        This rank's :func:`~depgraph.activation_stats`.
    group
        A ``torch.distributed`` process group; ``None`` for the default one.

    Returns
    -------
    ActivationStats
        The same weights' :class:`~depgraph.ChannelStats`, over the positions of every rank.

    Raises
    ------
    InputError
        When no process group is initialized, or the ranks' statistics describe different
        weights (names, input-channel axes or shapes), before anything is reduced.

    Examples
    --------
    One process is a group of one (start one process per rank with ``torchrun`` or
    ``torch.multiprocessing.spawn`` to reduce over several):

    >>> import torch, torch.distributed as dist, depgraph
    >>> from depgraph.distributed import reduce_stats
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> local = depgraph.activation_stats(net, [torch.ones(4, 2)])
    >>> reduced = reduce_stats(local)
    >>> reduced["0.weight"].count, reduced["0.weight"].mean.tolist()
    (4, [[1.0, 1.0]])
    >>> dist.destroy_process_group()
    """
    names = _checked_names(stats, group)
    device = _buffer_device(group)
    counts = torch.tensor([float(stats[n].count) for n in names], dtype=torch.float64, device=device)
    sizes = [stats[n].mean.numel() for n in names]
    each = counts.repeat_interleave(torch.tensor(sizes, device=device))  # a rank's count, per entry
    mean, var, rms = (_flat(stats, names, field, device) for field in ("mean", "var", "rms"))
    totals = torch.cat([counts, each * mean, each * rms.square()])
    dist.all_reduce(totals, group=group)
    total_counts, sums, squares = totals.split([len(names), mean.numel(), mean.numel()])
    total_each = total_counts.repeat_interleave(torch.tensor(sizes, device=device))
    total_mean = sums / total_each
    m2 = var * (each - 1).clamp_min(1) + each * (mean - total_mean).square()
    dist.all_reduce(m2, group=group)
    fields = {"mean": total_mean, "var": m2 / (total_each - 1).clamp_min(1), "rms": (squares / total_each).sqrt()}
    pieces = {field: values.split(sizes) for field, values in fields.items()}
    return ActivationStats({
        name: _rebuilt(stats[name], int(total_counts[i].item()), *(pieces[f][i] for f in ("mean", "var", "rms")))
        for i, name in enumerate(names)
    })


def _checked_names(stats: ActivationStats, group: Any) -> list[str]:
    """The weight names in a fixed order, after checking that every rank describes the same
    weights (an all-gather of names, axes and shapes: a mismatch would otherwise hang or mix)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise InputError("reduce_stats needs a torch.distributed process group: call "
                         "torch.distributed.init_process_group first (one per process)")
    names = sorted(stats)
    layout = [(n, stats[n].dim, tuple(stats[n].mean.shape)) for n in names]
    layouts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(layouts, layout, group=group)
    for rank, other in enumerate(layouts):
        if other != layout:
            differ = sorted(set(map(str, other)) ^ set(map(str, layout)))
            raise InputError(f"the statistics of rank {rank} and rank {dist.get_rank(group)} describe different "
                             f"weights ({'; '.join(differ[:3])}): collect them on the same model on every rank")
    return names


def _buffer_device(group: Any) -> torch.device:
    """Where the reduced buffers live: the current CUDA device under nccl, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _flat(stats: ActivationStats, names: list[str], field: str, device: torch.device) -> torch.Tensor:
    """One field of every weight's statistics, flattened into one float64 vector."""
    return torch.cat([getattr(stats[n], field).detach().to(device, torch.float64).flatten() for n in names])


def _rebuilt(local: ChannelStats, count: int, mean: torch.Tensor, var: torch.Tensor, rms: torch.Tensor
             ) -> ChannelStats:
    """``local``'s axis, shape and device with the reduced values."""
    def like(values: torch.Tensor) -> torch.Tensor:
        return values.reshape(local.mean.shape).to(local.mean.device, torch.float32)

    return ChannelStats(local.dim, count, like(mean), like(var), like(rms))
