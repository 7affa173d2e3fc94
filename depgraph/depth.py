"""Depth pruning: how much each removable block matters, and plans that mix removing blocks
with narrowing groups under one cost target.

Block importance from calibration data (:func:`block_importance`), one score per block of
``analysis.blocks`` (higher: more important):

- ``"influence"`` (ShortGPT's Block Influence): ``1 - cos(x, x + f(x))``, the cosine
  similarity between the stream a block reads and the sum it writes, per sample (each
  sample's values flattened), averaged over every sample of the batches. One forward per
  batch of a copy of the analysis graph that records those two values.
- ``"loss"``: how much the loss grows when the block alone is removed: the mean loss over
  the batches of a copy of the analysis graph without the block (as ``simulate`` removes it),
  less that of the whole graph (one pass over the batches per block).

:func:`calibration_loss` makes the evaluator both ``"loss"`` and ``solve(..., depth=...)``
use: the mean loss of ``simulate(model, plan)`` over the batches.

``solve(a, target={"macs": f}, depth=scores, evaluate=...)`` (:func:`depth_plan`): blocks go in
order of ascending score (a block inside one already chosen is skipped); for a few numbers ``k``
of blocks, from none to the most whose removal alone stays above the target, the groups are
narrowed to the target with the first ``k`` blocks gone (their units then save nothing), and
the plan ``evaluate`` scores lowest is returned.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from passes.blocks import Block, drop_blocks
from passes.errors import InputError
from passes.meta import TensorMeta

from .apply import simulate
from .calibrate import _call, progress_bar, recalibrate_batch_norm
from .costs import CostModel
from .groups import Analysis
from .plan import Plan

__all__ = ["BLOCK_KINDS", "block_importance", "calibration_loss", "depth_plan"]

BLOCK_KINDS = ("influence", "loss")
STEPS = 6
"""How many numbers of removed blocks :func:`depth_plan` evaluates at most."""


def block_importance(
    model: nn.Module, analysis: Analysis, batches: Iterable[Any], *, kind: str = "influence",
    loss: Callable[[Any, Any], torch.Tensor] | None = None, inputs: Callable[[Any], Any] | None = None,
    progress: bool | None = None,
) -> dict[int, float]:
    """One score per block of ``analysis.blocks`` (its index), higher for the blocks that matter
    more: ``kind="influence"`` or ``"loss"`` (see the module doc; ``loss(output, batch)`` as in
    :func:`calibration_loss`). ``model`` is the model ``analysis`` was made from; it is not changed.

    Examples
    --------
    >>> import torch, depgraph
    >>> class Two(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.f, self.g = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         x = x + self.f(x)
    ...         return x + 0.001 * self.g(x)
    >>> net = Two()
    >>> a = depgraph.analyze(net, torch.zeros(1, 4))
    >>> scores = depgraph.block_importance(net, a, [torch.randn(16, 4)])
    >>> scores[0] > scores[1]  # g barely changes its stream
    True
    """
    if kind not in BLOCK_KINDS:
        raise InputError(f"kind must be one of {', '.join(BLOCK_KINDS)}, got {kind!r}")
    if not analysis.blocks:
        raise InputError("the analysis has no removable blocks (analysis.blocks is empty): nothing to score")
    if kind == "loss":
        batches = list(batches)
        base = _mean_loss(_copy(analysis), (analysis.tracer, analysis.keywords), batches, loss, inputs)
        found = {}
        for i in progress_bar(range(len(analysis.blocks)), "block loss", progress, unit="block"):
            runner = _copy(analysis)
            drop_blocks(runner, [analysis.blocks[i]])
            found[i] = _mean_loss(runner, (analysis.tracer, analysis.keywords), batches, loss, inputs) - base
        return found
    return _influence(analysis, batches, inputs, progress)


def calibration_loss(model: nn.Module, batches: Iterable[Any], *,
                     loss: Callable[[Any, Any], torch.Tensor] | None = None,
                     inputs: Callable[[Any], Any] | None = None, batch_norm: bool = False) -> Callable[[Plan], float]:
    """``evaluate(plan)``: the mean over ``batches`` of ``loss(simulate(model, plan)(batch), batch)``.

    ``loss(output, batch)`` returns a scalar tensor; without it, the output's own ``loss`` is
    used, or where it has none (the graph of a Hugging Face model, which ``simulate`` returns)
    and the batch holds ``labels``, the next-token cross-entropy of its ``logits``. ``inputs(batch)`` picks the model's
    inputs from
    a batch that holds more (labels). Runs under ``torch.no_grad`` in the model's mode.
    ``batch_norm``: first recompute the simulated model's batch-norm statistics on the batches
    (:func:`depgraph.recalibrate_batch_norm`), as a pruned model deployed after recalibration
    runs: without it, a network with batch norms is judged on its unpruned statistics, which
    favours plans that change them least (removing blocks, a CNN, lost to width-only pruning so).

    >>> import torch, depgraph
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> a = depgraph.analyze(net, torch.zeros(1, 4))
    >>> evaluate = depgraph.calibration_loss(net, [torch.randn(8, 4)], loss=lambda out, x: out.pow(2).mean())
    >>> evaluate(depgraph.Plan.from_keep(a, {})) >= 0
    True
    """
    batches = list(batches)
    if not batches:
        raise InputError("batches gave no batch: pass an iterable of inputs (tensors, tuples or dicts)")

    def evaluate(plan: Plan) -> float:
        masked = simulate(model, plan)
        if batch_norm:
            recalibrate_batch_norm(masked, batches, inplace=True, inputs=inputs)
        return _mean_loss(masked, (plan.tracer, plan.keywords), batches, loss, inputs)

    return evaluate


def depth_plan(analysis: Analysis, scores: Mapping[int, float], target: tuple[str, float],
               narrow: Callable[[tuple[str, float], Any], Plan], evaluate: Callable[[Plan], float]) -> Plan:
    """The plan ``evaluate`` scores lowest among those removing the ``k`` least important blocks
    and narrowing groups (``narrow(target, cost_model)``) to ``target``, for up to :data:`STEPS`
    values of ``k`` (module doc)."""
    metric, fraction = target
    model = CostModel(analysis)
    goal = fraction * getattr(model.of(), metric)
    order = _disjoint([analysis.blocks[i] for i in sorted(scores, key=lambda i: (scores[i], i))])
    most = 0
    while most < len(order) and getattr(model.without(order[:most + 1]).of(), metric) >= goal:
        most += 1
    counts = sorted({round(most * step / (STEPS - 1)) for step in range(STEPS)}) if most else [0]
    best: tuple[float, Plan, list[warnings.WarningMessage]] | None = None
    for k in counts:
        with warnings.catch_warnings(record=True) as said:  # only the returned plan's warnings are shown
            warnings.simplefilter("always")
            width = narrow(target, model.without(order[:k]))
        plan = Plan.from_keep(analysis, width.keep, drop_blocks=order[:k])
        value = evaluate(plan)
        if best is None or value < best[0]:
            best = (value, plan, said)
    assert best is not None
    for w in best[2]:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return best[1]


def _copy(analysis: Analysis) -> fx.GraphModule:
    """A GraphModule running a copy of the analysis graph (sharing its modules and weights)."""
    return fx.GraphModule(analysis.graph, copy.deepcopy(analysis.graph.graph))


def _mean_loss(runner: nn.Module, traced: tuple[str, Mapping[str, Any]], batches: list[Any],
               loss: Callable[[Any, Any], torch.Tensor] | None, inputs: Callable[[Any], Any] | None) -> float:
    """The mean loss of ``runner`` over ``batches``; ``traced``: its tracer and keyword inputs
    (:func:`_graph_inputs`)."""
    if not batches:
        raise InputError("batches gave no batch: pass an iterable of inputs (tensors, tuples or dicts)")
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            given = _graph_inputs(*traced, inputs(batch) if inputs else batch)
            total += float(_loss(_call(runner, given), batch, loss))
    return total / len(batches)


def _disjoint(blocks: list[Block]) -> list[Block]:
    """``blocks`` without those inside (or holding) one that comes earlier."""
    chosen: list[Block] = []
    for block in blocks:
        nodes = {*block.nodes, block.add}
        if not any(nodes & {*c.nodes, c.add} for c in chosen):
            chosen.append(block)
    return chosen


def _loss(output: Any, batch: Any, loss: Callable[[Any, Any], torch.Tensor] | None) -> torch.Tensor:
    if loss is not None:
        return loss(output, batch)
    value = getattr(output, "loss", None)
    if value is not None:
        return value
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is not None and isinstance(batch, Mapping) and "labels" in batch:  # a causal LM's next-token loss
        labels = batch["labels"][..., 1:].reshape(-1)
        return torch.nn.functional.cross_entropy(logits[..., :-1, :].reshape(labels.numel(), -1).float(), labels,
                                                 ignore_index=-100)
    raise InputError("the model's output has no loss: pass loss=lambda output, batch: ... (a scalar tensor), "
                     "or batches holding labels for a Hugging Face causal language model")


def _influence(analysis: Analysis, batches: Iterable[Any], inputs: Callable[[Any], Any] | None,
               progress: bool | None) -> dict[int, float]:
    """Block Influence of every block: ``1 - cos`` of its stream and its sum, mean over samples."""
    runner = _copy(analysis)
    graph = runner.graph
    by_name = {n.name: n for n in graph.nodes}
    totals = [[0.0, 0] for _ in analysis.blocks]
    seen: dict[int, torch.Tensor] = {}

    def stream(i: int, x: torch.Tensor) -> torch.Tensor:
        seen[i] = x.detach().clone()  # an in-place sum (x += f(x)) would overwrite it
        return x

    def total(i: int, y: torch.Tensor) -> torch.Tensor:
        x = seen.pop(i)
        cos = torch.nn.functional.cosine_similarity(x.flatten(1).double(), y.detach().flatten(1).double(), dim=1)
        totals[i][0] += float((1 - cos).sum())
        totals[i][1] += cos.numel()
        return y

    for i, block in enumerate(analysis.blocks):
        _tap(graph, by_name[block.stream], stream, i, after=by_name[block.stream])
        _tap(graph, by_name[block.add], total, i, after=by_name[block.add])
    runner.recompile()
    seen_batches = 0
    with torch.no_grad():
        for batch in progress_bar(batches, "block influence", progress):
            _call(runner, _graph_inputs(analysis.tracer, analysis.keywords, inputs(batch) if inputs else batch))
            seen_batches += 1
    if not seen_batches:
        raise InputError("batches gave no batch: pass an iterable of inputs (tensors, tuples or dicts)")
    return {i: s / max(n, 1) for i, (s, n) in enumerate(totals)}


def _graph_inputs(tracer: str, keywords: Mapping[str, Any], batch: Any) -> Any:
    """``batch`` for a graph traced with ``tracer``: a torch.export graph takes exactly the
    keywords it was exported with (``keywords``: tensors' metas and plain values such as
    ``use_cache=False``), so ``labels`` (for a loss) are left out and plain values filled in;
    other keywords it does not take are an error."""
    if not isinstance(batch, Mapping) or tracer != "export":
        return batch
    unknown = sorted(set(batch) - set(keywords) - {"labels"})
    if unknown:
        raise InputError(f"batches hold {unknown}, which the analysis' example inputs did not: analyze the model "
                         "with them too, or pass inputs= to pick the model's inputs")
    return {k: batch[k] if k in batch else v for k, v in keywords.items()
            if k in batch or not isinstance(v, TensorMeta)}


def _tap(graph: fx.Graph, node: fx.Node, record: Callable[[int, torch.Tensor], torch.Tensor], i: int,
         after: fx.Node) -> None:
    """Insert ``record(i, node)`` after ``after`` and make ``node``'s readers read it."""
    with graph.inserting_after(after):
        tapped = graph.call_function(record, (i, node))
    node.replace_all_uses_with(tapped, delete_user_cb=lambda user: user is not tapped)
