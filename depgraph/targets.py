"""Solving for a cost target: ``depgraph.solve(a, target={"macs": 0.5})``.

Every group's units are ranked by importance (normalized by the group's mean score, as
in a global ranking); a unit's price is its normalized score (divided by what removing it
saves with ``strategy="cost"``). What a unit saves comes from
:class:`~depgraph.costs.CostModel`, exact at the current counts: savings compound through
products, so they are recomputed as groups shrink. Rounds remove the cheapest
units until the model's cost is at most the target: each round takes, in order of price,
units that each save no more than what is left to save, until their predicted saving
covers half of it (one unit at least); when every unit left would pass the target, the
one that passes it by least goes. Units are then given back while the cost stays within
the target. The result lands within the cost of the smallest unit of the target.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from passes.errors import InputError

from .config import Block
from .costs import CostModel
from .groups import Analysis

__all__ = ["METRICS", "check_target", "target_counts"]

METRICS = ("macs", "params", "latency")
"""What a target may bound: a fraction of the model's MACs, of its parameters or of its
measured latency (:mod:`depgraph.latency`)."""

STRATEGIES = ("cost", "importance", "uniform")
"""How a target spreads over the groups: ``importance`` (the default) ranks units by normalized
importance alone (the target only sets how many go); ``uniform`` removes the same fraction of
every group (the least fraction that reaches the target, within the bounds), each group's
least important units first; ``cost`` ranks by normalized importance per cost saved (cheap,
unimportant units of expensive groups first), which tends to empty the groups whose units
save the most (a stem keeping 1 of 64 channels): after fine-tuning it lost to both others in
``benchmarks/quality.py``."""

TOLERANCE = 0.01
"""How far below the target a result may land (relative) before :func:`target_counts` warns."""


def check_target(target: Any) -> tuple[str, float]:
    """``(metric, fraction)`` of a target such as ``{"macs": 0.5}``, or a clear error."""
    if not isinstance(target, Mapping) or len(target) != 1:
        raise InputError(f"target must be one of {{'macs': f}}, {{'params': f}} or {{'latency': f}} with f in (0, 1], "
                         f"got {target!r}")
    ((metric, fraction),) = target.items()
    if metric not in METRICS:
        raise InputError(f"target {metric!r} is not one of {', '.join(METRICS)}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise InputError(f"target[{metric!r}] must be the fraction of the model's {metric} to keep, in (0, 1], "
                         f"got {fraction!r}")
    return metric, float(fraction)


@dataclass
class _Block:
    """A block's ranked scores and how many of its units go (``chunk`` at a time)."""

    block: Block
    order: torch.Tensor
    normalized: torch.Tensor
    removed: int
    limit: int
    chunk: int
    least: int = 0
    """The fewest units the block may lose (where ``removed`` starts)."""

    def next_chunk(self) -> int:
        """Units the next step removes (the first step of a rounded block reaches a multiple)."""
        left = self.block.size - self.removed
        step = left % self.chunk or self.chunk
        return step if self.removed + step <= self.limit else 0

    def chunks(self, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sizes and mean normalized scores of the chunks that may still go, in order: the
        next ``first`` units, then ``chunk`` at a time up to the limit."""
        if not first:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0)
        values = self.normalized[self.order[self.removed:self.limit]]
        n = (len(values) - first) // self.chunk
        rest = values[first:first + n * self.chunk].reshape(n, self.chunk).mean(1)
        sizes = torch.tensor([first] + [self.chunk] * n)
        return sizes, torch.cat([values[:first].mean().reshape(1), rest])


def target_counts(analysis: Analysis, blocks: list[Block], scores: list[torch.Tensor], bounds: list[tuple[int, int]],
                  target: tuple[str, float], round_to: int, model: Any = None,
                  start: dict[int, int] | None = None, strategy: str = "importance") -> list[int]:
    """Units each block loses for the model's cost to reach ``target`` (module doc);
    ``model`` predicts the cost (a :class:`CostModel` of the analysis by default; a
    :class:`~depgraph.latency.LatencyModel` for latency); ``start`` gives the kept units of
    the groups no block holds (every unit by default); ``strategy`` is one of
    :data:`STRATEGIES`."""
    metric, fraction = target
    model = model if model is not None else CostModel(analysis)
    original = getattr(getattr(model, "full", None) or model.of(), metric)  # a view without blocks keeps the whole
    goal = math.floor(fraction * original)
    states = []
    for block, s, (lo, hi) in zip(blocks, scores, bounds):
        scale = s.abs().mean()
        normalized = s / scale if scale > 0 else torch.zeros_like(s)
        states.append(_Block(block, torch.sort(normalized, stable=True).indices, normalized, lo, hi, round_to, lo))
    counts = _counts(analysis, states, start)
    floor = _cost(model, analysis, [_Block(b.block, b.order, b.normalized, b.limit, b.limit, 1) for b in states],
                  metric, start)
    if floor > goal:
        raise InputError(
            f"the {metric} cannot go below {floor:,} ({floor / original:.3f} of {original:,}{_unit(metric)}) with "
            "these bounds: "
            f"pinned axes, max_sparse_ratio and the units every group keeps cost that much; ask for at least "
            f"{math.ceil(1000 * floor / original) / 1000:.3f}"
        )
    if strategy == "uniform":
        _uniform(model, analysis, states, metric, goal, start)
        counts = _counts(analysis, states, start)
    current = getattr(model.of(counts), metric)
    while current > goal:
        prices, owners, savings, units = [], [], [], []
        for i, state in enumerate(states):
            k = state.next_chunk()
            saved = _saving(model, analysis, counts, state.block, k, metric) if k else 0
            if saved <= 0:
                continue
            sizes, scores_ = state.chunks(k)
            per_unit = saved / k
            prices.append(scores_ / (per_unit / original) if strategy == "cost" else scores_)
            owners.append(torch.full((len(sizes),), i))
            savings.append(sizes * per_unit)
            units.append(sizes)
        if not prices:
            break
        saving, gap = torch.cat(savings), current - goal
        order = torch.sort(torch.cat(prices), stable=True).indices
        fits = order[saving[order] <= gap]  # chunks that do not pass the target
        if len(fits):
            predicted = torch.cumsum(saving[fits], 0)
            chosen = fits[:max(1, int((predicted <= gap / 2).sum()))]
        else:  # the last step: the chunk that passes the target by least
            chosen = torch.argmin(saving).reshape(1)
        taken = torch.bincount(torch.cat(owners)[chosen], torch.cat(units)[chosen], minlength=len(states))
        for i, k in ((i, int(k)) for i, k in enumerate(taken.tolist()) if k):  # a prefix of each block's order
            states[i].removed += k
            for g in states[i].block.groups:
                counts[g] -= k
        current = getattr(model.of(counts), metric)
    if current > goal:
        raise InputError(f"could not bring the {metric} from {original:,} to {goal:,}: no unit left saves any")
    current = _refill(model, analysis, states, counts, metric, goal, current)
    if (goal - current) > TOLERANCE * goal:
        warnings.warn(f"target {metric}={fraction} landed at {current / original:.4f} of the original: the "
                      "groups' granularity (their sizes, round_to) left no closer plan the solver could find",
                      stacklevel=4)
    return [s.removed for s in states]


def _uniform(model: Any, analysis: Analysis, states: list[_Block], metric: str, goal: int,
             start: dict[int, int] | None) -> None:
    """Set every block to the least common fraction of removed units (bisection over 40
    steps) whose cost is within ``goal``; bounds and rounding hold per block."""

    def place(r: float) -> int:
        for state in states:
            size = state.block.size
            kept = min(size, -(-(size - math.floor(r * size + 1e-9)) // state.chunk) * state.chunk)
            state.removed = min(state.limit, max(state.least, size - kept))
        return _cost(model, analysis, states, metric, start)

    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (low, middle) if place(middle) <= goal else (middle, high)
    place(high)


def _refill(model: Any, analysis: Analysis, states: list[_Block], counts: dict[int, int], metric: str,
            goal: int, current: int) -> int:
    """Give units back while the cost stays within the target (the last chunk removed may
    overshoot it): each time the last-removed chunk that fills most of the room left."""
    while True:
        best = None
        for i, state in enumerate(states):
            k = state.removed % state.chunk or state.chunk
            if state.removed - k < state.least:
                continue
            added = -_saving(model, analysis, counts, state.block, -k, metric)
            if added <= goal - current and (best is None or added > best[0]):
                best = (added, i, k)
        if best is None or best[0] <= 0:
            return current
        added, i, k = best
        states[i].removed -= k
        for g in states[i].block.groups:
            counts[g] += k
        current += added


def _counts(analysis: Analysis, states: list[_Block], start: dict[int, int] | None = None) -> dict[int, int]:
    counts = dict(start) if start is not None else {g.index: g.size for g in analysis.groups}
    for state in states:
        for g in state.block.groups:
            counts[g] = state.block.size - state.removed
    return counts


def _cost(model: Any, analysis: Analysis, states: list[_Block], metric: str,
          start: dict[int, int] | None = None) -> int:
    return int(getattr(model.of(_counts(analysis, states, start)), metric))


def _saving(model: Any, analysis: Analysis, counts: dict[int, int], block: Block, k: int, metric: str) -> int:
    """What removing ``k`` more units of every group of ``block`` saves at ``counts``."""
    return int(model.saving(counts, {g: k for g in block.groups}, metric))


def _unit(metric: str) -> str:
    return " ns, as the latency table predicts" if metric == "latency" else ""
