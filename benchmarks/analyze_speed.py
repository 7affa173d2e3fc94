"""Speed of ``depgraph.analyze`` against bare ``torch.fx`` tracing and Torch-Pruning 1.6.1.

Run::

    python benchmarks/analyze_speed.py                  # everything, writes results/analyze_speed.md
    python benchmarks/analyze_speed.py --repeats 3 --models resnet50 --depths 8,16   # printed only
    python benchmarks/analyze_speed.py --profile resnet50,densenet121   # cProfile top 10, nothing timed

Three sections, each a markdown table with pass/fail against the targets:

1. torchvision models (weights=None, eval mode, model and a ``(1, 3, 224, 224)`` input on
   ``meta``): median seconds over ``--repeats`` runs, after one warm-up, of
   ``depgraph.analyze(model, x)``, ``torch.fx.symbolic_trace(model)``, and Torch-Pruning's
   ``DependencyGraph().build_dependency(model, example_inputs=x)`` followed by consuming
   ``get_all_groups(root_module_types=[Conv2d, Linear])``. Targets: depgraph within 8x of
   fx and within 1.5x of Torch-Pruning, and faster than it on densenet121 and vit_b_16.
2. input resolution: depgraph at 640x640 over 224x224 (resnet50, convnext_tiny), target <= 1.3.
3. depth: a synthetic residual network of conv-BN-ReLU blocks at ``--depths``; all three
   tools; the growth exponent (least-squares slope of log time over log depth, depths >= 32)
   is the target: <= 1.15 for depgraph, i.e. linear.

Times are this process's CPU time by default (``--clock cpu``: all three tools run
single-threaded on meta tensors, and CPU time is far less disturbed by other jobs on a
shared machine than wall time); ``--clock wall`` measures wall time. A failure of a
tool on a model is written in its cell. Writes ``--out`` (by default
``benchmarks/results/analyze_speed.md`` when no subset option is given, else nowhere).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import math
import pstats
import time
import warnings
from collections.abc import Callable
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from _util import RESULTS, build, environment, first_line, image_input, markdown_table, median_time, write
from torch import fx, nn

import depgraph

MODELS = ["resnet50", "densenet121", "vit_b_16", "efficientnet_b0", "convnext_tiny",
          "mobilenet_v3_large", "regnet_y_800mf"]
MUST_BEAT_TP = {"densenet121", "vit_b_16"}
DEPTHS = [8, 16, 32, 64, 128, 256]
FX_TARGET, TP_TARGET, RESOLUTION_TARGET, SLOPE_TARGET = 8.0, 1.5, 1.3, 1.15

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
Measure = Callable[[Callable[[], Any]], float | str]

warnings.filterwarnings("ignore", module="torch_pruning")


def tp_groups(model: nn.Module, x: torch.Tensor) -> int:
    """Torch-Pruning's full analysis: build the dependency graph and list every group."""
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    return sum(1 for _ in graph.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear]))


def tools(model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """The three timed calls on one model and input."""
    return {
        "depgraph": lambda: depgraph.analyze(model, x),
        "fx": lambda: fx.symbolic_trace(model),
        "TP": lambda: tp_groups(model, x),
    }


def timed(fn: Callable[[], Any], repeats: int, clock: Callable[[], float] = time.process_time) -> float | str:
    """Median seconds of ``fn`` on ``clock``, or the error's first line if it raises."""
    try:
        return median_time(fn, repeats, clock=clock)
    except Exception as exc:  # noqa: BLE001 -- written into the table cell
        return first_line(exc)


def seconds(t: float | str) -> str:
    """A time cell: seconds with 3 decimals, or the error text."""
    return f"{t:.3f}" if isinstance(t, float) else t


def ratio(a: float | str, b: float | str) -> float | None:
    """``a / b`` when both are times, else None."""
    return a / b if isinstance(a, float) and isinstance(b, float) else None


def verdict(value: float | None, limit: float, strict: bool = False) -> str:
    """``"1.23 pass"`` / ``"1.23 FAIL"`` against an upper limit, or ``"n/a"``."""
    if value is None:
        return "n/a"
    ok = value < limit if strict else value <= limit
    return f"{value:.2f} {'pass' if ok else 'FAIL'}"


def model_section(names: list[str], measure: Measure) -> str:
    """Table 1: the three tools on torchvision models, with the ratio targets."""
    rows = []
    for name in names:
        model, _ = build(name)
        t = {tool: measure(fn) for tool, fn in tools(model, image_input(model, name)).items()}
        tp_limit, strict = (1.0, True) if name in MUST_BEAT_TP else (TP_TARGET, False)
        rows.append([name, seconds(t["depgraph"]), seconds(t["fx"]), seconds(t["TP"]),
                     verdict(ratio(t["depgraph"], t["fx"]), FX_TARGET),
                     verdict(ratio(t["depgraph"], t["TP"]), tp_limit, strict)])
        print(" | ".join(rows[-1]), flush=True)
    header = ["model", "depgraph s", "fx s", "TP s", f"depgraph/fx (<= {FX_TARGET:g})",
              f"depgraph/TP (<= {TP_TARGET:g}; < 1 on {', '.join(sorted(MUST_BEAT_TP))})"]
    return markdown_table(header, rows)


def resolution_section(names: list[str], measure: Measure) -> str:
    """Table 2: depgraph at 640x640 against 224x224."""
    rows = []
    for name in names:
        model, _ = build(name)
        small = measure(partial(depgraph.analyze, model, image_input(model, name, 224)))
        large = measure(partial(depgraph.analyze, model, image_input(model, name, 640)))
        rows.append([name, seconds(small), seconds(large), verdict(ratio(large, small), RESOLUTION_TARGET)])
        print(" | ".join(rows[-1]), flush=True)
    return markdown_table(["model", "224 s", "640 s", f"640/224 (<= {RESOLUTION_TARGET:g})"], rows)


class Block(nn.Module):
    """Residual block: conv-BN-ReLU-conv-BN, plus the input, then ReLU."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def residual_net(depth: int, width: int = 16) -> nn.Module:
    """Stem conv, ``depth`` residual blocks, pooling and a linear classifier, on ``meta``."""
    with torch.device("meta"):
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), *[Block(width) for _ in range(depth)],
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()


def growth(depths: list[int], times: list[float | str]) -> float | None:
    """Least-squares slope of log(time) over log(depth), on depths >= 32 (all if fewer than 2)."""
    points = [(math.log(d), math.log(t)) for d, t in zip(depths, times) if isinstance(t, float)]
    large = [p for p, d in zip(points, depths) if d >= 32]
    points = large if len(large) >= 2 else points
    if len(points) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def depth_section(depths: list[int], measure: Measure) -> str:
    """Table 3: the three tools on the synthetic residual network, time per block, growth exponents."""
    times: dict[str, list[float | str]] = {"depgraph": [], "fx": [], "TP": []}
    rows = []
    for depth in depths:
        x = torch.zeros(1, 3, 32, 32, device="meta")
        row: list[str] = [str(depth)]
        for tool, fn in tools(residual_net(depth), x).items():
            times[tool].append(measure(fn))
            t = times[tool][-1]
            row += [seconds(t), f"{1000 * t / depth:.2f}" if isinstance(t, float) else "-"]
        rows.append(row)
        print(" | ".join(row), flush=True)
    header = ["blocks", "depgraph s", "depgraph ms/block", "fx s", "fx ms/block", "TP s", "TP ms/block"]
    slopes = {tool: growth(depths, ts) for tool, ts in times.items()}
    line = (f"Growth exponent (slope of log time over log blocks, blocks >= 32; 1 = linear): depgraph "
            f"{verdict(slopes['depgraph'], SLOPE_TARGET)} (target <= {SLOPE_TARGET:g}), "
            + ", ".join(f"{tool} {s:.2f}" if s is not None else f"{tool} n/a"
                        for tool, s in slopes.items() if tool != "depgraph") + ".")
    return markdown_table(header, rows) + "\n\n" + line


def hot_spots(stats: pstats.Stats, key: str, top: int = 10) -> list[str]:
    """The ``top`` functions by ``key`` ("cumulative" or "tottime"), with their share of the total."""
    total = stats.total_tt  # type: ignore[attr-defined]
    entries = stats.stats.items()  # type: ignore[attr-defined]
    index = 3 if key == "cumulative" else 2
    ranked = sorted(entries, key=lambda kv: kv[1][index], reverse=True)[:top]
    return [f"  {100 * v[index] / total:5.1f}%  {v[index]:7.3f}s  {v[1]:>7} calls  "
            f"{'/'.join(Path(f[0]).parts[-2:])}:{f[1]}({f[2]})" for f, v in ranked]


def phases(stats: pstats.Stats) -> str:
    """Cumulative share of each function ``depgraph.analyze`` calls directly (its phases)."""
    total = stats.total_tt  # type: ignore[attr-defined]
    stats.calc_callees()
    root = next(f for f in stats.stats if f[2] == "analyze" and f[0].endswith("analyze.py"))  # type: ignore
    callees = stats.all_callees[root].items()  # type: ignore[attr-defined]
    ranked = sorted(callees, key=lambda kv: kv[1][3], reverse=True)
    return "phases: " + ", ".join(f"{f[2]} {100 * v[3] / total:.0f}%" for f, v in ranked if v[3] >= total / 100)


def profile(names: list[str]) -> None:
    """Print cProfile's top 10 by cumulative and by own time for one analyze of each model."""
    for name in names:
        model, _ = build(name)
        run = partial(depgraph.analyze, model, image_input(model, name))
        outcome = timed(run, 1)
        prof = cProfile.Profile()
        with contextlib.suppress(Exception):  # profiled up to the failure; the header says why
            prof.runcall(run)
        stats = pstats.Stats(prof)
        print(f"\n## {name}: {seconds(outcome)} s unprofiled, {stats.total_tt:.3f} s profiled")  # type: ignore
        for key in ("cumulative", "tottime"):
            print(f"top 10 by {key}:", *hot_spots(stats, key), sep="\n")
        print(phases(stats))


def main() -> None:
    """Parse arguments; profile, or run the three sections, print and write them."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help=f"comma-separated torchvision models (default: {','.join(MODELS)})")
    parser.add_argument("--depths", help=f"comma-separated block counts (default: {','.join(map(str, DEPTHS))})")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement, after 1 warm-up")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: process CPU time (default; less disturbed by other jobs), wall: wall time")
    parser.add_argument("--out", type=Path, help="markdown file to write (default: results/analyze_speed.md "
                        "when --models and --depths are not given, else none)")
    parser.add_argument("--profile", help="comma-separated models to profile with cProfile instead of timing")
    args = parser.parse_args()
    if args.profile:
        profile(args.profile.split(","))
        return
    names = args.models.split(",") if args.models else MODELS
    depths = [int(d) for d in args.depths.split(",")] if args.depths else DEPTHS
    measure = partial(timed, repeats=args.repeats, clock=CLOCKS[args.clock])
    resolution = [n for n in ("resnet50", "convnext_tiny") if n in names]
    text = "\n\n".join([
        "# depgraph.analyze speed", environment(),
        (f"Median {args.clock} time of {args.repeats} runs after 1 warm-up; models and inputs on `meta`; "
         f"Torch-Pruning {version('torch-pruning')}."),
        "## torchvision models (224x224)", model_section(names, measure),
        "## Input resolution", resolution_section(resolution, measure),
        "## Depth (synthetic residual network, 32x32 input, width 16)", depth_section(depths, measure),
    ])
    print(text)
    out = args.out or (None if args.models or args.depths else RESULTS / "analyze_speed.md")
    if out:
        write(out, text)


if __name__ == "__main__":
    main()
