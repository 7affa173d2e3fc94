"""Calibration over several processes: two gloo ranks, each with half the batches, reduce their
activation statistics to those of one process that saw every batch, and solve the same plan."""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import depgraph
from depgraph.distributed import reduce_stats

WORLD = 2
RTOL = {"mean": 3e-7, "rms": 3e-7, "var": 1e-4}
"""Mean and rms to float32 rounding; var to ~1e-7 · |mean| / std relative (the rounding of each
rank's float32 mean; seen here: 1.5e-5)."""


def _model() -> nn.Module:
    """Convolutions (one grouped), a linear head: statistics broadcast to 4-d and 2-d weights."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4),
    ).eval()


def _batches() -> list[torch.Tensor]:
    """Six batches of unequal sizes, each with its own channel means (so that each half of them
    gives other statistics than the whole) and a spread of 0.01 around them: variances far below
    the squared means, where one recovered as E[x²] - mean² from float32 values would be lost."""
    g = torch.Generator().manual_seed(1)
    return [6 * torch.rand(1, 3, 1, 1, generator=g) - 3 + 0.01 * torch.randn(n, 3, 6, 6, generator=g)
            for n in (2, 3, 1, 4, 2, 5)]


def _plan(model: nn.Module, stats: depgraph.ActivationStats, kind: str) -> dict[int, list[int]]:
    a = depgraph.analyze(model, torch.zeros(1, 3, 6, 6))
    plan = depgraph.solve(a, 0.5, importance=depgraph.activation_importance(model, stats, kind=kind))
    return {i: units.tolist() for i, units in sorted(plan.keep.items())}


def _worker(rank: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = _model()
        local = depgraph.activation_stats(model, _batches()[rank::WORLD])
        reduced = reduce_stats(local)
        plans = {kind: _plan(model, reduced, kind) for kind in depgraph.activations.ACTIVATION_KINDS}
        partial = depgraph.ActivationStats({k: v for k, v in local.items() if k != "6.weight" or rank == 0})
        try:
            reduce_stats(partial)
            refused = ""
        except depgraph.InputError as exc:
            refused = str(exc)
        torch.save({"local": dict(local), "reduced": dict(reduced), "plans": plans, "refused": refused},
                   Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(_free_port(), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_reduced_statistics_equal_those_of_one_process_over_every_batch(ranks: list[dict]) -> None:
    whole = depgraph.activation_stats(_model(), _batches())
    for rank in ranks:
        assert sorted(rank["reduced"]) == sorted(whole) == ["0.weight", "2.weight", "6.weight", "8.weight"]
        for name, expected in whole.items():
            found = rank["reduced"][name]
            assert (found.dim, found.count) == (expected.dim, expected.count)
            for field in ("mean", "var", "rms"):
                torch.testing.assert_close(getattr(found, field), getattr(expected, field), atol=0, rtol=RTOL[field])
    assert ranks[0]["local"]["0.weight"].count + ranks[1]["local"]["0.weight"].count == whole["0.weight"].count
    assert ranks[0]["local"]["0.weight"].count != whole["0.weight"].count  # each rank saw only its half
    local_var = ranks[0]["local"]["0.weight"].var
    assert not torch.allclose(local_var, whole["0.weight"].var, rtol=1e-3)  # a half is not the whole


@pytest.mark.parametrize("kind", depgraph.activations.ACTIVATION_KINDS)
def test_every_rank_solves_the_plan_of_one_process(ranks: list[dict], kind: str) -> None:
    model = _model()
    expected = _plan(model, depgraph.activation_stats(model, _batches()), kind)
    assert [rank["plans"][kind] for rank in ranks] == [expected] * WORLD
    halves = [_plan(model, depgraph.ActivationStats(rank["local"]), kind) for rank in ranks]
    assert halves != [expected] * WORLD  # the reduction matters: a half alone chooses another plan


def test_ranks_with_statistics_of_different_weights_are_refused(ranks: list[dict]) -> None:
    for rank, found in enumerate(ranks):
        assert f"the statistics of rank {1 - rank} and rank {rank} describe different weights" in found["refused"]
        assert "6.weight" in found["refused"] and "collect them on the same model on every rank" in found["refused"]


def test_without_a_process_group_it_says_what_to_call() -> None:
    stats = depgraph.activation_stats(_model(), _batches()[:1])
    with pytest.raises(depgraph.InputError, match="torch.distributed.init_process_group first"):
        reduce_stats(stats)
