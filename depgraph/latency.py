"""Latency targets: ``depgraph.solve(a, target={"latency": 0.5})``.

Latency is measured, not derived, on the model's current device at the analysis' example
inputs (zeros of their shapes; ``torch.no_grad``; the median of ``repeats`` runs after two
warm-up runs; CUDA is synchronized). :func:`latency_table` builds the lookup table: the
model once, then for every group of two or more units a variant with only that group cut
to each of ``fractions`` of its units (``prune(..., check=False)``), and per fraction a
variant with every group cut to it, timed the same way. Its cost is one ``prune`` and
``repeats + 2`` forward passes per group and fraction.

:class:`LatencyModel` turns the table into a predictor: each group's measured saving
divided by the MACs that cutting it saves (:class:`~depgraph.costs.CostModel`) is that
group's time per MAC (at least a tenth of the median, as single-group timings are noisy);
every multiplying op then costs its MACs at the mean time per MAC of the groups its axes
carry. A scale and a constant, fitted by least squares to the unpruned model and the
variants with every group cut, say how that extrapolates (small channel counts run slower
per MAC). Savings of two adjacent groups therefore compound through their ops' products as
MACs do, while a group whose ops run slowly per MAC (a depthwise convolution, an op bound
by memory) is priced by what it measured. The solver (:mod:`depgraph.targets`) removes units
against this predictor, then the pruned model is timed; while it lands more than
:data:`SLACK` away from the target, the predictor's goal is corrected (by the ratio missed,
then along the line through the last two tries; three times at most), the plan measured
closest to the target without passing it by more than the slack is returned, and a warning
says where it landed when none is within.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from passes.dims import atoms_of
from passes.errors import InputError

from .apply import example_inputs as recorded_inputs
from .apply import prune
from .calibrate import progress_bar
from .costs import CostModel, term_value
from .groups import Analysis
from .plan import Plan

__all__ = ["LatencyTable", "LatencyModel", "latency_table", "measure_latency", "SLACK"]

SLACK = 0.05
"""How far above a latency target a measured plan may land before the goal is lowered (timings are noisy)."""

Timer = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], float]


class Estimate(NamedTuple):
    """A predicted latency in nanoseconds (an integer, as the solver's costs are)."""

    latency: int


@dataclass
class LatencyTable:
    """Measured seconds: ``baseline`` for the model, ``rows[g]`` a list of ``(kept units,
    seconds)`` for variants with only group ``g`` cut, ``uniform`` a list of ``(kept counts
    per group, seconds)`` for variants with every group cut to one fraction."""

    baseline: float
    rows: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    fingerprint: str = ""
    uniform: list[tuple[dict[int, int], float]] = field(default_factory=list)
    timer: Timer | None = field(default=None, repr=False, compare=False)
    repeats: int = 7

    def clock(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        """Seconds of one forward, measured as the table was (its timer, or :func:`measure_latency`)."""
        return self.timer(model, args, kwargs) if self.timer else measure_latency(model, args, kwargs, self.repeats)


def measure_latency(model: nn.Module, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
                    repeats: int = 7) -> float:
    """Median seconds of ``model(*args, **kwargs)`` over ``repeats`` runs after two warm-up
    runs, under ``torch.no_grad`` (CUDA synchronized around each run)."""
    kwargs = kwargs or {}
    cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in (*args, *kwargs.values()))
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def latency_table(analysis: Analysis, fractions: Sequence[float] = (0.5,), *, repeats: int = 7,
                  timer: Timer | None = None, progress: bool | None = None) -> LatencyTable:
    """Time ``analysis.model`` and, for every group of two or more units, variants with only
    that group cut to each fraction of its units (module doc). ``timer(model, args, kwargs)``
    replaces the measurement (seconds; for tests and for custom benchmarks).

    >>> import torch, depgraph
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> a = depgraph.analyze(net, torch.zeros(1, 4))
    >>> table = depgraph.latency_table(a, timer=lambda m, args, kw: float(m[0].out_features))
    >>> table.baseline, table.rows, table.uniform
    (8.0, {0: [(4, 4.0)]}, [({0: 4}, 4.0)])
    """
    if any(not 0 < f < 1 for f in fractions) or not fractions:
        raise InputError(f"fractions must lie strictly between 0 and 1, got {list(fractions)}")
    model = analysis.model
    args, kwargs = example_inputs(analysis, model)
    table = LatencyTable(0.0, fingerprint=analysis.fingerprint, timer=timer, repeats=repeats)
    table.baseline = table.clock(model, args, kwargs)
    groups = [g for g in analysis.groups if g.size > max(1, g.min_keep)]
    for group in progress_bar(groups, "latency table", progress, unit="group"):
        kept = sorted({_kept(group, f) for f in fractions})
        for k in kept:
            variant = prune(model, Plan.from_keep(analysis, {group.index: range(k)}), check=False)
            table.rows.setdefault(group.index, []).append((k, table.clock(variant, args, kwargs)))
    for f in fractions:
        counts = {g.index: _kept(g, f) for g in groups}
        variant = prune(model, Plan.from_keep(analysis, {i: range(k) for i, k in counts.items()}), check=False)
        table.uniform.append((counts, table.clock(variant, args, kwargs)))
    return table


def _kept(group: Any, fraction: float) -> int:
    return min(group.size - 1, max(group.min_keep, 1, round(fraction * group.size)))


def example_inputs(analysis: Analysis, model: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The analysis' example inputs rebuilt for ``model`` (zeros of their shapes on its device)."""
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise InputError("the model is on the meta device: a latency target needs a model that runs")
    return recorded_inputs(model, analysis.inputs, analysis.keywords if analysis.tracer == "export" else {})


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """``(scale, constant)`` with ``time ≈ constant + scale · predicted`` by least squares over
    ``points`` (the first is the unpruned model, which one point alone fits with scale 1);
    the scale is always positive, and the constant too where more than one point fits it."""
    (x0, y0), n = points[0], len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    scale = sum((x - mx) * (y - my) for x, y in points) / var if n > 1 and var > 0 else 0.0
    if scale <= 0:
        return 1.0, y0 - x0
    if my - scale * mx < 0:  # through the origin
        return sum(x * y for x, y in points) / sum(x * x for x, _ in points), 0.0
    return scale, my - scale * mx


class LatencyModel:
    """Predicted latency as a function of the kept count per group (module doc), with the
    interface of :class:`~depgraph.costs.CostModel` the target solver uses (metric ``"latency"``)."""

    def __init__(self, analysis: Analysis, table: LatencyTable) -> None:
        if table.fingerprint and table.fingerprint != analysis.fingerprint:
            raise InputError("the latency table was measured for another analysis: build it with "
                             "depgraph.latency_table(a) of this one")
        self.costs = CostModel(analysis)
        full = self.costs.counts()
        per_mac = {}
        for index, rows in table.rows.items():
            rates = [max(0.0, table.baseline - seconds) / max(1, self.costs.saving(full, {index: full[index] - k},
                                                                                     "macs")) for k, seconds in rows]
            per_mac[self.costs.atoms[index]] = sum(rates) / len(rates)
        positive = sorted(r for r in per_mac.values() if r > 0)
        least = positive[len(positive) // 2] / 10 if positive else 0.0  # single-group timings are noisy
        self.weights = []
        for term in self.costs.mac_terms:
            rates = [max(per_mac[a], least) for a in {a for f in term.factors for a in atoms_of(f)} if a in per_mac]
            self.weights.append(1e9 * sum(rates) / len(rates) if rates else 0.0)
        points = [(self._weighted(full), 1e9 * table.baseline)]
        points += [(self._weighted(c), 1e9 * t) for c, t in table.uniform]
        scale, self.constant = _fit(points)
        self.weights = [scale * w for w in self.weights]

    def of(self, counts: Plan | dict[int, int] | None = None) -> Estimate:
        """The predicted latency (ns) of ``prune(model, plan)``."""
        return Estimate(round(self.constant + self._weighted(counts)))

    def saving(self, counts: dict[int, int], fewer: dict[int, int], metric: str = "latency") -> int:
        """Predicted nanoseconds saved by keeping ``fewer[g]`` fewer units of each group ``g``."""
        after = dict(counts)
        for index, k in fewer.items():
            after[index] = counts[index] - k
        return self.of(counts).latency - self.of(after).latency

    def _weighted(self, counts: Plan | dict[int, int] | None) -> float:
        """Σ weight · MACs over the multiplying ops at ``counts`` (kept units per group)."""
        kept = self.costs._kept(self.costs.counts(counts))
        memo: dict[Any, int] = {}
        return sum(w * term_value(t, kept, memo) for w, t in zip(self.weights, self.costs.mac_terms) if w)


def _next_goal(goals: list[float], measured: list[float], fraction: float) -> float:
    """The predictor's next goal: by the ratio missed after one try, then along the line
    through the last two (goal, measured) points, kept within (0, 1]."""
    if len(goals) > 1 and measured[-1] != measured[-2]:
        slope = (goals[-1] - goals[-2]) / (measured[-1] - measured[-2])
        goal = goals[-1] + slope * (fraction - measured[-1])
    else:
        goal = goals[-1] * fraction / measured[-1]
    return min(1.0, max(goal, 1e-3))


def within_latency(analysis: Analysis, fraction: float, table: LatencyTable | None,
                   solve_at: Callable[[tuple[str, float], Any], Plan]) -> Plan:
    """The plan for ``{"latency": fraction}``: solved against a :class:`LatencyModel`, timed
    (with the table's timer), and solved again for a corrected goal (three times at most)
    while it lands more than :data:`SLACK` away, either side; the plan returned is the one
    measured closest to the target without passing it by more than the slack."""
    table = table if table is not None else latency_table(analysis)
    model = LatencyModel(analysis, table)
    args, kwargs = example_inputs(analysis, analysis.model)

    def solved(goal: float) -> Plan:
        with warnings.catch_warnings():  # the predictor's landing is not the point: the timing below is
            warnings.filterwarnings("ignore", message="target latency=")
            return solve_at(("latency", goal), model)

    def landed(plan: Plan) -> float:  # the baseline is timed again: machines drift
        pruned = prune(analysis.model, plan, check=False)
        return table.clock(pruned, args, kwargs) / table.clock(analysis.model, args, kwargs)

    tries = [(fraction, solved(fraction))]
    measured = [landed(tries[0][1])]
    for _ in range(3):
        if abs(measured[-1] - fraction) <= SLACK * fraction:
            break
        goal = _next_goal([g for g, _ in tries], measured, fraction)
        try:
            tries.append((goal, solved(goal)))
        except InputError:  # the bounds allow no lower goal: keep what was found
            break
        measured.append(landed(tries[-1][1]))
    within = [i for i, m in enumerate(measured) if m <= fraction * (1 + SLACK)]
    best = max(within, key=lambda i: measured[i]) if within else min(range(len(measured)), key=measured.__getitem__)
    plan = tries[best][1]
    if measured[best] > fraction * (1 + SLACK):
        warnings.warn(f"target latency={fraction} landed at {measured[best]:.3f} of the model's measured latency on "
                      "this device: the predicted per-group times did not carry over (noisy timings, or ops whose "
                      "time does not follow their MACs)", stacklevel=3)
    return plan
