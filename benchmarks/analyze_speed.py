"""Speed of ``depgraph.analyze`` against bare ``torch.fx`` tracing and Torch-Pruning 1.6.1.

Run::

    python benchmarks/analyze_speed.py                  # everything, writes results/analyze_speed.md
    python benchmarks/analyze_speed.py --repeats 3 --models resnet50 --depths 8,16   # printed only
    python benchmarks/analyze_speed.py --profile resnet50,densenet121   # cProfile top 10, nothing timed

Three sections, each a markdown table with pass/fail against the targets:

1. torchvision models (weights=None, eval mode, model and a ``(1, 3, 224, 224)`` input on
   ``meta``): median seconds over ``--repeats`` runs (after one warm-up) of
   ``depgraph.analyze(model, x)``, ``torch.fx.symbolic_trace(model)``, and Torch-Pruning's
   ``DependencyGraph().build_dependency(model, example_inputs=x)`` followed by consuming
   ``get_all_groups(root_module_types=[Conv2d, Linear])``. Targets: depgraph within 8x of
   fx and within 1.5x of Torch-Pruning, and faster than it on densenet121 and vit_b_16.
2. input resolution: depgraph at 640x640 over 224x224 (resnet50, convnext_tiny), target <= 1.3.
3. depth: a synthetic residual network of conv-BN-ReLU blocks at ``--depths``; all three
   tools; the growth exponent (least-squares slope of log time over log depth, depths >= 32)
   is the target: <= 1.15 for depgraph, i.e. linear.

A failure of a tool on a model is written in its cell. Writes ``--out`` (by default
``benchmarks/results/analyze_speed.md`` when no subset option is given, else nowhere).
"""

from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import warnings
from pathlib import Path
from typing import Any, Callable

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


def timed(fn: Callable[[], Any], repeats: int) -> float | str:
    """Median seconds of ``fn``, or the error's first line if it raises."""
    try:
        return median_time(fn, repeats)
    except Exception as exc:  # written into the table cell
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
