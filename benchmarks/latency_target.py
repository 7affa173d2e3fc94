"""Latency targets on the CPU: what the lookup table costs and where the pruned models land.

Run::

    python benchmarks/latency_target.py                       # writes results/latency_target.md
    python benchmarks/latency_target.py --models resnet18 --targets 0.5 --repeats 5   # a subset, printed only

For each model (torchvision, ``weights=None``, ``torch.manual_seed(0)``, eval mode, one
``(1, 3, 224, 224)`` image, ``torch.set_num_threads(1)``) and each target fraction ``f``:

- the lookup table, ``depgraph.latency_table(a, repeats=R, timer=cpu)``, built once per model
  (its wall time is reported: that is what a latency target costs before solving);
- ``latency``: ``depgraph.solve(a, target={"latency": f}, latency_table=table)``, importance l2;
- ``macs``: ``depgraph.solve(a, target={"macs": f})``, the same importance, for comparison.

Both pruned models and the original are then timed again, interleaved, ``--rounds`` times
(each a median of ``--repeats`` forwards under ``no_grad``); the table reports the median
ratio to the original and the MACs kept. ``cpu`` is this process's CPU time with one thread
(other jobs on a shared machine disturb it far less than wall time); the library's own
default timer (``depgraph.measure_latency``) uses wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision
from _util import RESULTS, environment, markdown_table, median_time, write
from torch import nn

import depgraph

MODELS = ("resnet18", "mobilenet_v2", "resnet50")
TARGETS = (0.5, 0.7)


def cpu_timer(repeats: int) -> Any:
    def timer(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        with torch.no_grad():
            return median_time(lambda: model(*args, **kwargs), repeats, warmup=1, clock=time.process_time)

    return timer


def run(name: str, targets: list[float], repeats: int, rounds: int) -> list[list[str]]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    a = depgraph.analyze(model, x)
    timer = cpu_timer(repeats)
    start = time.perf_counter()
    table = depgraph.latency_table(a, repeats=repeats, timer=timer)
    built = time.perf_counter() - start
    rows = []
    whole = depgraph.cost(a).macs
    for f in targets:
        plans = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plans["latency"] = depgraph.solve(a, target={"latency": f}, latency_table=table)
        notes = "; ".join(str(w.message)[:80] for w in caught if "latency" in str(w.message))
        plans["macs"] = depgraph.solve(a, target={"macs": f})
        pruned = {k: depgraph.prune(model, p) for k, p in plans.items()}
        ratios: dict[str, list[float]] = {k: [] for k in pruned}
        for _ in range(rounds):
            base = timer(model, (x,), {})
            for k, m in pruned.items():
                ratios[k].append(timer(m, (x,), {}) / base)
        for k in ("latency", "macs"):
            macs = depgraph.cost(a, plans[k]).macs / whole
            rows.append([name, f"{f}", k, f"{statistics.median(ratios[k]):.3f}", f"{macs:.3f}",
                         f"{built:.0f} s ({len(table.rows)} groups)" if k == "latency" else "", notes if k == "latency"
                         else ""])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    subset = args.models != ",".join(MODELS) or args.targets != ",".join(map(str, TARGETS))
    rows = []
    for name in args.models.split(","):
        rows += run(name, [float(t) for t in args.targets.split(",")], args.repeats, args.rounds)
    header = ["model", "target", "solved for", "latency kept (measured)", "MACs kept", "table built in", "warning"]
    text = markdown_table(header, rows)
    print(text)
    out = Path(args.out) if args.out else (None if subset else RESULTS / "latency_target.md")
    if out:
        write(out, "# Latency targets on the CPU\n\n"
              f"`python benchmarks/latency_target.py` ({environment()}; repeats {args.repeats}, rounds "
              f"{args.rounds})\n\n{text}\n")


if __name__ == "__main__":
    main()
