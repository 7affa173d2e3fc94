"""The shape oracle for groups (DESIGN.md, "Oracles for the tests").

For one group of an analysis, on small real CPU tensors (meta kernels do not
check everything, e.g. ``F.conv2d`` on meta accepts a bias of the wrong length):

- **complete**: slicing unit 0 out of every member leaves a model that runs and
  returns outputs of the original shapes;
- **minimal**: for each member, slicing every member except that one makes the
  forward fail.

Parameters are swapped with ``torch.func.functional_call`` on a deep copy, so the
caller's model is never touched. Module attributes that a forward reads are not
what this oracle tests (rewriting them is ``prune``'s job), with the exceptions
that follow from a shrunk parameter alone: a convolution's ``groups`` (from which
conv groups lost all their rows), a normalization's ``normalized_shape``,
``num_groups`` and ``num_features``. A group that reaches anything else sized by a
constant (a ``view`` with a literal size, a slice or split at fixed offsets, a
factory, a module such as ``MultiheadAttention``) cannot be checked without a
rewrite: :func:`check_group` raises :class:`Unverifiable` with the reason.
"""

from __future__ import annotations

import copy
import operator
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from depgraph import ActivationMember, Analysis, Group
from passes.meta import VALUE, TensorMeta

__all__ = ["Unverifiable", "check_group", "unverifiable_reason"]

Removed = dict[tuple[str, int], torch.Tensor]
"""For each (parameter or buffer name, dim): the flat indices sliced out along dim."""


class Unverifiable(Exception):
    """The group cannot be checked without rewriting something the oracle leaves alone."""


# -- the two checks -------------------------------------------------------------


def check_group(model: nn.Module, example_inputs: Any, analysis: Analysis, group: Group) -> None:
    """Check that ``group`` is complete and minimal by running shrunk copies of ``model``.

    Raises
    ------
    Unverifiable
        If the group reaches a constant size the oracle does not rewrite.
    AssertionError
        If the group is not complete or not minimal; the message says which.
    """
    reason = unverifiable_reason(analysis, group)
    if reason is not None:
        raise Unverifiable(reason)
    runner = _Runner(model, example_inputs)
    removed = {(m.name, m.dim): m.indices([0]) for m in group.members}
    error = runner.error(removed)
    assert error is None, (
        f"group {group.index} is not complete: removing unit 0 of every member fails: {error}"
    )
    if len(removed) < 2:
        return  # leaving the only member out removes nothing: minimality is vacuous
    for key in removed:
        error = runner.error({k: v for k, v in removed.items() if k != key})
        assert error is not None, (
            f"group {group.index} is not minimal: {key[0]} dim {key[1]} left out, the model still runs"
        )


class _Runner:
    """Runs a private eval-mode copy of a model with sliced parameters and rewritten
    conv ``groups`` / norm sizes, reporting the first error."""

    def __init__(self, model: nn.Module, example_inputs: Any) -> None:
        self.model = copy.deepcopy(model).eval()
        self.inputs = _real(example_inputs)
        self.state = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        self.attributes = {name: _read_attributes(m) for name, m in self.model.named_modules()}
        self.expected = _shapes(self._call({}))

    def error(self, removed: Removed) -> str | None:
        """The error of a forward with ``removed`` sliced out, or None if it runs with the
        original output shapes."""
        try:
            shapes = _shapes(self._call(removed))
        except Exception as exc:  # any kernel or shape error means "does not run"
            return f"{type(exc).__name__}: {exc}"
        return None if shapes == self.expected else f"output shapes {shapes} != {self.expected}"

    def _call(self, removed: Removed) -> Any:
        sliced = {name: _slice(self.state[name], removed, name) for name in {n for n, _ in removed}}
        for name, module in self.model.named_modules():
            for attr, value in self.attributes[name].items():
                setattr(module, attr, value)
            _rewrite_attributes(name, module, removed)
        with torch.no_grad():
            return torch.func.functional_call(self.model, sliced, self.inputs, strict=False)


def _real(example_inputs: Any) -> tuple[Any, ...]:
    """Positional inputs as real CPU tensors (meta ones become random floats or zeros)."""
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    gen = torch.Generator().manual_seed(0)

    def real(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or not t.is_meta:
            return t
        if t.is_floating_point():
            return torch.randn(t.shape, generator=gen, dtype=t.dtype)
        return torch.zeros(t.shape, dtype=t.dtype)

    return tuple(tree_map(real, a) for a in args)


def _shapes(value: Any) -> Any:
    return tree_map(lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else t, value)


def _slice(tensor: torch.Tensor, removed: Removed, name: str) -> torch.Tensor:
    out = tensor.detach()
    for (member, dim), idx in removed.items():
        if member == name:
            out = out.index_select(dim, _kept(out.shape[dim], idx))
    return out


def _kept(size: int, removed: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[removed] = False
    return keep.nonzero().flatten()


# -- attributes recomputed from shrunk parameters --------------------------------

_ATTRIBUTES: dict[type, tuple[str, ...]] = {
    nn.modules.conv._ConvNd: ("groups",),
    nn.LayerNorm: ("normalized_shape",),
    nn.RMSNorm: ("normalized_shape",),
    nn.GroupNorm: ("num_groups",),
    nn.modules.instancenorm._InstanceNorm: ("num_features",),
}


def _read_attributes(module: nn.Module) -> dict[str, Any]:
    return {
        attr: getattr(module, attr)
        for kind, attrs in _ATTRIBUTES.items() if isinstance(module, kind)
        for attr in attrs
    }


def _rewrite_attributes(name: str, module: nn.Module, removed: Removed) -> None:
    """Recompute the attributes a shrunk weight implies (from dim 0 of ``weight`` only)."""
    prefix = f"{name}." if name else ""
    idx = removed.get((f"{prefix}weight", 0))
    if idx is None or not idx.numel():
        return
    weight = module.weight
    if isinstance(module, nn.modules.conv._ConvNd):
        module.groups = _surviving_blocks(weight.shape[0], module.groups, idx)
    elif isinstance(module, nn.GroupNorm):
        module.num_groups = _surviving_blocks(weight.shape[0], module.num_groups, idx)
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        module.normalized_shape = (weight.shape[0] - idx.numel(), *weight.shape[1:])
    elif isinstance(module, nn.modules.instancenorm._InstanceNorm):
        module.num_features = weight.shape[0] - idx.numel()


def _surviving_blocks(size: int, blocks: int, removed: torch.Tensor) -> int:
    """How many of ``blocks`` equal consecutive blocks of ``size`` rows keep any row, when
    every surviving block keeps the same number; else ``blocks`` (the forward will fail)."""
    keep = torch.ones(size, dtype=torch.bool)
    keep[removed] = False
    per_block = keep.reshape(blocks, -1).sum(1)
    alive = per_block[per_block > 0]
    return int(alive.numel()) if bool((alive == alive[0]).all()) else blocks


# -- groups that reach a constant size ---------------------------------------------

_SAFE_MODULES = (
    nn.Linear, nn.Embedding, nn.modules.batchnorm._BatchNorm, nn.PReLU, nn.Softmax2d,
    nn.modules.conv._ConvNd, nn.modules.instancenorm._InstanceNorm,
)
"""Modules whose forward reads no size attribute a group may change (or one rewritten above)."""
_AFFINE_MODULES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)
_SIZED = {"view", "reshape", "expand", "new_zeros", "new_ones", "new_empty", "new_full",
          torch.reshape, torch.zeros, torch.ones, torch.empty, torch.full, torch.rand, torch.randn}
_SPLITS = {"split", torch.split, "chunk", torch.chunk, "tensor_split", torch.tensor_split}


Touched = dict[str, dict[int, ActivationMember]]
"""For each node name: its output dims the group reaches, with their activation members."""


def unverifiable_reason(analysis: Analysis, group: Group) -> str | None:
    """Why ``group`` cannot be checked without rewriting a constant size, or None."""
    touched: Touched = {}
    for a in group.activations:
        touched.setdefault(a.node, {})[a.dim] = a
    owners = {m.name.rpartition(".")[0] for m in group.members}
    for node in analysis.graph.graph.nodes:
        check = _CHECKS.get(node.op)
        reason = check(analysis.graph, node, touched, owners) if check else None
        if reason is not None:
            return f"node '{node.name}': {reason}"
    return None


def _dims(touched: Touched, node: Any) -> set[int]:
    return set(touched.get(node.name, ())) if isinstance(node, fx.Node) else set()


def _check_module(gm: fx.GraphModule, node: fx.Node, touched: Touched, owners: set[str]) -> str | None:
    module = gm.get_submodule(str(node.target))
    prefix = f"{node.target}."
    reached = any(o == node.target or o.startswith(prefix) for o in owners) or any(
        _dims(touched, a) for a in (node, *node.all_input_nodes)
    )
    if not reached or isinstance(module, _SAFE_MODULES):
        return None
    if isinstance(module, _AFFINE_MODULES) and getattr(module, "weight", None) is not None:
        return None
    return (
        f"{type(module).__name__} module '{node.target}' reads sizes from attributes "
        "the oracle does not rewrite"
    )


def _check_call(gm: fx.GraphModule, node: fx.Node, touched: Touched, owners: set[str]) -> str | None:
    out = _dims(touched, node)
    if node.target in _SIZED and out:
        literal = _literal_sizes(node)
        fixed = sorted(d for d in out if d < len(literal) and _is_literal(literal[d]))
        if fixed:
            return f"{node.target} has literal sizes {literal} at pruned dims {fixed}"
    if node.target in _SPLITS:
        return _check_split(node, touched)
    if node.target is operator.getitem:
        return _check_slice(node, touched)
    inputs_touched = any(_dims(touched, a) for a in node.all_input_nodes)
    if out and not inputs_touched:
        return f"{node.target} creates a pruned axis of a fixed size"
    return None


def _literal_sizes(node: fx.Node) -> list[Any]:
    """The output sizes a shape-taking call was given (ints, or nodes computed at run time)."""
    if node.target in ("new_full", torch.reshape):
        args = node.args[1:2]
    elif node.target is torch.full:
        args = node.args[:1]
    else:
        args = node.args[1:] if isinstance(node.target, str) else node.args
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = args[0]
    return list(args)


def _is_literal(size: Any) -> bool:
    return isinstance(size, int) and size != -1


def _check_split(node: fx.Node, touched: Touched) -> str | None:
    source = node.args[0]
    dim = _arg(node, 2, "dim", 0)
    dim = dim % len(_value(source).shape)
    member = touched.get(source.name, {}).get(dim)
    if member is None:
        return None
    sizes = [p.shape[dim] for p in _value(node)]
    by_count = node.target in ("chunk", torch.chunk) or len(node.all_input_nodes) > 1
    lost = member.indices([0])
    counts = [int(((lo <= lost) & (lost < lo + n)).sum()) for lo, n in _offsets(sizes)]
    if by_count and len(set(counts)) == 1:
        return None
    return f"{node.target} splits pruned dim {dim} into parts {sizes} that lose {counts} units"


def _check_slice(node: fx.Node, touched: Touched) -> str | None:
    source, index = node.args
    if not isinstance(source, fx.Node) or not isinstance(_value(source), TensorMeta):
        return None
    shape, dims = _value(source).shape, _dims(touched, source)
    items = index if isinstance(index, tuple) else (index,)
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    k = 0
    for item in items:
        if isinstance(item, slice) and k in dims and _fixed_part(item, shape[k]):
            return f"slice {item} at fixed offsets of pruned dim {k}"
        k += len(shape) - used if item is Ellipsis else 0 if item is None else 1
    return None


def _fixed_part(item: slice, size: int) -> bool:
    """Whether a slice with literal bounds keeps a proper part of an axis of ``size``."""
    if any(isinstance(b, fx.Node) for b in (item.start, item.stop, item.step)):
        return False
    return item.indices(size) != (0, size, 1)


def _offsets(sizes: list[int]) -> list[tuple[int, int]]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return list(zip(starts, sizes))


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _value(node: fx.Node) -> Any:
    return node.meta[VALUE]


_CHECKS: dict[str, Callable[[fx.GraphModule, fx.Node, Touched, set[str]], str | None]] = {
    "call_module": _check_module,
    "call_method": _check_call,
    "call_function": _check_call,
}
