"""Coverage of ``depgraph`` over torchvision beyond classification: segmentation, detection,
video and optical flow.

Run::

    python benchmarks/tasks_coverage.py                          # all, writes results/tasks_coverage.md
    python benchmarks/tasks_coverage.py --models r3d_18,raft_small   # a subset, printed only

Each model is built on the CPU with ``weights=None`` (and ``weights_backbone=None``),
seeded, its batch norms given the statistics of a random batch of two (random-init batch
norms make activations fade), in eval mode, and analyzed with ``tracer="auto"`` (fx, then
export, then record) on a small real input: segmentation 1x3x64x64; detection one
3x128x128 image, resized inside to 128 (``min_size=max_size=128``; SSD300 and SSDlite320
resize to their fixed 300 and 320); video 1x3x8x64x64 (s3d and mvit_v2_s need
1x3x16x224x224); raft_small two 1x3x128x128 images and ``num_flow_updates=4``. A random plan keeps a random non-empty
subset of every group's units (seeded); ``depgraph.prune`` and ``depgraph.simulate`` are
applied and compared on the example input.

*What was compared*: segmentation, video and optical flow compare the model's outputs
(every tensor). Detection outputs in eval mode depend on the data (score thresholds, NMS),
and a recorded graph is specialized to the run it recorded (pruned weights change how many
boxes survive, so sizes burnt into later ops no longer fit): the check compares, on the
example input, the outputs of every op that reads a weight of the detection head (the RPN
head for the R-CNNs, ``head.`` for RetinaNet, FCOS and SSD) whose output channels no group
prunes: the class logits and box regressions of every feature level, which depend on the
backbone, the FPN (or SSD's extra layers) and the head. *equivalent*: max |prune -
simulate| <= 1e-4 x max |simulate| for every compared tensor.

Every model runs in its own forked process under a timeout, so one failure only loses its row.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
import warnings
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from _util import RESULTS, environment, first_line, markdown_table, write
from torch import fx, nn
from torch.utils._pytree import tree_leaves
from torchvision.models import detection, optical_flow, segmentation, video

import depgraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from equivalence import FLOOR, RTOL, calibrate, random_keep

HEADER = ["model", "tracer used", "analyzed", "groups", "unsupported (count: ops)", "pruned (params kept)",
          "equivalent (err / scale)", "what was compared", "seconds"]
TIMEOUT_S = 300
SEGMENTATION = ("fcn_resnet50", "deeplabv3_resnet50", "lraspp_mobilenet_v3_large")
DETECTION = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
             "retinanet_resnet50_fpn", "fcos_resnet50_fpn", "ssd300_vgg16", "ssdlite320_mobilenet_v3_large",
             "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn")
VIDEO = ("r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v2_s", "swin3d_t")
MODELS = (*SEGMENTATION, *DETECTION, *VIDEO, "raft_small")


@dataclass
class Row:
    name: str
    tracer: str = ""
    analyzed: bool = False
    groups: int | str = ""
    unsupported: str = ""
    pruned: str = ""
    equivalent: str = ""
    compared: str = ""
    seconds: float = 0.0
    error: str = ""

    def cells(self) -> list[object]:
        analyzed = "yes" if self.analyzed else f"no: {self.error}"
        equivalent = self.equivalent or (f"error: {self.error}" if self.analyzed and self.error else "")
        return [self.name, self.tracer, analyzed, self.groups, self.unsupported, self.pruned, equivalent,
                self.compared, f"{self.seconds:.1f}"]


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
        shape = (3, 16, 224, 224) if name in ("s3d", "mvit_v2_s") else (3, 8, 64, 64)
        return calibrate(model, torch.randn(2, *shape)), (torch.randn(1, *shape),)
    assert name == "raft_small", f"unknown model {name}"
    model = optical_flow.raft_small(weights=None)
    return model.eval(), (torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128), 4)  # 4 flow updates


def head_ops(analysis: depgraph.Analysis, prefix: str) -> list[str]:
    """Names of the ops reading a weight under ``prefix`` whose output channels no group prunes."""
    pruned = {(m.name, m.dim) for g in analysis.groups for m in g.members}
    heads = {name for name in analysis.params
             if name.startswith(prefix) and name.endswith("weight") and (name, 0) not in pruned}
    return [n.name for n in analysis.graph.graph.nodes
            if n.op == "call_function" and any(a.op == "get_attr" and a.target in heads for a in n.all_input_nodes)]


def outputs_of(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """``gm`` cut after the nodes ``names``, returning their values."""
    nodes = {n.name: n for n in gm.graph.nodes}
    graph, env = fx.Graph(), {}
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
        if all(nodes[k] in env for k in names):
            break
    graph.output(tuple(env[nodes[k]] for k in names))
    graph.eliminate_dead_code()
    return fx.GraphModule(gm, graph)


def compare(name: str, model: nn.Module, inputs: tuple[Any, ...], analysis: depgraph.Analysis,
            row: Row) -> None:
    plan = depgraph.Plan.from_keep(analysis, random_keep(analysis, 0))
    simulated, pruned = depgraph.simulate(model, plan), depgraph.prune(model, plan)
    kept = sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in model.parameters())
    row.pruned = f"yes ({kept:.0%})"
    with torch.no_grad():
        if name in DETECTION:
            prefix = "rpn.head." if "rcnn" in name else "head."
            names = head_ops(analysis, prefix)
            row.compared = f"{len(names)} head outputs ({prefix}*) on the example input"
            ys = tree_leaves(outputs_of(simulated, names)(*tree_leaves(inputs)))
            yp = tree_leaves(outputs_of(pruned, names)(*tree_leaves(inputs)))
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


def worker(conn: Connection, name: str, equivalence: bool) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    conn.send(cover(name, equivalence))
    conn.close()


def isolated(name: str, equivalence: bool) -> Row:
    """:func:`cover` in a forked process; a crash or a timeout becomes the row's error."""
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=worker, args=(sender, name, equivalence))
    proc.start()
    sender.close()
    try:
        row = receiver.recv() if receiver.poll(TIMEOUT_S) else Row(name, error=f"timed out after {TIMEOUT_S} s")
    except EOFError:
        row = Row(name, error=f"worker process died (exit code {proc.exitcode}; out of memory?)")
    proc.kill()
    proc.join()
    return row


def report(rows: list[Row]) -> str:
    n = len(rows)
    done = sum(r.analyzed for r in rows)
    same = sum(r.equivalent.startswith("yes") for r in rows)
    tracers = ", ".join(f"{t}: {sum(r.tracer == t for r in rows)}" for t in ("fx", "export", "record"))
    return "\n\n".join([
        "# depgraph coverage: torchvision segmentation, detection, video, optical flow",
        environment(),
        markdown_table(HEADER, [r.cells() for r in rows]),
        (f"{done}/{n} analyzed ({tracers}); {same}/{n} equivalent (max |prune - simulate| <= {RTOL:g} x "
         "max |simulate| on what was compared; see the script's docstring)."),
        ("Segmentation, video and optical flow compare the model's outputs. Detection compares, on the "
         "example input, the outputs of the ops reading a weight of the detection head whose output "
         "channels no group prunes (the RPN head for the R-CNNs, `head.` for RetinaNet, FCOS and SSD): "
         "class logits and box regressions of every feature level, which depend on the backbone, the FPN "
         "(or SSD's extra layers) and the head; later ops depend on score thresholds and NMS, and a "
         "recorded graph is specialized to the boxes of the run it recorded."),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated subset")
    parser.add_argument("--no-equivalence", action="store_true", help="analysis columns only")
    parser.add_argument("--out", type=Path, help="markdown file (default: results/tasks_coverage.md for a full run)")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(",") if args.models else MODELS:
        rows.append(isolated(name, not args.no_equivalence))
        print(" | ".join(str(c) for c in rows[-1].cells()), flush=True)
    text = report(rows)
    print(text)
    out = args.out or (None if args.models else RESULTS / "tasks_coverage.md")
    if out:
        write(out, text)


if __name__ == "__main__":
    main()
