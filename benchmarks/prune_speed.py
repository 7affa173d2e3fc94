"""Size, MACs and latency of models pruned by depgraph and by Torch-Pruning 1.6.1.

Run::

    python benchmarks/prune_speed.py                    # CPU, writes results/prune_speed.md
    python benchmarks/prune_speed.py --device cuda      # batches 1 and 64, writes results/prune_speed_cuda.md
    python benchmarks/prune_speed.py --models resnet50 --ratios 0.5 --repeats 3   # a subset, printed only

For each model (torchvision, ``weights=None``, ``torch.manual_seed(0)``, eval mode, a
``(1, 3, 224, 224)`` input) and each ratio, three variants side by side:

- ``original``;
- ``depgraph``: ``depgraph.solve(analysis, sparsity=ratio, importance="l2")`` then
  ``depgraph.prune`` -- the ratio is the fraction of *units removed from every group*
  (a group is everything coupled to one channel / feature index; pinned axes such as
  the classes are never pruned);
- ``TP``: ``tp.pruner.MagnitudePruner`` with ``MagnitudeImportance(p=2)`` at
  ``pruning_ratio=ratio``, the final classifier ignored, then ``pruner.step()`` -- the
  ratio is the fraction of *channels removed per layer*. For ViT it gets
  ``num_heads={attention: heads}`` and the model's ``hidden_dim`` is updated afterwards.

The two ratios mean different things, so compare the measured parameter and MAC
reductions, not the ratios. MACs are counted with ``torch.utils.flop_counter.FlopCounterMode``
on one image: convolutions, matmuls and attention only (MACs = FLOPs / 2; elementwise
ops, norms and pooling are not counted), with autograd enabled so that
``nn.MultiheadAttention`` takes its non-fused path, and attention on the math backend so
that its matmuls are counted.

Latency is the median time of ``--repeats`` forwards under ``torch.inference_mode`` after
``--warmup`` warm-up forwards (5 after 1 on the CPU, 20 after 5 on CUDA, by default). On
the CPU: batches 1 and 16, ``torch.set_num_threads(--threads)`` (default 1), on this
process's CPU time (``--clock cpu``, the default: with one thread it is the latency an
idle core would give, and other jobs on a shared machine disturb it far less than wall
time; ``--clock wall`` for wall time). On CUDA: batches 1 and 64, wall time with
``torch.cuda.synchronize`` around each forward. A failure is written in its cell.
Prints the table; writes ``--out`` (by default ``benchmarks/results/prune_speed.md`` /
``prune_speed_cuda.md`` when no subset option is given, else nowhere).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch
import torchvision
from _util import RESULTS, count_params, environment, first_line, markdown_table, tp_magnitude_prune, write
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import depgraph

MODELS = ["resnet50", "mobilenet_v3_large", "vit_b_16"]
RATIOS = [0.3, 0.5]
BATCHES = {"cpu": (1, 16), "cuda": (1, 64)}
TIMING = {"cpu": (1, 5), "cuda": (5, 20)}
"""Default (warm-up, timed) forwards per device: few on a shared 2-core CPU, more on a GPU."""
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}

warnings.filterwarnings("ignore", module="torch_pruning")


def build_model(name: str) -> nn.Module:
    """``name`` with seeded random weights, on the CPU, in eval mode."""
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def depgraph_prune(model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    """depgraph: remove ``ratio`` of the units of every group, lowest L2 norm first."""
    plan = depgraph.solve(depgraph.analyze(model, x), sparsity=ratio, importance="l2")
    return depgraph.prune(model, plan)


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward of ``x``: FlopCounterMode's FLOPs / 2 (conv, matmul, attention).

    Attention runs on the math backend, whose matmuls the counter sees (it has no formula
    for the CPU flash kernel), with autograd on so ``nn.MultiheadAttention`` avoids its
    fused fast path.
    """
    counter = FlopCounterMode(display=False)
    with counter, torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x)
    return counter.get_total_flops() // 2


def latency(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int,
            clock: Callable[[], float]) -> float:
    """Median seconds of ``model(x)`` over ``repeats`` runs after ``warmup`` runs, on ``clock``.

    On CUDA the clock is wall time with ``torch.cuda.synchronize`` before and after each run.
    """
    cuda = x.device.type == "cuda"
    clock = time.perf_counter if cuda else clock
    times = []
    with torch.inference_mode():
        for _ in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize()
            start = clock()
            model(x)
            if cuda:
                torch.cuda.synchronize()
            times.append(clock() - start)
    return statistics.median(times[warmup:])


def measure(model: nn.Module, args: argparse.Namespace) -> dict[str, float | str]:
    """Parameters, MACs and latency at each batch of ``args.device``; a failing measure records its error."""
    out: dict[str, float | str] = {"params": count_params(model)}
    x = torch.randn(1, 3, 224, 224)
    out["macs"] = attempt(lambda: count_macs(model, x))
    model = model.to(args.device)
    for batch in BATCHES[args.device]:
        xb = torch.randn(batch, 3, 224, 224, device=args.device)
        out[f"b{batch}"] = attempt(lambda: latency(model, xb, args.warmup, args.repeats, CLOCKS[args.clock]))
    model.to("cpu")
    return out


def attempt(fn: Callable[[], float]) -> float | str:
    """``fn()``, or the first line of its error."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 -- written into the table cell
        return first_line(exc)


def cells(name: str, ratio: str, method: str, m: dict, base: dict, batches: tuple[int, ...]) -> list[str]:
    """One table row: sizes and latencies with their ratio to the original's."""
    def pair(key: str, scale: float, fmt: str) -> list[str]:
        v, b = m[key], base[key]
        if isinstance(v, str):
            return [v, "-"]
        return [format(v / scale, fmt), f"{v / b:.2f}x" if isinstance(b, (int, float)) else "-"]
    row = [name, ratio, method, *pair("params", 1e6, ".2f"), *pair("macs", 1e9, ".2f")]
    for batch in batches:
        row += pair(f"b{batch}", 1e-3, ".1f")
    return row


def model_rows(name: str, args: argparse.Namespace) -> list[list[str]]:
    """The original, then depgraph and TP at each ratio, for one model."""
    model = build_model(name)
    x = torch.zeros(1, 3, 224, 224)
    batches = BATCHES[args.device]
    base = measure(model, args)
    rows = [cells(name, "-", "original", base, base, batches)]
    for ratio in args.ratios:
        for method, prune in (("depgraph", depgraph_prune), ("TP", tp_magnitude_prune)):
            try:
                result = measure(prune(model, x, ratio), args)
            except Exception as exc:  # noqa: BLE001 -- a failed prune is a row, not a crash
                result = {"params": first_line(exc), "macs": "-", **{f"b{b}": "-" for b in batches}}
            rows.append(cells(name, f"{ratio:g}", method, result, base, batches))
            print(" | ".join(rows[-1]), flush=True)
    return rows


def page(rows: list[list[str]], args: argparse.Namespace) -> str:
    """The markdown page: environment, how it was measured, the table, how to read it."""
    if args.device == "cuda":
        where = f"GPU: {torch.cuda.get_device_name()}, wall clock"
    else:
        where = f"CPU, torch.set_num_threads({args.threads}), {args.clock} clock"
    batches = BATCHES[args.device]
    header = ["model", "ratio", "method", "params M", "params vs orig.", "GMACs", "MACs vs orig."]
    for b in batches:
        header += [f"batch {b} ms", f"batch {b} vs orig."]
    return "\n\n".join([
        "# Pruned model size and speed: depgraph vs Torch-Pruning",
        environment(),
        (f"{where}; latency = median of {args.repeats} forwards after {args.warmup} warm-up "
         f"(torch.inference_mode, 224x224 input); Torch-Pruning {version('torch-pruning')}. "
         "MACs: torch.utils.flop_counter.FlopCounterMode FLOPs / 2 on one image (conv, matmul, "
         "attention; elementwise ops, norms and pooling not counted)."),
        markdown_table(header, rows),
        ("The ratio means different things: depgraph removes that fraction of the units of every "
         "group (all layers coupled to a channel together; pinned axes such as the classes stay); "
         "Torch-Pruning removes that fraction of the channels of every prunable layer except the "
         "ignored classifier. Compare the measured parameter and MAC reductions. Both rank by L2 "
         "magnitude; models have random weights (weights=None, seed 0)."),
    ])


def main() -> None:
    """Parse arguments, measure every model, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help=f"comma-separated torchvision models (default: {','.join(MODELS)})")
    parser.add_argument("--ratios", help=f"comma-separated ratios (default: {','.join(map(str, RATIOS))})")
    parser.add_argument("--device", choices=sorted(BATCHES), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU; default 1)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="CPU latency clock: process CPU time (default) or wall; CUDA always uses wall")
    parser.add_argument("--warmup", type=int, help="untimed forwards before timing (default: 1 cpu, 5 cuda)")
    parser.add_argument("--repeats", type=int,
                        help="timed forwards, median reported (default: 5 cpu, 20 cuda)")
    parser.add_argument("--out", type=Path, help="markdown file to write (default: "
                        "results/prune_speed[_cuda].md when --models and --ratios are not given, else none)")
    args = parser.parse_args()
    subset = bool(args.models or args.ratios)
    warmup, repeats = TIMING[args.device]
    args.warmup = warmup if args.warmup is None else args.warmup
    args.repeats = repeats if args.repeats is None else args.repeats
    torch.set_num_threads(args.threads)
    names = args.models.split(",") if args.models else MODELS
    args.ratios = [float(r) for r in args.ratios.split(",")] if args.ratios else RATIOS
    rows = [row for name in names for row in model_rows(name, args)]
    text = page(rows, args)
    print(text)
    default = RESULTS / ("prune_speed.md" if args.device == "cpu" else f"prune_speed_{args.device}.md")
    out = args.out or (None if subset else default)
    if out:
        write(out, text)


if __name__ == "__main__":
    main()
