"""Coverage of ``depgraph`` and Torch-Pruning over torchvision beyond classification: every
model of ``torchvision.models.detection``, ``.segmentation``, ``.video`` and ``.optical_flow``.

Run::

    python benchmarks/tasks_coverage.py                          # all, writes results/tasks_coverage.md
    python benchmarks/tasks_coverage.py --models r3d_18,raft_small   # a subset, printed only
    python benchmarks/tasks_coverage.py --no-tp                  # without the Torch-Pruning columns

Each model is built on the CPU with ``weights=None`` (and ``weights_backbone=None``),
seeded, its batch norms given the statistics of a random batch of two (random-init batch
norms make activations fade), in eval mode, and analyzed with ``tracer="auto"`` (fx, then
export, then record) on a small real input: segmentation 1x3x64x64; detection one
3x128x128 image, resized inside to 128 (``min_size=max_size=128``; SSD300 and SSDlite320
resize to their fixed 300 and 320); video 1x3x8x64x64 (s3d, mvit_v1_b and mvit_v2_s need
1x3x16x224x224: s3d's pooling kernels and the MViTs' positional embeddings fix the clip);
raft_small and raft_large two 1x3x128x128 images and ``num_flow_updates=4``. A random plan
keeps a random non-empty subset of every group's units (seeded); ``depgraph.prune`` and
``depgraph.simulate`` are applied and compared on the example input. *pruned class kept*:
whether ``prune`` returned the model's own class (``type(pruned) is type(model)``) rather
than an fx GraphModule.

*What was compared*: segmentation, video and optical flow compare the model's outputs
(every tensor). Detection outputs in eval mode depend on the data (score thresholds, NMS),
and a recorded graph is specialized to the run it recorded (pruned weights change how many
boxes survive, so sizes burnt into later ops no longer fit): the check compares, on the
example input, the outputs of every op that reads a weight of the detection head (the RPN
head for the R-CNNs, ``head.`` for RetinaNet, FCOS and SSD) whose output channels no group
prunes: the class logits and box regressions of every feature level, which depend on the
backbone, the FPN (or SSD's extra layers) and the head (taken, when ``prune`` kept the
model's class, from forward hooks on the modules owning those weights, in call order).
*equivalent*: max |prune - simulate| <= 1e-4 x max |simulate| for every compared tensor.

Torch-Pruning columns (skipped with ``--no-tp``), on a fresh copy of the same model and
the same example input (``example_inputs`` is the tuple of the model's positional inputs:
``([image],)`` for detection, ``(image1, image2, 4)`` for RAFT): whether
``tp.DependencyGraph().build_dependency`` succeeds, its number of groups
(``get_all_groups(root_module_types=[nn.Conv2d, nn.Linear, nn.Conv3d])``), whether
``tp.pruner.MagnitudePruner`` (L2 magnitude, ``pruning_ratio=0.5``) steps and the pruned
model then runs forward on the example input, the parameters kept, the seconds all that
took (build included) and the error's first line, prefixed by the stage that raised
(``graph``, ``groups``, ``step``, ``forward``). ``ignored_layers`` holds the final
prediction layers, whose output sizes are the task's: for detection every Conv2d, Linear
or ConvTranspose2d named ``cls_logits``, ``bbox_pred``, ``bbox_reg``, ``bbox_ctrness``,
``cls_score``, ``mask_fcn_logits`` or ``kps_score_lowres`` (RPN, RetinaNet, FCOS and
R-CNN predictors), and the last Conv2d of every entry of SSD's
``head.classification_head.module_list`` and ``head.regression_head.module_list``; for
segmentation the convs under ``classifier`` with ``num_classes`` (21) output channels;
for video the last Linear or Conv3d (the final fc; s3d's classifier conv); for RAFT the
flow head's last conv (``update_block.flow_head.conv2``) and raft_large's convex-upsampling
mask predictor's last conv (``update_block.mask_predictor.conv``). TP gets at most
``TP_TIMEOUT_S`` (90) seconds per model, after depgraph's columns, of which counting the groups
gets ``TP_GROUPS_S`` (30; the pruner is tried after a failed count), and 4 GiB of address space
beyond what the process holds (an allocation past it is a ``MemoryError`` cell).

Every model runs in its own forked process under a timeout, so one failure only loses its
row (a failure of Torch-Pruning only its cells).
"""

from __future__ import annotations

import argparse
import resource
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch_pruning as tp
import torchvision
from _util import RESULTS, count_params, environment, first_line, markdown_table, write
from coverage import TPCells, tp_version
from coverage import isolated as run_isolated
from torch import fx, nn
from torch.utils._pytree import tree_leaves
from torchvision.models import detection, optical_flow, segmentation, video

import depgraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from equivalence import FLOOR, RTOL, calibrate, outputs_of, random_keep, weight_ops

HEADER = ["model", "tracer used", "analyzed", "groups", "unsupported (count: ops)", "pruned (params kept)",
          "pruned class kept", "equivalent (err / scale)", "what was compared", "seconds", "TP graph built",
          "TP groups", "TP pruned (0.5) + forward", "TP params kept", "TP s", "TP error"]
TIMEOUT_S = 300
"""Seconds one model's process may take for depgraph's columns."""
TP_TIMEOUT_S = 90
"""Seconds Torch-Pruning may take on one model, after depgraph's columns are done (coverage.py
gives 300; its group enumeration runs for minutes on most detection models, and 90 keeps the
sweep near half an hour)."""
TP_GROUPS_S = 30
"""Seconds of those that counting TP's groups may take before the pruner is tried anyway."""
TP_RATIO = 0.5
TP_MEMORY = 4 << 30
"""Bytes of address space TP may map beyond what the process holds when TP starts: its group
enumeration grows without bound on some models, and the machine is shared."""
TP_ROOTS = [nn.Conv2d, nn.Linear, nn.Conv3d]
"""``root_module_types`` of the groups counted in the TP groups column."""
SEGMENTATION = tuple(torchvision.models.list_models(module=segmentation))
DETECTION = tuple(torchvision.models.list_models(module=detection))
VIDEO = tuple(torchvision.models.list_models(module=video))
OPTICAL_FLOW = tuple(torchvision.models.list_models(module=optical_flow))
MODELS = (*SEGMENTATION, *DETECTION, *VIDEO, *OPTICAL_FLOW)
FULL_CLIP = ("s3d", "mvit_v1_b", "mvit_v2_s")
"""Video models whose input clip is fixed at 16x224x224."""
PREDICTORS = ("cls_logits", "bbox_pred", "bbox_reg", "bbox_ctrness", "cls_score", "mask_fcn_logits",
              "kps_score_lowres")
"""Names of the final prediction layers of the detection heads (RPN, RetinaNet, FCOS, R-CNN predictors)."""
NUM_CLASSES = 21
"""Output channels of the segmentation models' final classifier convs (the builders' default)."""

T = TypeVar("T")

warnings.filterwarnings("ignore", module="torch_pruning")


@dataclass
class Row:
    """What the sweep found for one model."""

    name: str
    tracer: str = ""
    analyzed: bool = False
    groups: int | str = ""
    unsupported: str = ""
    pruned: str = ""
    class_kept: str = ""
    equivalent: str = ""
    compared: str = ""
    seconds: float = 0.0
    error: str = ""
    tp: TPCells | None = None

    def cells(self) -> list[object]:
        """The row's cells, in the order of ``HEADER``."""
        analyzed = "yes" if self.analyzed else f"no: {self.error}"
        equivalent = self.equivalent or (f"error: {self.error}" if self.analyzed and self.error else "")
        return [self.name, self.tracer, analyzed, self.groups, self.unsupported, self.pruned, self.class_kept,
                equivalent, self.compared, f"{self.seconds:.1f}", *(self.tp or TPCells()).cells()]


def build(name: str) -> tuple[nn.Module, tuple[Any, ...]]:
    """The model (batch norms calibrated on a random batch of two, eval mode) and its example inputs."""
    torch.manual_seed(0)
    if name in SEGMENTATION:
        model = getattr(segmentation, name)(weights=None, weights_backbone=None)
        return calibrate(model, torch.randn(2, 3, 64, 64)), (torch.randn(1, 3, 64, 64),)
    if name in DETECTION:
        sized = {} if name.startswith("ssd") else {"min_size": 128, "max_size": 128}
        model = getattr(detection, name)(weights=None, weights_backbone=None, **sized)
        size = {"ssd300_vgg16": 300, "ssdlite320_mobilenet_v3_large": 320}.get(name, 128)
        calibrate(model.backbone, torch.rand(2, 3, size, size))
        return model.eval(), ([torch.rand(3, 128, 128)],)
    if name in VIDEO:
        model = getattr(video, name)(weights=None)
        shape = (3, 16, 224, 224) if name in FULL_CLIP else (3, 8, 64, 64)
        return calibrate(model, torch.randn(2, *shape)), (torch.randn(1, *shape),)
    assert name in OPTICAL_FLOW, f"unknown model {name}"
    model = getattr(optical_flow, name)(weights=None)
    return model.eval(), (torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128), 4)  # 4 flow updates


def head_ops(analysis: depgraph.Analysis, prefix: str) -> list[str]:
    """Names of the ops reading a weight under ``prefix`` whose output channels no group prunes."""
    pruned = {(m.name, m.dim) for g in analysis.groups for m in g.members}
    heads = {name for name in analysis.params
             if name.startswith(prefix) and name.endswith("weight") and (name, 0) not in pruned}
    return weight_ops(analysis, heads)


def head_outputs(model: nn.Module, graph: fx.GraphModule, names: list[str], inputs: tuple[Any, ...]) -> list[Any]:
    """The values of the ops ``names`` of ``graph`` when ``model`` runs ``inputs``.

    ``model`` is a GraphModule like ``graph`` (cut after those ops), or a module of the
    original class: then the outputs of the submodules owning the weights those ops read,
    in call order (the order of the ops in a recorded graph).
    """
    if isinstance(model, fx.GraphModule):
        return tree_leaves(outputs_of(model, names)(*tree_leaves(inputs)))
    nodes = {n.name: n for n in graph.graph.nodes}
    owners = {a.target.rpartition(".")[0] for k in names for a in nodes[k].all_input_nodes if a.op == "get_attr"}
    captured: list[Any] = []
    handles = [model.get_submodule(m).register_forward_hook(lambda _m, _a, out: captured.append(out))
               for m in owners]
    try:
        model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def compare(name: str, model: nn.Module, inputs: tuple[Any, ...], analysis: depgraph.Analysis,
            row: Row) -> None:
    plan = depgraph.Plan.from_keep(analysis, random_keep(analysis, 0))
    simulated, pruned = depgraph.simulate(model, plan), depgraph.prune(model, plan)
    kept = count_params(pruned) / count_params(model)
    row.pruned = f"yes ({kept:.0%})"
    row.class_kept = ("yes" if type(pruned) is type(model)
                      else "no (fx GraphModule)" if isinstance(pruned, fx.GraphModule) else f"no ({type(pruned)})")
    with torch.no_grad():
        if name in DETECTION:
            prefix = "rpn.head." if "rcnn" in name else "head."
            names = head_ops(analysis, prefix)
            row.compared = f"{len(names)} head outputs ({prefix}*) on the example input"
            ys = head_outputs(simulated, simulated, names, inputs)
            yp = head_outputs(pruned, simulated, names, inputs)
        else:
            row.compared = "model outputs on the example input"
            ys, yp = tree_leaves(simulated(*inputs)), tree_leaves(pruned(*inputs))
    pairs = [(s, p) for s, p in zip(ys, yp) if isinstance(s, torch.Tensor) and s.is_floating_point()]
    if len(ys) != len(yp) or any(s.shape != p.shape for s, p in pairs):
        row.equivalent = "no: output shapes differ"
        return
    err = max((s - p).abs().max().item() for s, p in pairs)
    scale = max(max(s.abs().max().item() for s, _ in pairs), FLOOR)
    row.equivalent = f"{'yes' if err <= RTOL * scale else 'no'} ({err / scale:.1e} / {scale:.2g})"


def cover(name: str, equivalence: bool) -> Row:
    """depgraph's columns for ``name``: analyze, then (optionally) prune vs simulate; never raises."""
    row = Row(name)
    start = time.perf_counter()
    try:
        model, inputs = build(name)
        analysis = depgraph.analyze(model, inputs)
        row.tracer, row.analyzed, row.groups = analysis.tracer, True, len(analysis.groups)
        ops = sorted({u.op.removeprefix("torch._ops.").removesuffix(".default") for u in analysis.unsupported})
        row.unsupported = f"{len(analysis.unsupported)}" + (f": {', '.join(ops)}" if ops else "")
        if equivalence:
            compare(name, model, inputs, analysis, row)
    except Exception as exc:  # noqa: BLE001 -- a failing model becomes its row
        row.error = first_line(exc)
    row.seconds = time.perf_counter() - start
    return row


def prediction_layers(name: str, model: nn.Module) -> list[nn.Module]:
    """The final prediction layers of ``model``, which TP must not prune (module docstring)."""
    named = dict(model.named_modules())
    if name in DETECTION:
        layers = [m for k, m in named.items() if k.rpartition(".")[2] in PREDICTORS
                  and isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d))]
        for head in ("classification_head", "regression_head"):
            for entry in getattr(getattr(named.get("head"), head, None), "module_list", ()):
                layers.append([m for m in entry.modules() if isinstance(m, nn.Conv2d)][-1])
        return layers
    if name in SEGMENTATION:
        return [m for k, m in named.items()
                if k.startswith("classifier") and isinstance(m, nn.Conv2d) and m.out_channels == NUM_CLASSES]
    if name in VIDEO:
        return [[m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv3d))][-1]]
    return [named[k] for k in ("update_block.flow_head.conv2", "update_block.mask_predictor.conv") if k in named]


def cap_memory(extra: int) -> None:
    """Let this process map at most ``extra`` more bytes: a larger allocation raises ``MemoryError``."""
    status = Path("/proc/self/status").read_text().splitlines()
    size = 1024 * int(next(line for line in status if line.startswith("VmSize:")).split()[1])
    resource.setrlimit(resource.RLIMIT_AS, (size + extra, resource.getrlimit(resource.RLIMIT_AS)[1]))


def within(seconds: int, fn: Callable[[], T]) -> T:
    """``fn()``, interrupted by ``TimeoutError`` after ``seconds`` (``SIGALRM``: main thread only)."""
    def expire(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"gave up after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_tp(name: str) -> TPCells:
    """Torch-Pruning's graph, groups and magnitude pruning of ``name`` (module docstring); never raises.

    Counting the groups gets ``TP_GROUPS_S`` seconds; its failure is recorded and the pruner
    still tried (it enumerates groups with the prediction layers ignored)."""
    cells, start, stage = TPCells(), time.perf_counter(), "build"
    try:
        model, inputs = build(name)
        before = count_params(model)
        stage = "graph"
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)
        cells.built = "yes"
        try:
            cells.groups = within(TP_GROUPS_S, lambda: len(list(graph.get_all_groups(root_module_types=TP_ROOTS))))
        except Exception as exc:  # noqa: BLE001 -- reported in the table, not raised
            cells.groups, cells.error = "error", f"groups: {first_line(exc)}; "
        cells.pruned, stage = "no", "step"
        pruner = tp.pruner.MagnitudePruner(model, inputs, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=TP_RATIO, ignored_layers=prediction_layers(name, model))
        pruner.step()
        stage = "forward"
        with torch.no_grad():
            model(*inputs)
        cells.pruned, cells.kept = "yes", f"{count_params(model) / before:.3f}"
    except Exception as exc:  # noqa: BLE001 -- reported in the table, not raised
        cells.built = "no" if cells.built == "-" else cells.built
        cells.error += f"{stage}: {first_line(exc)}"
    cells.error = cells.error.removesuffix("; ")
    cells.seconds = f"{time.perf_counter() - start:.1f}"
    return cells


def worker(conn: Connection, name: str, equivalence: bool, with_tp: bool) -> None:
    """Body of one model's process: depgraph's row, then (optionally) TP's cells in a second message."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    conn.send(cover(name, equivalence))
    if with_tp:
        cap_memory(TP_MEMORY)
        conn.send(run_tp(name))
    conn.close()


def isolated(name: str, equivalence: bool, with_tp: bool) -> Row:
    """:func:`worker` in a forked process; a crash or a timeout becomes the row's (or TP's) error."""
    return run_isolated(name, equivalence, with_tp, worker, Row, (TIMEOUT_S, TP_TIMEOUT_S))


def report(rows: list[Row], with_tp: bool) -> str:
    """The markdown page: environment, table, summary lines."""
    n = len(rows)
    done = sum(r.analyzed for r in rows)
    same = sum(r.equivalent.startswith("yes") for r in rows)
    kept = sum(r.class_kept == "yes" for r in rows)
    tracers = ", ".join(f"{t}: {sum(r.tracer == t for r in rows)}" for t in ("fx", "export", "record"))
    lines = [(f"{done}/{n} analyzed ({tracers}); {same}/{n} equivalent (max |prune - simulate| <= {RTOL:g} x "
              f"max |simulate| on what was compared; see the script's docstring); {kept}/{n} pruned models "
              "keep the model's class.")]
    if with_tp:
        tps = [r.tp or TPCells() for r in rows]
        lines.append(f"Torch-Pruning {tp_version()}: {sum(c.built == 'yes' for c in tps)}/{n} dependency graphs "
                     f"built, {sum(c.pruned == 'yes' for c in tps)}/{n} pruned by MagnitudePruner at "
                     f"{TP_RATIO:g} and ran forward (final prediction layers ignored; see the script's docstring).")
    return "\n\n".join([
        "# depgraph and Torch-Pruning coverage: torchvision segmentation, detection, video, optical flow",
        environment(),
        markdown_table(HEADER, [r.cells() for r in rows]),
        *lines,
        ("Segmentation, video and optical flow compare the model's outputs. Detection compares, on the "
         "example input, the outputs of the ops reading a weight of the detection head whose output "
         "channels no group prunes (the RPN head for the R-CNNs, `head.` for RetinaNet, FCOS and SSD): "
         "class logits and box regressions of every feature level, which depend on the backbone, the FPN "
         "(or SSD's extra layers) and the head; later ops depend on score thresholds and NMS, and a "
         "recorded graph is specialized to the boxes of the run it recorded."),
    ])


def main() -> None:
    """Parse arguments, run the sweep, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated subset")
    parser.add_argument("--no-equivalence", action="store_true", help="analysis columns only")
    parser.add_argument("--no-tp", action="store_true", help="without the Torch-Pruning columns")
    parser.add_argument("--out", type=Path, help="markdown file (default: results/tasks_coverage.md for a full run)")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = []
    for name in args.models.split(",") if args.models else MODELS:
        rows.append(isolated(name, not args.no_equivalence, not args.no_tp))
        print(" | ".join(str(c) for c in rows[-1].cells()), flush=True)
    text = report(rows, not args.no_tp)
    print(text)
    print(f"sweep took {time.perf_counter() - start:.0f} s")
    out = args.out or (None if args.models else RESULTS / "tasks_coverage.md")
    if out:
        write(out, text)


if __name__ == "__main__":
    main()
