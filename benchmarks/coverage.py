"""Coverage of ``depgraph`` and Torch-Pruning: every torchvision classification model here;
the other families through ``--family``.

Run::

    python benchmarks/coverage.py                       # all models, writes results/coverage.md
    python benchmarks/coverage.py --family tasks        # runs tasks_coverage.py: torchvision detection,
                                                        # segmentation, video, optical flow
    python benchmarks/coverage.py --family hf           # runs hf_coverage.py: Hugging Face + Llama/Qwen sweep
    python benchmarks/coverage.py --family timm         # TIMM_MODELS, writes results/timm_coverage.md
    python benchmarks/coverage.py --family all          # all four, one after the other (over an hour)
    python benchmarks/coverage.py --no-equivalence      # analysis columns only (quick)
    python benchmarks/coverage.py --no-tp               # without the Torch-Pruning columns
    python benchmarks/coverage.py --models resnet18,vit_b_16   # a subset, printed only
    python benchmarks/coverage.py --models resnet18 --out /tmp/cov.md
    python benchmarks/coverage.py --models vit_b_16 --update   # re-run rows of results/coverage.md

Analysis columns: each model is built with ``weights=None`` in eval mode on the ``meta``
device (on the CPU, then moved to meta, when its init cannot run on meta), with a
``(1, 3, 224, 224)`` input (299 for inception_v3): whether bare ``torch.fx.symbolic_trace``
traces it, whether ``depgraph.analyze`` succeeds (else the error's first line), the
number of groups and unsupported ops, and the analysis time.

Equivalence columns (skipped with ``--no-equivalence``): the model is built again on the
CPU with real random weights (``torch.manual_seed(0)``); a final classifier whose weight is
all zeros (the ViT heads) is re-initialised from a normal distribution, and every batch
norm gets the running statistics of its input on a random batch of 8 (random-init batch
norms do not normalize: activations then fade until some outputs are the classifier bias
alone, whatever the input). It is analyzed at a small input where the model allows
(64x64; 75x75 for inception_v3; 224x224 for vit/swin/maxvit, which need it), a random
plan keeps a random ``ceil(n / 2)`` of the ``n`` units of every group (seeded; more where
a group must keep more), and ``depgraph.prune`` and ``depgraph.simulate`` are applied. On a batch of two random images
(the analysis saw one), the model is *equivalent* when ``max |y_pruned - y_simulated| <=
1e-4 * max |y_simulated|``, and *inconclusive* when it is, but the two images move the
simulated output by no more than that tolerance (then an error in the part of the output
that depends on the input could hide under it; deep random nets with half their units
removed can collapse to a nearly constant output). A model not found equivalent in float32
is checked again in float64 (model and input converted, same plan) with a tolerance of
``1e-9``, and the cell gives both verdicts. The table gives that error relative to the output
scale, the scale itself, the pruned model's parameter count over the original's, and the
seconds the whole check took (build, calibrate, analyze, plan, prune, simulate, forwards).
*Keeps its class* is ``isinstance(pruned, type(model))``: "no" where ``prune`` returned a
``torch.fx.GraphModule`` (named after the class, but not an instance of it), with the
literal that forced it (from ``prune``'s warning) in the error column.

``--family timm`` runs the same columns over ``TIMM_MODELS`` (timm, ``pretrained=False``; the
input size is the model's ``pretrained_cfg``, for analysis and equivalence alike).

Torch-Pruning columns (skipped with ``--no-tp``), side by side with depgraph's, on the same
real CPU model and small input as the equivalence check (a fresh copy): whether
``tp.DependencyGraph().build_dependency`` succeeds, its number of groups
(``get_all_groups(root_module_types=[nn.Conv2d, nn.Linear])``), whether
``tp.pruner.MagnitudePruner`` (L2 magnitude, ``pruning_ratio=0.5``, the final classifier in
``ignored_layers``, ``num_heads`` of every ``nn.MultiheadAttention``) steps and the pruned model
then runs forward on the two images, and the seconds all that took (build included). As in Torch-Pruning's
own ViT example, a torchvision ViT's ``hidden_dim`` attribute is set to the pruned width
after the step (its forward reads it). TP gets at most ``TP_TIMEOUT_S`` seconds per model.

Every model runs in its own forked process (so memory is returned and a crash or an
out-of-memory kill only loses that row; caches start cold for each model), under
try/except, so one failure never stops the sweep. Prints a markdown table and the summary
lines (``N/M analyzed``, ``N/M equivalent``, ``N/M inconclusive``, and TP's ``N/M built``,
``N/M pruned``); writes it to ``--out`` (by default
``benchmarks/results/coverage.md`` for a full run, nowhere for a subset).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
import torchvision
from _util import (
    RESULTS,
    build,
    count_params,
    environment,
    first_line,
    get_model,
    image_input,
    in_fork,
    markdown_table,
    tp_magnitude_prune,
    write,
)
from torch import fx, nn

import depgraph

HEADER = ["model", "built on", "fx traces", "analyzed", "groups", "unsupported ops (count: which)",
          "analyze s (one cold run)", "equiv. input", "pruned", "equivalent (err / scale)", "output scale",
          "params kept", "keeps its class (isinstance)", "equiv. s", "error",
          "TP graph built", "TP groups", "TP pruned (0.5) + forward",
          "TP params kept", "TP s", "TP error"]
RTOL = 1e-4
"""Allowed max |prune - simulate| relative to max |simulate| (float32)."""
RTOL64 = 1e-9
"""The same in float64, where a float32 check was not conclusive."""
FULL_SIZE = ("vit_", "swin_", "maxvit_")
"""Model name prefixes whose input size is fixed at 224."""
TIMEOUT_S = 1200
"""Seconds one model's process may take (depgraph's columns) before its row records a timeout."""
TP_TIMEOUT_S = 300
"""Seconds Torch-Pruning may take on one model, after depgraph's columns are done."""
TP_RATIO = 0.5
TIMM_MODELS = (
    "resnet50", "resnext50_32x4d", "regnety_008", "densenet121", "efficientnet_b0", "mobilenetv3_large_100",
    "ghostnet_100", "repvgg_a0", "cspdarknet53", "convnext_atto", "convnextv2_atto", "vit_tiny_patch16_224",
    "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "swinv2_cr_tiny_224", "poolformer_s12",
    "poolformerv2_s12", "caformer_s18", "levit_128s", "efficientformer_l1", "fastvit_t8", "mobilevit_xs",
    "edgenext_xx_small", "pvt_v2_b0", "coat_lite_tiny", "mixer_b16_224", "resmlp_12_224", "nfnet_l0",
    "maxvit_tiny_tf_224", "eva02_tiny_patch14_224",
)
"""The timm sweep (``--family timm``): families with different ops and forwards, small variants."""
FAMILIES = {"tasks": "tasks_coverage.py", "hf": "hf_coverage.py"}
"""The sweeps of the other families, by ``--family`` name: scripts beside this one, each
writing its own table to ``results/``."""

warnings.filterwarnings("ignore", category=FutureWarning, module="torchvision")  # inception/googlenet init
warnings.filterwarnings("ignore", module="torch_pruning")


@dataclass
class Row:
    """What the sweep found for one model."""

    model: str
    built: str = "-"
    traced: str = "-"
    analyzed: bool = False
    groups: int | str = "-"
    unsupported: str = "-"
    seconds: str = "-"
    size: str = "-"
    pruned: str = "-"
    equivalent: str = "-"
    scale: str = "-"
    kept: str = "-"
    kept_class: str = "-"
    check_seconds: str = "-"
    error: str = ""
    tp: TPCells | None = None

    def cells(self) -> list[object]:
        """The row's cells, in the order of ``HEADER``."""
        tp_cells = self.tp or TPCells()
        return [self.model, self.built, self.traced, "yes" if self.analyzed else "no", self.groups,
                self.unsupported, self.seconds, self.size, self.pruned, self.equivalent, self.scale,
                self.kept, self.kept_class, self.check_seconds, self.error, *tp_cells.cells()]


@dataclass
class TPCells:
    """What Torch-Pruning 1.6.1 did on one model."""

    built: str = "-"
    groups: int | str = "-"
    pruned: str = "-"
    kept: str = "-"
    seconds: str = "-"
    error: str = ""

    def cells(self) -> list[object]:
        """The TP cells, in the order of the TP part of ``HEADER``."""
        return [self.built, self.groups, self.pruned, self.kept, self.seconds, self.error]


def cover(name: str) -> Row:
    """Build, trace and analyze one model on ``meta``; never raises."""
    row = Row(name)
    try:
        model, row.built = build(name)
    except Exception as exc:  # noqa: BLE001 -- one broken model must not stop the sweep
        row.error = "build: " + first_line(exc)
        return row
    try:
        fx.symbolic_trace(model)
        row.traced = "yes"
    except Exception:  # noqa: BLE001 -- fx raises many types
        row.traced = "no"
    x = image_input(model, name)
    start = time.perf_counter()
    try:
        analysis = depgraph.analyze(model, x)
    except Exception as exc:  # noqa: BLE001 -- reported in the table, not raised
        row.error = first_line(exc, limit=240)
        return row
    row.seconds = f"{time.perf_counter() - start:.3f}"
    row.analyzed, row.groups = True, len(analysis.groups)
    row.unsupported = unsupported_summary([u.op for u in analysis.unsupported])
    return row


def unsupported_summary(ops: list[str]) -> str:
    """``"23: stochastic_depth x18, layer_norm x5"`` (short op names, most frequent first), or ``"0"``."""
    counts = Counter(op.rpartition(".")[2] for op in ops)
    return f"{len(ops)}: " + ", ".join(f"{op} x{n}" for op, n in counts.most_common()) if ops else "0"


def small_size(name: str) -> int:
    """The smallest convenient input side: 224 for ViT/Swin/MaxViT, 75 for inception_v3, else 64."""
    if name.startswith("timm:"):
        return image_input(build(name)[0], name).shape[-1]
    if name.startswith(FULL_SIZE):
        return 224
    return 75 if name == "inception_v3" else 64


def real_model(name: str) -> nn.Module:
    """``name`` on the CPU with seeded random weights, eval mode, and a classifier that is not all zeros."""
    torch.manual_seed(0)
    model = get_model(name).eval()
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    if not last.weight.any():
        with torch.no_grad():
            nn.init.normal_(last.weight, std=last.weight[0].numel() ** -0.5)
    return model


def random_plan(analysis: depgraph.Analysis, seed: int = 0) -> depgraph.Plan:
    """A plan keeping a random ``ceil(n / 2)`` of the ``n`` units of every group (its ``min_keep`` if more)."""
    gen = torch.Generator().manual_seed(seed)
    keep = {g.index: torch.randperm(g.size, generator=gen)[: max(math.ceil(g.size / 2), g.min_keep)]
            for g in analysis.groups}
    return depgraph.Plan.from_keep(analysis, keep)


def calibrate(model: nn.Module, x: torch.Tensor) -> None:
    """Set every batch norm's running statistics to those of its input on ``x`` (in eval mode).

    Random-init batch norms do not normalize, so activations shrink layer after layer
    (googlenet's output is then its classifier bias alone, whatever the input).
    """
    def use_batch(bn: nn.modules.batchnorm._BatchNorm, args: tuple[torch.Tensor, ...]) -> None:
        channels = args[0].transpose(0, 1).flatten(1)
        mean, var = bn.running_mean, bn.running_var
        if mean is not None and var is not None:  # without running stats, it uses the batch's anyway
            mean.copy_(channels.mean(1))
            var.copy_(channels.var(1))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [m.register_forward_pre_hook(use_batch) for m in norms]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()


def verdict(ys: torch.Tensor, yp: torch.Tensor, rtol: float = RTOL) -> str:
    """``"yes (err)"`` / ``"NO (err)"`` with err = max |yp - ys| / max |ys|; ``"inconclusive"`` when
    the two images of the batch move the simulated output by no more than the tolerance (an
    error in the input-dependent part of the output could then hide under it)."""
    scale = ys.abs().max().item()
    err = (yp - ys).abs().max().item() / scale
    moved = (ys[0] - ys[1]).abs().max().item() / scale
    if err <= rtol and moved <= rtol:
        return f"inconclusive ({err:.1e}; the input moves the output by {moved:.1e})"
    return f"{'yes' if err <= rtol else 'NO'} ({err:.1e})"


def outputs(model: nn.Module, plan: depgraph.Plan, x: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, nn.Module, list[str]]:
    """The simulated and the pruned model's outputs on ``x``, the pruned model, and the
    messages of the warnings ``prune`` gave."""
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned, simulated = depgraph.prune(model, plan), depgraph.simulate(model, plan)
        return simulated(x), pruned(x), pruned, [str(w.message) for w in caught if "prune" in str(w.message)]


def check_equivalence(name: str, row: Row) -> None:
    """Fill the equivalence cells of ``row``: random plan, prune, simulate, compare; never raises."""
    start = time.perf_counter()
    side = small_size(name)
    row.size = f"{side}x{side}"
    try:
        model = real_model(name)
        x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
        calibrate(model, torch.randn(8, 3, side, side, generator=torch.Generator().manual_seed(2)))
        plan = random_plan(depgraph.analyze(model, x[:1]))
        ys, yp, pruned, said = outputs(model, plan, x)
        row.pruned = "yes"
        row.kept_class = "yes" if isinstance(pruned, type(model)) else "no"
        if said and not isinstance(pruned, type(model)):
            row.error = "graph: " + said[0][:237] + ("…" if len(said[0]) > 237 else "")
        row.equivalent = verdict(ys, yp)
        if not row.equivalent.startswith("yes"):
            # deep random nets with half their units gone amplify float32 rounding, or end
            # nearly constant: float64 separates rounding from a wrong prune
            ys64, yp64, _, _ = outputs(model.double(), plan, x.double())
            row.equivalent = f"{verdict(ys64, yp64, RTOL64)} in float64; float32: {row.equivalent}"
    except Exception as exc:  # noqa: BLE001 -- reported in the table, not raised
        row.pruned = "no" if row.pruned == "-" else row.pruned
        row.error = (row.error + "; " if row.error else "") + "equivalence: " + first_line(exc, limit=240)
        return
    row.scale = f"{ys.abs().max().item():.1e}"
    row.kept = f"{count_params(pruned) / count_params(model):.3f}"
    row.check_seconds = f"{time.perf_counter() - start:.1f}"


def run_tp(name: str) -> TPCells:
    """Torch-Pruning's graph, groups and magnitude pruning of ``name`` (module docstring); never raises."""
    cells, start = TPCells(), time.perf_counter()
    side = small_size(name)
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    try:
        model = real_model(name)
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1], verbose=False)
        cells.built = "yes"
        cells.groups = len(list(graph.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear])))
        cells.pruned = "no"
        pruned = tp_magnitude_prune(model, x[:1], TP_RATIO)
        with torch.no_grad():
            pruned(x)
        cells.pruned, cells.kept = "yes", f"{count_params(pruned) / count_params(model):.3f}"
    except Exception as exc:  # noqa: BLE001 -- reported in the table, not raised
        cells.built = "no" if cells.built == "-" else cells.built
        cells.error = first_line(exc, limit=200)
    cells.seconds = f"{time.perf_counter() - start:.1f}"
    return cells


def worker(conn: Connection, name: str, equivalence: bool, with_tp: bool) -> None:
    """Body of one model's process: analysis columns, then (optionally) equivalence; sends the row,
    then (optionally) Torch-Pruning's cells in a second message."""
    row = cover(name)
    if equivalence:
        check_equivalence(name, row)
    conn.send(row)
    if with_tp:
        conn.send(run_tp(name))
    conn.close()


def isolated(
    name: str, equivalence: bool, with_tp: bool, work: Callable[..., None] | None = None, row_type: type = Row,
    timeouts: tuple[float, float] = (TIMEOUT_S, TP_TIMEOUT_S),
) -> Any:
    """Run ``work`` (:func:`worker`) for ``name`` in a forked process: it sends a ``row_type``,
    then (``with_tp``) TPCells, each within its timeout; a crash or a timeout becomes an error cell."""
    messages = in_fork(work or worker, (name, equivalence, with_tp), timeouts[: 1 + with_tp])
    if not isinstance(messages[0], row_type):
        return row_type(name, error=messages[0])
    row = messages[0]
    if with_tp:
        row.tp = messages[1] if isinstance(messages[1], TPCells) else TPCells(error=messages[1])
    return row


def read_rows(path: Path) -> tuple[str, list[Row]]:
    """The environment line and the rows of a page :func:`report` wrote."""
    lines = path.read_text().splitlines()
    env = next(line for line in lines if line.startswith("Run "))
    rows = []
    start = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        cells = line[2:-2].split(" | ")
        if len(cells) == len(HEADER) - 1:  # written before the class column: not known
            cells.insert(HEADER.index("keeps its class (isinstance)"), "-")
        row = Row(*cells[:3], cells[3] == "yes", *cells[4:15])  # type: ignore[arg-type]
        row.tp = TPCells(*cells[15:])
        rows.append(row)
    return env, rows


def report(rows: list[Row], equivalence: bool, with_tp: bool, env: str | None = None,
           title: str = "torchvision classification models") -> str:
    """The markdown page: environment (``env``, or this run's), table, summary lines."""
    n = len(rows)
    done = sum(r.analyzed for r in rows)
    traced = sum(r.traced == "yes" for r in rows)
    lines = [f"{done}/{n} analyzed ({traced}/{n} traced by bare torch.fx)."]
    if equivalence:
        pruned = sum(r.pruned == "yes" for r in rows)
        same = sum(r.equivalent.startswith("yes") for r in rows)
        unsure = sum(r.equivalent.startswith("inconclusive") for r in rows)
        wide = sum(" in float64" in r.equivalent and r.equivalent.startswith("yes") for r in rows)
        kept = sum(r.kept_class == "yes" for r in rows)
        lines += [(f"{pruned}/{n} pruned and simulated, {same}/{n} equivalent "
                  f"(max |prune - simulate| <= {RTOL:g} x max |simulate|; {wide} of them checked in float64 "
                  f"with {RTOL64:g}), {unsure}/{n} inconclusive "
                  f"(within the tolerance, but the two images move the output by <= {RTOL:g} of its scale). "
                  f"{kept}/{n} pruned models keep their class (isinstance; the others are torch.fx graphs).")]
    if with_tp:
        tps = [r.tp or TPCells() for r in rows]
        built = sum(c.built == "yes" for c in tps)
        lines += [(f"Torch-Pruning {tp_version()}: {built}/{n} dependency graphs built, "
                  f"{sum(c.pruned == 'yes' for c in tps)}/{n} pruned by MagnitudePruner at {TP_RATIO:g} "
                  f"and ran forward.")]
    return "\n\n".join([
        f"# depgraph and Torch-Pruning coverage: {title}",
        env or environment(),
        markdown_table(HEADER, [r.cells() for r in rows]),
        *lines,
    ])


def tp_version() -> str:
    """The installed torch-pruning distribution's version (its ``__version__`` lags behind)."""
    return importlib.metadata.version("torch-pruning")


def main() -> None:
    """Parse arguments, run the sweep, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated subset of torchvision model names")
    parser.add_argument("--no-equivalence", action="store_true", help="analysis columns only (quick)")
    parser.add_argument("--no-tp", action="store_true", help="without the Torch-Pruning columns")
    parser.add_argument("--out", type=Path, help="markdown file to write (default: results/coverage.md "
                        "for a full run, none for a subset)")
    parser.add_argument("--update", action="store_true", help="re-run the --models and replace their rows in "
                        "results/coverage.md (the page then says which rows were re-run, and when)")
    parser.add_argument("--family", choices=("classification", "timm", *FAMILIES, "all"), default="classification",
                        help="which sweep to run (the others are their own scripts; options apply to this one)")
    args = parser.parse_args()
    others = list(FAMILIES) if args.family == "all" else [f for f in FAMILIES if f == args.family]
    for family in others:
        subprocess.run([sys.executable, str(Path(__file__).with_name(FAMILIES[family]))], check=False)
    if args.family == "all":
        subprocess.run([sys.executable, __file__, "--family", "timm"], check=False)
    if args.family not in ("classification", "timm", "all"):
        return
    timm_family = args.family == "timm"
    everything = ([f"timm:{n}" for n in TIMM_MODELS] if timm_family
                  else torchvision.models.list_models(module=torchvision.models))
    names = args.models.split(",") if args.models else everything
    page, title = (("timm_coverage.md", "timm models") if timm_family
                   else ("coverage.md", "torchvision classification models"))
    rows = []
    for name in names:
        rows.append(isolated(name, not args.no_equivalence, not args.no_tp))
        print(" | ".join(str(c) for c in rows[-1].cells()), flush=True)
    text = report(rows, not args.no_equivalence, not args.no_tp, title=title)
    if args.update:
        env, old = read_rows(RESULTS / page)
        fresh = {r.model: r for r in rows}
        for r in rows:  # re-run without Torch-Pruning: its cells of the earlier run stay
            r.tp = r.tp or next((o.tp for o in old if o.model == r.model), None)
        text = report([fresh.get(r.model, r) for r in old], True, True, env, title) + (
            f"\n\nRows re-run after the run above{' (Torch-Pruning cells not re-run)' if args.no_tp else ''}: "
            f"{', '.join(fresh)}. " + environment())
        args.out = RESULTS / page
    print(text)
    out = args.out or (None if args.models else RESULTS / page)
    if out:
        write(out, text)


if __name__ == "__main__":
    main()
