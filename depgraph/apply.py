"""Applying a plan: ``prune`` (physically smaller) and ``simulate`` (masked, same shapes)."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any, Mapping

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from passes.adopt import adopt, warn_undescribed
from passes.blocks import delete_unused, drop_blocks, live_paths, remove_modules, whole_modules
from passes.errors import DepgraphError, PlanError
from passes.express import calls, choose, express
from passes.meta import TensorMeta
from passes.shrink import Sizes, shrink
from passes.simulate import remove_simulation, simulate_graph
from passes.trace import drop_cached_tensors
from passes.verify import batch_failure, class_mismatch

from .activations import ActivationStats, compensated_biases, set_biases
from .analyze import analyze
from .groups import Analysis, Block
from .plan import Plan

__all__ = ["prune", "simulate", "unsimulate"]


def prune(
    model: nn.Module, plan: Plan, inplace: bool = False, check: bool = True, compensate: ActivationStats | None = None
) -> nn.Module:
    """A physically smaller model that computes what ``simulate(model, plan)`` computes.

    Every member is sliced; module attributes (``in_channels``, ``groups``,
    ``num_features``, ...) are updated; shape literals in the graph are rewritten.
    Returns the model's own class when its forward runs the pruned sizes: where a
    rewritten literal comes from a module attribute the forward reads (``self.hidden_dim``,
    a norm's ``normalized_shape``, a split size), the attribute is set. It returns a
    ``torch.fx.GraphModule`` (traced in the model's current train/eval mode), with a
    warning naming the literal, where no attribute holds one (or, with ``check=False``,
    wherever a literal changed: keeping the class needs the check). For plans made with the ``"export"`` or ``"record"``
    tracer, attributes such as ``head_dim`` or ``num_key_value_heads`` and a Hugging Face
    ``config`` are updated too, and the model's own class is returned when its forward
    gives the rewritten graph's outputs on the example inputs (the graph otherwise; a
    warning says when the config cannot describe the pruned sizes). ``model`` is
    untouched unless ``inplace``. Tensors cached in dicts by the model's modules (timm's
    attention-bias caches) are dropped: they were computed from the unpruned weights.

    With ``check`` (the default) the result is verified before it is returned: where the
    model's own class computes something else than the rewritten graph on the example
    inputs (its forward reads a size from a weight, say), the graph is returned with a
    warning naming the module; where the result fails at another batch size at which the
    original runs (checked on meta tensors), a :class:`~depgraph.PlanError` names the
    module. ``check=False`` skips this (one forward pass on the example inputs) for very
    large models.

    Examples
    --------
    >>> import torch, depgraph
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> a = depgraph.analyze(net, torch.zeros(1, 4))
    >>> small = depgraph.prune(net, depgraph.Plan.from_keep(a, {0: [1, 3, 5]}))
    >>> small[0].weight.shape, small[2].in_features, net[0].weight.shape
    (torch.Size([3, 4]), 3, torch.Size([8, 4]))
    """
    target, analysis, removed, inputs = _prepare(model, plan, inplace)
    biases = compensated_biases(target, plan, analysis, compensate) if compensate is not None else {}
    drop_cached_tensors(target)  # computed from the old weights
    blocks = plan.blocks(analysis)
    paths = live_paths(analysis.graph) if blocks else {}  # read before the blocks are erased
    erased = drop_blocks(analysis.graph, blocks)
    before = calls(analysis.graph) if analysis.tracer == "fx" else {}  # what express compares with
    changed = shrink(analysis.graph, analysis.params, analysis.nodes, removed, root=target, literals=analysis.literals,
                     others=analysis.others)
    whole = _without_blocks(target, blocks, analysis.graph, paths, erased)
    if whole is None:
        result = analysis.graph
    elif analysis.tracer in ("export", "record"):
        # the graph calls no modules: set their attributes from its ops, keep the class if it runs alike
        gone = {p for b in blocks for p in b.params}  # a removed layer's sizes are not the config's to keep
        params = {p: axes for p, axes in analysis.params.items() if p not in gone}
        result = adopt(target, analysis.graph, params, analysis.nodes, Sizes(removed), inputs,
                       analysis.tracer == "record")
        if result is analysis.graph:
            warnings.warn(
                f"prune returns a torch.fx.GraphModule, not a {type(target).__name__}: with the pruned sizes set on "
                "its modules' and config's attributes, its own forward does not compute what the pruned graph "
                f"computes on the example inputs (the {analysis.tracer} graph calls no modules, so the literal "
                "that differs cannot be named)",
                stacklevel=2,
            )
    else:
        result = _expressed(target, analysis, before, inputs, check) if changed or whole else target
    result = _verified(result, analysis, model, inputs) if check else result
    if whole and result is target and analysis.tracer == "fx":  # layers left a list its config may still count
        warn_undescribed(result, stacklevel=3)
    skipped = set_biases(result, biases, analysis.tracer)
    if skipped:
        warnings.warn(f"bias compensation left out {', '.join(skipped)}: the pruned graph reads no bias for them",
                      stacklevel=2)
    return result


def _without_blocks(target: nn.Module, blocks: list[Block], graph: fx.GraphModule, paths: dict[str, list[str]],
                    erased: dict[str, fx.Node]) -> list[str] | None:
    """With ``blocks`` erased from ``graph`` (``erased``; ``paths``: each node's modules
    before), their modules deleted from the graph and, where each block lies in a module whose
    whole forward went with it, from ``target``: the modules taken out of ``target`` (see
    :func:`passes.blocks.remove_modules`). None, with a warning, where a removed block shares
    its module's forward with what stays, so the class would still run it: prune returns the graph."""
    if not blocks:
        return []
    delete_unused(graph, erased)
    whole = whole_modules(paths, erased)
    loose = [b for b in blocks if not set(paths[b.add]) & set(whole)]
    if loose:
        where = paths[loose[0].add][-1] if paths[loose[0].add] else "the model's own forward"
        more = f" (and {len(loose) - 1} more)" if len(loose) > 1 else ""
        warnings.warn(
            f"prune returns a torch.fx.GraphModule, not a {type(target).__name__}: removed block {loose[0]}{more} "
            f"is added to its stream in {where}, whose forward also computes what stays, so the class would still "
            "run the block. The graph runs without it; remove every block of that module to keep the class",
            stacklevel=3,
        )
        return None
    remove_modules(target, whole)
    return whole


def _expressed(target: nn.Module, analysis: Analysis, before: dict, inputs: Any, check: bool) -> nn.Module:
    """``target`` where module attributes can say what the rewritten literals say (set there);
    else the graph, with a warning naming the literal that forced it. Where several attributes
    of a module held one literal, each is tried alone (one forward of the model and the graph
    per try) until the class computes what the graph computes. Without ``check``, the graph."""
    if not check:
        return analysis.graph  # attributes are matched by value: only the check can say the class runs alike
    unexpressed, choices = express(target, analysis.graph, before)
    if not unexpressed:
        if choices:
            choose(choices, lambda: class_mismatch(target, analysis.graph, inputs) is None)
        return target
    more = f" (and {len(unexpressed) - 1} more)" if len(unexpressed) > 1 else ""
    warnings.warn(
        f"prune returns a torch.fx.GraphModule, not a {type(target).__name__}: pruning changes {unexpressed[0]}{more}, "
        "which no attribute of the module expresses, so the class's own forward cannot compute the pruned model. "
        "The graph does (at the example's input shape where the change depends on it)",
        stacklevel=3,
    )
    return analysis.graph


def _verified(result: nn.Module, analysis: Analysis, model: nn.Module, inputs: Any) -> nn.Module:
    """``result``, or the rewritten graph where the model's own class computes something else
    (with a warning naming the module); PlanError where it fails at another batch size."""
    if result is not analysis.graph and analysis.tracer == "fx":
        problem = class_mismatch(result, analysis.graph, inputs)
        if problem is not None:
            warnings.warn(
                f"the pruned {type(result).__name__} does not compute what the pruned graph computes ({problem}): "
                "its forward reads something pruning does not update, such as a size computed from a weight. "
                "prune returns the graph, which does",
                stacklevel=3,
            )
            result = analysis.graph
    problem = batch_failure(result, model, inputs) if analysis.tracer != "record" else None
    if problem is not None:
        raise PlanError(
            f"the pruned {type(result).__name__} fails where the original runs, {problem}. This is a depgraph defect: "
            "please report it (prune(..., check=False) returns the model unverified)"
        )
    return result


def simulate(model: nn.Module, plan: Plan, inplace: bool = False) -> fx.GraphModule:
    """A masked model with the original shapes that computes what ``prune`` computes.

    Parameters get mask parametrizations (``torch.nn.utils.parametrize``), every
    activation with a pruned axis is masked, and normalizations, means, variances and
    softmaxes over a pruned axis count only kept entries. Returns a GraphModule
    (traced in the model's current train/eval mode); with ``inplace`` the caller's
    modules carry the parametrizations. A ``state_dict`` of the result stores each
    masked parameter as ``...parametrizations.<name>.original`` (unmasked) plus the
    masks; call :func:`unsimulate` first to get plain parameter names back. Apply
    methods recorded in ``plan.settings`` by a config list are honoured: ``bypass``
    leaves a parameter unmasked, ``add`` on ``<module>._input_`` / ``._output_`` puts a
    large negative in removed positions (for a softmax that follows).

    Examples
    --------
    >>> import torch, depgraph
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    >>> a = depgraph.analyze(net, torch.zeros(1, 4))
    >>> plan = depgraph.Plan.from_keep(a, {0: [1, 3, 5]})
    >>> x = torch.randn(3, 4)
    >>> torch.allclose(depgraph.simulate(net, plan)(x), depgraph.prune(net, plan)(x), atol=1e-6)
    True
    """
    _, analysis, removed, _ = _prepare(model, plan, inplace)
    methods = {t: s["apply_method"] for t, s in plan.settings.items() if "apply_method" in s}
    drop_blocks(analysis.graph, plan.blocks(analysis))  # y = x + 0; the branch's parameters stay
    simulate_graph(analysis.graph, analysis.params, analysis.nodes, removed, methods)
    return analysis.graph


def unsimulate(model: fx.GraphModule) -> fx.GraphModule:
    """Remove what :func:`simulate` added: parameters return to their unmasked values."""
    remove_simulation(model)
    return model


def example_inputs(model: nn.Module, inputs: tuple[Any, ...], keywords: Mapping[str, Any]
                   ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword inputs rebuilt from an analysis' or a plan's record for ``model``
    (:func:`_example` of each, on the device of the model's first tensor)."""
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    return tuple(_example(x, device) for x in inputs), {k: _example(v, device) for k, v in keywords.items()}


def _in_dtype_of(model: nn.Module, inputs: Any) -> Any:
    """``inputs`` whose floating :class:`TensorMeta` take the dtype of ``model``'s first floating
    tensor: a plan made on a float32 model applies to its float64 or bfloat16 copy."""
    dtype = next((t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    if dtype is None:
        return inputs
    return tree_map(lambda x: dataclasses.replace(x, dtype=dtype)
                    if isinstance(x, TensorMeta) and x.dtype.is_floating_point else x, inputs)


def _example(x: Any, device: torch.device) -> Any:
    """An example input from a plan's record: zeros of a tensor's meta, on the model's device
    (a meta tensor for a model on ``meta``). Tensors the forward creates from the inputs'
    device (the index tensor of ``x[:, [0, 0]]``, which export keeps as a constant) must
    hold values, so a real model gets real inputs; export runs on fake tensors either way."""
    if not isinstance(x, TensorMeta):
        return x
    if device.type == "meta":
        return torch.empty(x.shape, dtype=x.dtype, device="meta")
    return torch.zeros(x.shape, dtype=x.dtype, device=device)


def _prepare(model: nn.Module, plan: Plan, inplace: bool) -> tuple[nn.Module, Analysis, dict, Any]:
    """The model to change (``model`` or a copy), its analysis with the plan's frontend, the
    units removed per atom, and the plan's recorded inputs in the model's dtype."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise TypeError(
            f"plan must be a depgraph.Plan, got {type(plan).__name__}: make one with depgraph.solve or Plan.from_keep"
        )
    recorded = _in_dtype_of(model, (plan.inputs, plan.keywords))
    args, keywords = example_inputs(model, *recorded)
    inputs: Any = keywords or args  # analyze takes keyword inputs as a dict
    target = model if inplace else copy.deepcopy(model)
    try:
        # the frontend the plan was made with; analyze changes nothing, so a failed check leaves model intact
        analysis = analyze(target, inputs, tracer=plan.tracer)
    except DepgraphError as exc:
        shapes = [list(x.shape) for x in (*plan.inputs, *plan.keywords.values()) if isinstance(x, TensorMeta)]
        raise PlanError(
            f"this plan was made for a model taking inputs of shape {shapes}, which this model cannot run: "
            f"{exc}. Make the plan from depgraph.analyze() of this model"
        ) from exc
    plan.check(analysis)
    removed = {analysis.groups[i].atom: plan.removed(i) for i in plan.keep if len(plan.removed(i))}
    return target, analysis, removed, recorded
