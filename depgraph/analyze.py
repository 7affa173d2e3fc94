"""``depgraph.analyze``: trace -> shapes -> rules -> couple -> groups."""

from __future__ import annotations

import time
from typing import Any, Collection

import torch
from torch import fx, nn

from passes.errors import InputError, ShapeError
from passes.meta import TensorMeta
from passes.rules import MODULE_TYPES, Context, relate
from passes.shapes import propagate_shapes
from passes.trace import trace_fx

from .couple import couple
from .groups import Analysis

__all__ = ["analyze", "infer_inputs"]


def analyze(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    exclude: Collection[str] = (),
    leaf_modules: Collection[str] = (),
) -> Analysis:
    """Find every group of parameter slices that must be pruned together.

    Parameters
    ----------
    model
        Any ``nn.Module``; it is not changed (parameters, buffers, mode, hooks).
        Its parameters may live on the ``meta`` device: weights are never read.
    example_inputs
        A tensor, a tuple of positional inputs, or a dict of keyword inputs. Only
        shapes and dtypes matter. When omitted, a standard input is inferred from
        the first Conv1d/2d/3d, Linear or Embedding layer.
    exclude
        Names of modules whose parameter axes must never be pruned.
    leaf_modules
        Names of modules to keep whole when tracing (their axes are pinned unless
        their class has a rule).

    Returns
    -------
    Analysis
        ``groups`` (each with ``size`` units and ``members``), ``pinned`` atoms with
        reasons, and ``unsupported`` ops.

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
    args = _positional_inputs(model, example_inputs)
    _check_names(model, exclude, "exclude")
    gm = trace_fx(model, MODULE_TYPES, leaf_modules)
    _shapes(gm, args, inferred=example_inputs is None)
    cx = relate(gm)
    _exclude(cx, exclude)
    coupling = couple(cx)
    return Analysis(
        coupling.groups, coupling.pinned, cx.unsupported, gm,
        seconds=time.perf_counter() - start,
        params=coupling.params, nodes=coupling.nodes, model=model,
        inputs=tuple(_describe_input(a) for a in args),
    )


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


def _positional_inputs(model: nn.Module, example_inputs: Any) -> tuple[Any, ...]:
    if example_inputs is None:
        return infer_inputs(model)
    if isinstance(example_inputs, dict):
        raise InputError(
            "keyword example_inputs need a tracer that accepts them; pass the inputs as a tuple in "
            "the order of forward's parameters"
        )
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def _shapes(gm: fx.GraphModule, args: tuple[Any, ...], inferred: bool) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(args) > len(placeholders):
        raise InputError(f"forward takes {len(placeholders)} inputs but {len(args)} example inputs were given")
    for node in placeholders[len(args) :]:
        if not node.args:
            raise InputError(f"example_inputs has no value for forward's parameter '{node.target}'")
    try:
        propagate_shapes(gm, args)
    except ShapeError as exc:
        if inferred:
            shapes = [tuple(a.shape) for a in args]
            raise ShapeError(f"{exc}. The example input was inferred as zeros of shape {shapes}; "
                             "pass example_inputs= with the shape the model expects") from exc
        raise


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
