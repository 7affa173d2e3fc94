"""``depgraph.analyze``: trace -> shapes -> rules -> couple -> groups."""

from __future__ import annotations

import inspect
import time
from collections.abc import Collection
from typing import Any

import torch
from torch import fx, nn

from passes.errors import InputError, ShapeError, TraceError
from passes.meta import TensorMeta
from passes.rules import MODULE_TYPES, Context, relate
from passes.rules.aten import EXPORT_RULES
from passes.shapes import describe_traced, propagate_shapes
from passes.trace import preserved_attributes, static_dims, trace_export, trace_fx, trace_record

from .couple import couple
from .groups import Analysis

__all__ = ["TRACERS", "analyze", "infer_inputs"]

TRACERS = ("auto", "fx", "export", "record")
"""The frontends :func:`analyze` can trace with; ``auto`` tries fx, then export, then record."""

ATEN_TRACERS = frozenset({"export", "record"})
"""The frontends whose graphs hold ATen ops (related with ``EXPORT_RULES``) and call no modules."""


def analyze(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    exclude: Collection[str] = (),
    leaf_modules: Collection[str] = (),
    tracer: str = "auto",
) -> Analysis:
    """Find every group of parameter slices that must be pruned together.

    Parameters
    ----------
    model
        Any ``nn.Module``; it is not changed (parameters, buffers, mode, hooks).
        Its parameters may live on the ``meta`` device: weights are never read.
    example_inputs
        A tensor, a tuple of positional inputs, or a dict of keyword inputs (traced
        by torch.export). Only shapes and dtypes matter. When omitted, a standard
        input is inferred from the first Conv1d/2d/3d, Linear or Embedding layer.
    exclude
        Names of modules whose parameter axes must never be pruned.
    leaf_modules
        Names of modules to keep whole when tracing (their axes are pinned unless
        their class has a rule). Only the fx tracer keeps modules whole.
    tracer
        ``"fx"``: torch.fx symbolic tracing, rules at torch level. ``"export"``:
        ``torch.export.export(strict=False)`` on the example inputs, rules at ATen
        level; it runs Python control flow on shapes that fx cannot trace. ``"record"``:
        runs the model once on the real example inputs and records the ATen ops it
        executed, so control flow on tensor values (detection models' box decoding,
        score thresholds, NMS) is specialized to that run; it needs real (not ``meta``)
        parameters and inputs, and the graph, the plan and the pruned or simulated model
        hold for inputs that take the same path (compare them on the example inputs).
        ``"auto"`` (default): fx, then export, then record, each tried when the previous
        cannot trace the model (or run shapes through its graph); when all fail, the :class:`TraceError` gives every
        reason. The groups of one model are the same with any tracer that traces it;
        ``Analysis.tracer`` says which one was used.

    Returns
    -------
    Analysis
        ``groups`` (each with ``size`` units and ``members``), ``pinned`` atoms with
        reasons, ``unsupported`` ops, and ``tracer``, the frontend used.

    Notes
    -----
    :func:`depgraph.prune` and :func:`depgraph.simulate` analyze the model again with
    the tracer recorded in the plan (the one this analysis used).
    A graph from torch.export calls no modules, so ``prune`` updates no module
    attributes (``in_channels``, ...) for it: the sizes the computation depends on are
    literals of its ATen ops, rewritten in the GraphModule ``prune`` returns. fx and
    export work on a model whose parameters live on the ``meta`` device; record does
    not, and its analysis keeps the example inputs themselves (``Analysis.inputs``), so
    that ``prune`` and ``simulate`` can record the same run again.

    Examples
    --------
    >>> import torch, depgraph
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
    ...                           torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    >>> a = depgraph.analyze(net, torch.zeros(1, 3, 16, 16))
    >>> [(g.size, [(m.name, m.dim) for m in g.members]) for g in a.groups]  # doctest: +NORMALIZE_WHITESPACE
    [(8, [('0.weight', 0), ('0.bias', 0), ('1.weight', 0), ('1.bias', 0),
          ('1.running_mean', 0), ('1.running_var', 0), ('3.weight', 1)])]
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if tracer not in TRACERS:
        raise InputError(f"tracer must be one of {list(TRACERS)}, got {tracer!r}")
    args, kwargs = _split_inputs(model, example_inputs)
    _check_names(model, exclude, "exclude")
    notes: list[str] = []
    try:
        with preserved_attributes(model):
            gm, used, args, kwargs = _trace(model, args, kwargs, tracer, leaf_modules, example_inputs is None, notes)
    except (TraceError, ShapeError) as exc:
        if example_inputs is not None:
            raise
        shapes = [tuple(a.shape) for a in args]
        raise type(exc)(f"{exc}. The example input was inferred as zeros of shape {shapes}; "
                        "pass example_inputs= with the shape the model expects") from exc
    notes.extend(_static_note(gm, used))
    rules = EXPORT_RULES if used in ATEN_TRACERS else None
    cx = relate(gm, rules=rules)
    with preserved_attributes(model):
        other = _other_mode(model, gm, args, kwargs, used, leaf_modules, notes)
    others = () if other is None else (relate(other, cx.u, rules=rules, params=cx.params),)
    _exclude(cx, exclude)
    coupling = couple(cx, others)
    analysis = Analysis(
        coupling.groups, coupling.pinned, cx.unsupported, gm,
        seconds=time.perf_counter() - start,
        params=coupling.params, nodes=coupling.nodes, literals=coupling.literals, model=model,
        inputs=args if used == "record" else tuple(_describe_input(a) for a in args), tracer=used, notes=notes,
        keywords={k: _describe_input(v) for k, v in kwargs.items()} if used == "export" else {},
        others=coupling.others, lowered=coupling.lowered,
    )
    return analysis


def _trace(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], tracer: str,
    leaf_modules: Collection[str], inferred: bool, notes: list[str],
) -> tuple[fx.GraphModule, str, tuple[Any, ...], dict[str, Any]]:
    """The model's graph with VALUE on every node, the frontend that made it, and the
    inputs it was traced with (``notes`` gets what was changed for the trace)."""
    reasons: list[str] = []
    for name in ("fx", "export", "record") if tracer == "auto" else (tracer,):
        why_not = _unusable(name, kwargs, leaf_modules)
        if why_not is not None and tracer != "auto":
            raise InputError(why_not)
        if why_not is not None:
            reasons.append(why_not)
            continue
        traced_args, traced_kwargs = (args, kwargs) if name == "fx" else _without_cache(model, args, kwargs, notes)
        try:
            gm = _FRONTENDS[name](model, traced_args, traced_kwargs, leaf_modules, inferred)
            return gm, name, traced_args, traced_kwargs
        except (TraceError, ShapeError) as exc:  # fx can trace a graph its shapes cannot run (swin3d_t)
            if tracer != "auto":
                raise
            reasons.append(str(exc))
    raise TraceError(
        f"no tracer could turn {type(model).__name__} into a graph:\n- "
        + "\n- ".join(reasons or ["no frontend was tried"])
    )


def _static_note(gm: fx.GraphModule, used: str) -> list[str]:
    """What a graph from torch.export or the recording tracer fixed of the inputs' sizes (a
    graph prune returns runs at other sizes of the other dimensions only)."""
    if used == "record":
        return ["recorded graph: specialized to the example's input shapes (it refuses others)"]
    fixed = {name: dims for name, dims in static_dims(gm).items() if dims} if used == "export" else {}
    if not fixed:
        return []
    return ["exported with these input dimensions static (a pruned graph accepts other sizes of the other "
            "dimensions only): " + ", ".join(f"{name} {list(dims)}" for name, dims in fixed.items())]


NO_CACHE = ("traced with use_cache=False: a key/value cache is an output of the forward, not an axis to prune; "
            "the pruned model builds its cache with the pruned sizes")


def _without_cache(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], notes: list[str]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The inputs as keywords with ``use_cache=False`` when ``forward`` takes ``use_cache`` and
    the caller did not set it (a Hugging Face decoder returns its cache otherwise)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return args, kwargs
    if "use_cache" not in signature.parameters or "use_cache" in kwargs:
        return args, kwargs
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return args, kwargs
    if NO_CACHE not in notes:
        notes.append(NO_CACHE)
    return (), {**bound, "use_cache": False}


def _other_mode(
    model: nn.Module, gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], used: str,
    leaf_modules: Collection[str], notes: list[str],
) -> fx.GraphModule | None:
    """The model traced in the other train/eval mode, when the graph leaves parameters
    unreached and that mode reaches some (an auxiliary classifier run only in training);
    None otherwise. The modules' own modes are restored afterwards."""
    if used == "record":
        return None
    reached = _reached(model, gm)
    missing = {name for name, t in model.named_parameters() if id(t) not in reached}  # tied weights count once
    if not missing:
        return None
    modes = [(m, m.training) for m in model.modules()]
    model.train(not model.training)
    try:
        other = _FRONTENDS[used](model, args, kwargs, leaf_modules, False)
    except (TraceError, ShapeError):
        return None
    finally:
        for m, training in modes:
            m.training = training
    if not _reached(model, other) & {id(model.get_parameter(name)) for name in missing}:
        return None
    mode = "train" if not model.training else "eval"
    notes.append(f"also traced in {mode} mode, which reaches parameters the {('eval', 'train')[model.training]} "
                 f"graph does not (of {sorted(missing)[0].rpartition('.')[0] or sorted(missing)[0]}): "
                 "pruning keeps them in step")
    return other


def _reached(model: nn.Module, gm: fx.GraphModule) -> set[int]:
    """The ids of the model's parameters a graph reads (directly, or through a module it calls;
    a tied weight under any of its names)."""
    found: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users:
            found.add(str(node.target))
        elif node.op == "call_module":
            found.update(f"{node.target}.{n}" for n, _ in gm.get_submodule(str(node.target)).named_parameters())
    return {id(t) for name, t in model.named_parameters(remove_duplicate=False) if name in found}


def _unusable(tracer: str, kwargs: dict[str, Any], leaf_modules: Collection[str]) -> str | None:
    """Why ``tracer`` cannot take these arguments, or None."""
    if tracer == "fx" and kwargs:
        return ("keyword example_inputs need tracer='export' (or 'auto'); for tracer='fx' pass the "
                "inputs as a tuple in the order of forward's parameters")
    if tracer in ATEN_TRACERS and leaf_modules:
        return "leaf_modules= keeps modules whole, which only tracer='fx' can do"
    return None


def _fx(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], leaf_modules: Collection[str],
    inferred: bool,
) -> fx.GraphModule:
    gm = trace_fx(model, MODULE_TYPES, leaf_modules)
    _shapes(gm, args)
    return gm


def _export(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], leaf_modules: Collection[str],
    inferred: bool,
) -> fx.GraphModule:
    gm = trace_export(model, args, kwargs)
    describe_traced(gm)
    return gm


def _record(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], leaf_modules: Collection[str],
    inferred: bool,
) -> fx.GraphModule:
    if inferred:
        raise TraceError("the recording tracer runs the model on real example inputs: pass example_inputs=")
    gm = trace_record(model, args, kwargs)
    describe_traced(gm)
    return gm


_FRONTENDS = {"fx": _fx, "export": _export, "record": _record}


def _describe_input(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return TensorMeta(tuple(a.shape), a.dtype)
    return a


def infer_inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """A standard input for ``model``, from its first Conv, Linear or Embedding layer.

    >>> infer_inputs(torch.nn.Sequential(torch.nn.Linear(5, 2)))[0].shape
    torch.Size([1, 5])
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            spatial = {nn.Conv1d: (1024,), nn.Conv2d: (224, 224), nn.Conv3d: (16, 112, 112)}[type(m)]
            return (torch.zeros(1, m.in_channels, *spatial, device="meta"),)
        if isinstance(m, nn.Linear):
            return (torch.zeros(1, m.in_features, device="meta"),)
        if isinstance(m, nn.Embedding):
            return (torch.zeros(1, 16, dtype=torch.long, device="meta"),)
    raise InputError(
        f"cannot infer an input for {type(model).__name__}: its first layer is not a Conv1d/2d/3d, "
        "Linear or Embedding. Pass example_inputs=, e.g. depgraph.analyze(model, torch.zeros(1, 3, 224, 224))."
    )


def _split_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword inputs: a dict is keywords, a tuple or list positional."""
    if example_inputs is None:
        return infer_inputs(model), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _shapes(gm: fx.GraphModule, args: tuple[Any, ...]) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(args) > len(placeholders):
        raise InputError(f"forward takes {len(placeholders)} inputs but {len(args)} example inputs were given")
    for node in placeholders[len(args) :]:
        if not node.args:
            raise InputError(f"example_inputs has no value for forward's parameter '{node.target}'")
    propagate_shapes(gm, args)


def _check_names(model: nn.Module, names: Collection[str], what: str) -> None:
    if isinstance(names, str):
        raise InputError(f"{what} must be a list of module names, not the string {names!r}")
    known = {n for n, _ in model.named_modules()}
    missing = sorted(set(names) - known)
    if missing:
        raise InputError(f"{what} names modules the model does not have: {missing}")


def _exclude(cx: Context, modules: Collection[str]) -> None:
    prefixes = tuple(f"{m}." for m in modules if m) or (("",) if "" in modules else ())
    if not modules:
        return
    for name, axes in cx.params.items():
        if "" in modules or name.startswith(prefixes):
            for expr in axes:
                cx.u.pin(expr, f"excluded by the caller ({name})")
