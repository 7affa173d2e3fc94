"""Latency targets: the lookup table, the predictor built on it, the timed correction."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import depgraph
from depgraph.latency import LatencyModel


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 12, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4)).eval()


def _macs_timer(model: nn.Module, args: tuple, kwargs: dict) -> float:
    """A deterministic 'latency': one nanosecond per MAC."""
    return depgraph.cost(depgraph.analyze(model, args[0])).macs * 1e-9


def test_a_latency_of_one_nanosecond_per_mac_predicts_the_macs() -> None:
    model, x = _net(), torch.zeros(1, 3, 8, 8)
    a = depgraph.analyze(model, x)
    table = depgraph.latency_table(a, (0.25, 0.5), timer=_macs_timer)
    assert sorted(table.rows) == [g.index for g in a.groups] and all(len(r) == 2 for r in table.rows.values())
    predictor, costs = LatencyModel(a, table), depgraph.CostModel(a)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        counts = {g.index: int(torch.randint(1, g.size + 1, (1,), generator=generator)) for g in a.groups}
        assert predictor.of(counts).latency == costs.of(counts).macs
    by_latency = depgraph.solve(a, target={"latency": 0.5}, latency_table=table)
    by_macs = depgraph.solve(a, target={"macs": 0.5})
    assert by_latency.keep.keys() == by_macs.keep.keys()
    assert all(torch.equal(by_latency.keep[i], by_macs.keep[i]) for i in by_macs.keep)


def test_a_predictor_that_overestimates_savings_is_corrected_by_timing() -> None:
    """The table claims every cut saves 1.25x what it does; the timed plan misses, the goal
    is lowered by the ratio missed, and the final plan lands within the slack."""
    model, x = _net(), torch.zeros(1, 3, 8, 8)
    a = depgraph.analyze(model, x)
    honest = depgraph.latency_table(a, timer=_macs_timer)
    rows = {g: [(k, honest.baseline - 1.25 * (honest.baseline - s)) for k, s in r] for g, r in honest.rows.items()}
    optimistic = depgraph.LatencyTable(honest.baseline, rows, a.fingerprint, timer=_macs_timer)
    first = depgraph.solve(a, target={"latency": 0.5}, latency_table=optimistic)
    fraction = depgraph.cost(a, first).macs / depgraph.cost(a).macs
    assert fraction <= 0.5 * (1 + depgraph.latency.SLACK)
    uncorrected = LatencyModel(a, optimistic)
    assert uncorrected.of(first).latency < 0.5 * uncorrected.of().latency  # it asked the predictor for less


def test_a_goal_the_timing_cannot_reach_warns_where_it_landed() -> None:
    model, x = _net(), torch.zeros(1, 3, 8, 8)
    a = depgraph.analyze(model, x)
    stubborn = depgraph.latency_table(a, timer=lambda m, args, kw: 1.0 if m is a.model else 0.5)  # every cut halves
    with pytest.warns(UserWarning, match=r"target latency=0.3 landed at 0.500"):
        depgraph.solve(a, target={"latency": 0.3}, latency_table=depgraph.LatencyTable(
            1.0, stubborn.rows, a.fingerprint, timer=lambda m, args, kw: 1.0 if m is a.model else 0.5))


def test_measured_on_the_cpu() -> None:
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 4, 1)).eval()
    x = torch.zeros(1, 3, 32, 32)
    a = depgraph.analyze(model, x)
    table = depgraph.latency_table(a, repeats=2)
    assert table.baseline > 0 and all(s > 0 and 0 < k < a.groups[g].size for g, r in table.rows.items() for k, s in r)
    predictor = LatencyModel(a, table)
    floor = predictor.of({g.index: 1 for g in a.groups}).latency / predictor.of().latency
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timings on a shared machine are noisy
        plan = depgraph.solve(a, target={"latency": (1 + floor) / 2}, latency_table=table)
    assert depgraph.prune(model, plan)(torch.randn(2, 3, 32, 32)).shape == (2, 4, 32, 32)


def test_clear_errors() -> None:
    a = depgraph.analyze(_net(), torch.zeros(1, 3, 8, 8))
    with pytest.raises(depgraph.InputError, match="fractions must lie strictly between 0 and 1"):
        depgraph.latency_table(a, (0.5, 1.0))
    other = depgraph.analyze(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)), torch.zeros(1, 2))
    with pytest.raises(depgraph.InputError, match="measured for another analysis"):
        depgraph.solve(a, target={"latency": 0.5}, latency_table=depgraph.latency_table(other, timer=_macs_timer))
    with pytest.raises(depgraph.InputError, match="latency_table= goes with target"):
        depgraph.solve(a, 0.5, latency_table=depgraph.latency_table(a, timer=_macs_timer))
    with torch.device("meta"):
        on_meta = _net()
    with pytest.raises(depgraph.InputError, match="the model is on the meta device"):
        depgraph.latency_table(depgraph.analyze(on_meta, torch.zeros(1, 3, 8, 8, device="meta")))


def test_uniform_variants_fit_the_scale_and_the_floor() -> None:
    """Variants with every group cut set how far the per-group times extrapolate: with the
    unpruned model they fit ``time = constant + scale · predicted`` exactly (two points)."""
    model, x = _net(), torch.zeros(1, 3, 8, 8)
    a = depgraph.analyze(model, x)
    honest = depgraph.latency_table(a, timer=_macs_timer)
    counts, _ = honest.uniform[0]
    macs_full, macs_cut = depgraph.CostModel(a).of().macs, depgraph.CostModel(a).of(counts).macs
    slower = 1e-9 * (macs_cut + macs_full) / 2  # the cut model runs at half the predicted saving
    table = depgraph.LatencyTable(honest.baseline, honest.rows, a.fingerprint, [(counts, slower)], timer=_macs_timer)
    predictor = LatencyModel(a, table)
    assert abs(predictor.of().latency - macs_full) <= 1 and abs(predictor.of(counts).latency - 1e9 * slower) <= 1
    least = {g.index: 1 for g in a.groups}
    assert abs(predictor.of(least).latency - (depgraph.CostModel(a).of(least).macs + macs_full) / 2) <= 1
