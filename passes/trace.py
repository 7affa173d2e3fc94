"""Turn an ``nn.Module`` into a ``torch.fx.GraphModule``.

Three frontends with one contract: return a GraphModule whose parameters and buffers
keep their fully qualified names, or raise :class:`TraceError` with the reason.

- :func:`trace_fx` traces symbolically; its leaves are the modules that have a module
  rule, plus any the caller names. Torch-level graph: ``call_module`` for leaves.
- :func:`trace_export` runs ``torch.export.export(strict=False)`` on the example
  inputs, so Python control flow that depends on shapes (or on a list built from a
  ``chunk``) is simply run. ATen-level graph: no ``call_module`` nodes but export's
  input guards (``_guards_fn``); parameters and buffers are ``get_attr`` nodes (the
  ``parameters`` and ``buffers`` of the graph signature, unlifted); every node's value
  is in ``node.meta["val"]``.
- :func:`trace_record` runs the model once on the real example inputs and records the
  ATen ops it executed (``make_fx``, pre-dispatch): control flow on tensor values (box
  decoding, score thresholds, NMS) is specialized to that run. Same graph form as
  :func:`trace_export`, without input guards.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import itertools
import logging
import sys
from collections.abc import Collection, Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

from .errors import TraceError

SHAPE_LOGGER = "torch.fx.experimental.symbolic_shapes"
"""The torch logger that warns, as export fails, about sizes it could not trace to user code."""

__all__ = ["AtenGraph", "drop_cached_tensors", "first_names", "preserved_attributes", "static_dims", "trace_export",
           "trace_fx", "trace_record"]


MODE_ARGUMENTS = {"batch_norm": "training", "dropout": "train", "feature_dropout": "train",
                  "alpha_dropout": "train", "feature_alpha_dropout": "train",}
"""ATen ops whose behaviour in train and eval mode is an argument, and that argument's name."""


class AtenGraph(fx.GraphModule):
    """The graph of an ATen frontend (torch.export or the recording tracer) as a module
    that can switch between train and eval mode.

    ``ExportedProgram.module()`` refuses ``train()``; here ``train(mode)`` sets the mode
    arguments of batch norm and dropout ops (:data:`MODE_ARGUMENTS`) so the graph fine-tunes
    like the model: batch statistics and dropout in train mode (a batch norm without running
    statistics, as in weight standardization, uses the batch's in both). Branches of the model's
    Python code that read ``self.training`` were traced in the mode the model had.
    """

    def train(self, mode: bool = True) -> "AtenGraph":
        changed = False
        for node in self.graph.nodes:
            name = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
            argument = MODE_ARGUMENTS.get(name)
            if argument is None or (name == "batch_norm" and _schema_value(node, "running_mean") is None):
                continue  # a batch norm without running statistics (weight standardization) always uses the batch's
            changed |= _set_argument(node, argument, mode)
        if changed:
            self.recompile()
        nn.Module.train(self, mode)
        return self


def _schema_value(node: fx.Node, name: str) -> Any:
    """The ATen op's argument ``name`` (None when absent)."""
    for i, a in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if a.name == name:
            return node.args[i] if i < len(node.args) else node.kwargs.get(name)
    return None


def _set_argument(node: fx.Node, name: str, value: Any) -> bool:
    """Set the ATen op's argument ``name`` (found in its schema); whether it changed."""
    for i, a in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if a.name != name:
            continue
        if i < len(node.args):
            if node.args[i] == value:
                return False
            node.args = (*node.args[:i], value, *node.args[i + 1 :])
        else:
            if node.kwargs.get(name, a.default_value if a.has_default_value() else None) == value:
                return False
            node.kwargs = {**node.kwargs, name: value}
        return True
    return False


def _aten_graph(gm: fx.GraphModule, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> AtenGraph:
    """``gm``'s graph and attributes as an :class:`AtenGraph` in the model's mode, called as
    the model is (:class:`CallLikeModel`)."""
    result = AtenGraph(gm, gm.graph, type(model).__name__)
    nn.Module.train(result, model.training)
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return result
    fixed = {k: v for k, v in kwargs.items() if not _tensors(v)}  # use_cache=False and other plain values
    result.register_forward_pre_hook(CallLikeModel(signature, len(args), list(kwargs), fixed), with_kwargs=True)
    return result


class CallLikeModel:
    """A forward pre-hook that lets a graph traced with some inputs given by keyword (and
    some plain values, such as ``use_cache=False``, fixed) be called as the model's own
    ``forward``: positional or keyword, the fixed values filled in."""

    def __init__(self, signature: inspect.Signature, positional: int, keywords: list[str], fixed: dict[str, Any]):
        self.signature = signature
        self.positional = positional
        self.keywords = keywords
        self.fixed = fixed

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if len(args) == self.positional and list(kwargs) == self.keywords:
            return None
        try:
            given = self.signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            return None  # let the graph say what it expected
        names = list(self.signature.parameters)
        merged = {**self.fixed, **given}
        missing = [n for n in (*names[: self.positional], *self.keywords) if n not in merged]
        if missing:
            return None
        return tuple(merged[n] for n in names[: self.positional]), {k: merged[k] for k in self.keywords}


class _LeafTracer(fx.Tracer):
    """fx tracer that stops at modules with a rule and remembers where it is."""

    def __init__(self, leaf_types: Collection[type], leaf_names: Collection[str]) -> None:
        super().__init__(param_shapes_constant=True)
        self.leaf_types = tuple(leaf_types)
        self.leaf_names = frozenset(leaf_names)
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in self.leaf_types or module_qualified_name in self.leaf_names

    def call_module(self, m, forward, args, kwargs):  # type: ignore[no-untyped-def]
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module sees the error first
                self.failed_in = self.path_of_module(m)
            raise


def trace_fx(
    model: nn.Module, leaf_types: Collection[type], leaf_modules: Collection[str] = ()
) -> fx.GraphModule:
    """Symbolically trace ``model``, keeping modules of ``leaf_types`` and ``leaf_modules`` whole.

    Raises
    ------
    TraceError
        If torch.fx cannot trace the model; the message names the innermost module
        being traced and fx's reason.
    """
    known = {name for name, _ in model.named_modules()}
    missing = sorted(set(leaf_modules) - known)
    if missing:
        raise TraceError(f"leaf_modules names modules the model does not have: {missing}")
    tracer = _LeafTracer(leaf_types, leaf_modules)
    before = set(vars(model))
    try:
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        path = tracer.failed_in
        where = (
            f"module '{path}' ({type(model.get_submodule(path)).__name__})"
            if path
            else f"the top-level {type(model).__name__}.forward"
        )
        raise TraceError(
            f"torch.fx could not trace {where}: {type(exc).__name__}: {exc}. "
            "Name that module in leaf_modules= to keep it whole (its axes are then pinned), "
            "or make its forward free of data-dependent control flow."
        ) from exc
    finally:  # fx stores tensors a forward computes from real ones (buf[None, :]) on the model: take them back
        for added in set(vars(model)) - before:
            delattr(model, added)


def trace_export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> fx.GraphModule:
    """Trace ``model(*args, **kwargs)`` with ``torch.export.export(strict=False)``.

    Returns the unlifted ``ExportedProgram.module()``: parameters and buffers are
    ``get_attr`` nodes named by their fully qualified names and are the model's own
    tensors (nothing is copied, and nothing is written to them); tensor constants are
    buffers of the graph module, as in an fx graph; each ``get_attr`` is
    moved just before its first use, so that the rules meet parameters in the order the
    model uses them, as in an fx graph. The graph calls ``_guards_fn`` on the inputs
    (export's checks of the shapes it specialized to).

    The batch and sequence dimensions of the inputs are exported as ``Dim.AUTO`` (a batch of
    one as a batch of two, see :func:`_export`; :func:`_dynamic_dims` says which): export
    keeps a dimension dynamic unless the model's code fixes it, so the graph runs at other
    batch sizes and, where the model allows, other sequence lengths; node values describe
    the example as exported. :func:`static_dims` tells which dimensions stayed static. A
    model that cannot be exported so is exported with every size static.

    Export runs no real kernels (fake tensors), so a model on the ``meta`` device
    works; example inputs are moved to the device of the model's parameters (a meta
    input becomes zeros there).

    Raises
    ------
    TraceError
        If torch.export cannot trace the model (data-dependent control flow on tensor
        values, unsupported Python); the message gives export's reason.

    Examples
    --------
    >>> gm = trace_export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),))
    >>> [str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_function")]
    ['weight', 'bias', 'aten.linear.default']
    """
    device = _device(model)
    args, kwargs = _on_device((tuple(args), dict(kwargs or {})), device)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed), _quiet(SHAPE_LOGGER):
            exported = _export(model, args, kwargs, meta=device is not None and device.type == "meta")
    except Exception as exc:  # export raises many types; all mean "cannot trace"
        # export prints the graph it had traced so far (often megabytes) before raising: the
        # reason is in the TraceError, and "auto" goes on to the next frontend
        partial = getattr(exc, "partial_fx_graph", None)
        sys.stderr.write(printed.getvalue().replace(f"{partial}\n", "") if partial else printed.getvalue())
        raise TraceError(
            f"torch.export could not trace {type(model).__name__}: {type(exc).__name__}: {_headline(exc)}"
        ) from exc
    sys.stderr.write(printed.getvalue())
    gm = exported.module()
    if device is not None and device.type == "meta":
        _canonical_names(gm, model)
        for name, t in (*model.named_parameters(), *model.named_buffers()):
            _set_tensor(gm, name, t)  # the graph reads the model's own (meta) tensors again
    _constants_as_buffers(gm, exported.graph_signature.lifted_tensor_constants)
    _attributes_before_first_use(gm)
    return _aten_graph(gm, model, args, kwargs)


def trace_record(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> fx.GraphModule:
    """Record the ATen ops ``model(*args, **kwargs)`` executes on the real example inputs.

    The model runs once, under ``torch.no_grad``, through ``torch.func.functional_call``
    (``make_fx``, real tensors, pre-dispatch ATen ops as in torch.export), so every
    branch on a tensor's value is taken as that run takes it: the graph is specialized
    to these inputs (and to the model's weights, where control flow reads values it
    computes). Parameters are ``get_attr`` nodes named by their fully qualified names,
    reading the model's own tensors; the recorded run works on copies of the buffers, so
    a training-mode batch norm leaves the caller's statistics unchanged. Tensor constants
    made in ``forward`` are buffers of the graph module, and every node's value is in
    ``node.meta["val"]``. The graph module takes the model's arguments.

    Raises
    ------
    TraceError
        If the model or an example input lives on the ``meta`` device (nothing can run
        there), or if the model fails to run or to be recorded; the message gives why.

    Examples
    --------
    >>> gm = trace_record(torch.nn.Linear(4, 2), (torch.zeros(1, 4),))
    >>> [str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_function")]
    ['weight', 'bias', 'aten.linear.default']
    """
    kwargs = dict(kwargs or {})
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    if any(t.is_meta for t in (*state.values(), *_tensors((args, kwargs)))):
        raise TraceError(
            f"the recording tracer runs {type(model).__name__} on its example inputs, which cannot be done on "
            "the meta device: build the model and the example inputs on a real device, or use tracer='fx' "
            "or 'export'"
        )
    buffers = {name for name, _ in model.named_buffers()}
    run_state = {n: t.clone() if n in buffers else t for n, t in state.items()}

    def run(values: dict[str, torch.Tensor], call_args: tuple[Any, ...], call_kwargs: dict[str, Any]) -> Any:
        return torch.func.functional_call(model, values, call_args, call_kwargs)

    try:
        with torch.no_grad():
            # reading a value (bool(t), t.item()) is allowed: the branch taken is recorded
            record = make_fx(run, tracing_mode="real", pre_dispatch=True, _error_on_data_dependent_ops=False)
            recorded = record(run_state, tuple(args), kwargs)
    except Exception as exc:  # running or recording can raise anything; all mean "cannot record"
        raise TraceError(
            f"the recording tracer could not run {type(model).__name__}: {type(exc).__name__}: {_headline(exc)}"
        ) from exc
    return _named_state(recorded, model, list(state), (tuple(args), kwargs))


@contextlib.contextmanager
def preserved_attributes(model: nn.Module) -> Iterator[None]:
    """Undo, on exit, what tracing wrote into the modules' plain containers.

    A forward may fill a cache as it runs (timm's ``attention_bias_cache``, keyed by
    device): traced, it stores a proxy or a fake tensor there, which would break the next
    run of the caller's model. The dict, list and set attributes of every module are put
    back as they were."""
    saved = [
        (module, name, value, copy.copy(value))
        for module in model.modules()
        for name, value in vars(module).items()
        if not name.startswith("_") and isinstance(value, (dict, list, set))
    ]
    try:
        yield
    finally:
        for module, name, value, contents in saved:
            if isinstance(value, dict):
                value.clear()
                value.update(contents)
            elif isinstance(value, list):
                value[:] = contents
            else:
                value.clear()
                value.update(contents)
            object.__setattr__(module, name, value)


def drop_cached_tensors(model: nn.Module) -> list[str]:
    """Empty every dict attribute of a module that holds only tensors (a cache of tensors
    derived from the weights, such as timm's attention-bias caches): after pruning they
    describe the old sizes. Returns the ``module.attribute`` names emptied."""
    dropped = []
    for name, module in model.named_modules():
        for attr, value in list(vars(module).items()):
            if attr.startswith("_") or not isinstance(value, dict) or not value:
                continue
            if all(isinstance(v, torch.Tensor) for v in value.values()):
                value.clear()
                dropped.append(f"{name}.{attr}" if name else attr)
    return dropped


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _named_state(recorded: fx.GraphModule, model: nn.Module, names: list[str], inputs: Any) -> fx.GraphModule:
    """A graph module in which the recorded graph's first placeholders (the model's
    parameters and buffers, in the order of ``names``) are ``get_attr`` nodes of those
    names, taking the model's ``(args, kwargs)`` as the model does."""
    graph = recorded.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    owned: dict[str, Any] = {}
    for node, name in zip(placeholders, names):
        if node.users:
            with graph.inserting_before(node):  # create_node: get_attr would look the name up in recorded
                node.replace_all_uses_with(graph.create_node("get_attr", name))
            owned[name] = model.get_parameter(name) if _is_parameter(model, name) else model.get_buffer(name)
        graph.erase_node(node)
    for node in graph.nodes:
        if node.op == "get_attr" and str(node.target) not in owned:
            owned[str(node.target)] = getattr(recorded, str(node.target))  # a tensor constant
    spec = tree_flatten(inputs)[1]
    arg_names = [f"arg{i}" for i in range(len(inputs[0]))] + list(inputs[1])
    out_spec = recorded.graph._codegen.pytree_info.out_spec  # type: ignore[attr-defined]
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(arg_names, spec, out_spec))
    gm = fx.GraphModule(owned, graph, type(model).__name__)
    _attributes_before_first_use(gm)
    result = _aten_graph(gm, model, *inputs)
    result.register_forward_pre_hook(RecordedShapes(inputs), with_kwargs=True)
    return result


class RecordedShapes:
    """A forward pre-hook for a recorded graph: its sizes and branches are those of the run
    it recorded, so inputs of other shapes are refused with a clear error (never computed
    wrong)."""

    def __init__(self, inputs: Any) -> None:
        self.shapes = [tuple(t.shape) for t in _tensors(inputs)]

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        shapes = [tuple(t.shape) for t in _tensors((args, kwargs))]
        if shapes != self.shapes:
            raise TraceError(
                f"this graph was recorded on inputs of shapes {self.shapes} and runs only on those (got {shapes}): "
                "the recording tracer specializes sizes and branches to the run it recorded"
            )


def _is_parameter(model: nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    return attr in model.get_submodule(owner)._parameters


def _export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], meta: bool) -> Any:
    """``torch.export.export`` with every input dimension ``Dim.AUTO``; with every size
    static when that fails.

    Export fixes a dimension of size 1 (it cannot tell a broadcast from a batch of one), so
    inputs with a batch of one are exported with a batch of two: export then keeps the
    batch dynamic, and its guards reject a batch of one only where the model's code treats
    it differently."""
    run = _export_meta if meta else _export_real
    try:
        wide_args, wide_kwargs = tree_map(_batch_of_two, (args, kwargs))
        return run(model, wide_args, wide_kwargs, _dynamic_shapes(model, wide_args, wide_kwargs))
    except Exception:  # noqa: BLE001 -- a model whose sizes cannot be symbolic is exported as it is
        return run(model, args, kwargs, None)


def _batch_of_two(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == 1:
        return value.expand(2, *value.shape[1:]).contiguous()
    return value


def _export_real(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: Any) -> Any:
    return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)


def _dynamic_shapes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """``Dim.AUTO`` for the dimensions :func:`_dynamic_dims` picks of every tensor input, keyed
    by forward's parameter names as export binds them (None when forward's signature cannot
    bind the inputs)."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None

    return {name: tree_map(_dynamic_dims, value) for name, value in bound.arguments.items()}


def _dynamic_dims(value: Any) -> dict[int, Any] | None:
    """The dimensions of an input export is asked to keep dynamic: the batch; every dimension
    of an integer tensor (token ids, masks: batch and sequence); the sequence of a float
    ``(batch, sequence, features)`` input. Image sizes stay static: symbolic image sizes
    make export of same-padding CNNs minutes long (fx traces most CNNs, at any size)."""
    if not isinstance(value, torch.Tensor) or not value.dim():
        return None
    if not value.is_floating_point():
        return {d: Dim.AUTO for d in range(value.dim())}
    return {d: Dim.AUTO for d in ((0, 1) if value.dim() == 3 else (0,))}


def static_dims(gm: fx.GraphModule) -> dict[str, tuple[int, ...]]:
    """For each input placeholder of an exported graph, the dimensions export kept static.

    >>> gm = trace_export(torch.nn.Linear(3, 2), (torch.zeros(1, 5, 3),))
    >>> static_dims(gm)
    {'input': (2,)}
    """
    found = {}
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if node.op == "placeholder" and isinstance(value, torch.Tensor):
            found[str(node.target)] = tuple(d for d, n in enumerate(value.shape) if not _symbolic(n))
    return found


def _symbolic(n: Any) -> bool:
    """Whether a size is symbolic (export may hand over a size it fixed as a SymInt of a number)."""
    return isinstance(n, torch.SymInt) and bool(n.node.expr.free_symbols)


def _export_meta(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: Any) -> Any:
    """Export a model whose tensors live on ``meta`` as if they lived on the CPU.

    Some forwards cannot run on the meta device even symbolically (Hugging Face's rotary
    embedding opens ``torch.autocast(device_type="meta")``). Export only ever sees fake
    tensors, so the parameters, buffers and inputs are swapped for fake tensors that
    claim to be on the CPU and hold no memory; the model is restored afterwards.
    """
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.nn.utils.stateless import _reparametrize_module

    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(t: torch.Tensor) -> torch.Tensor:
        return FakeTensor(mode, torch.empty(t.shape, dtype=t.dtype, device="meta"), torch.device("cpu"))

    made: dict[int, torch.Tensor] = {}  # one fake per tensor: a tied weight stays one parameter under each name
    state: dict[str, torch.Tensor] = {
        name: made.setdefault(id(p), nn.Parameter(fake(p), requires_grad=p.requires_grad))
        for name, p in model.named_parameters(remove_duplicate=False)
    }
    state.update({name: made.setdefault(id(b), fake(b)) for name, b in model.named_buffers(remove_duplicate=False)})
    args, kwargs = tree_map(lambda t: fake(t) if isinstance(t, torch.Tensor) else t, (args, kwargs))
    with _reparametrize_module(model, state):
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)


def first_names(model: nn.Module) -> dict[str, str]:
    """Every parameter and buffer name of ``model``, tied aliases included, -> the first name of
    its tensor (the one ``named_parameters()`` gives).

    >>> net = torch.nn.Sequential(torch.nn.Embedding(4, 2), torch.nn.Linear(2, 4, bias=False))
    >>> net[1].weight = net[0].weight
    >>> first_names(net)
    {'0.weight': '0.weight', '1.weight': '0.weight'}
    """
    first: dict[int, str] = {}
    tensors = (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
    return {name: first.setdefault(id(t), name) for name, t in tensors}


def _canonical_names(gm: fx.GraphModule, model: nn.Module) -> None:
    """Read a tied tensor under its first name, as an export of real tensors does: exported on
    meta, an alias (``lm_head.weight`` for ``model.embed_tokens.weight``) may name it, and the
    analysis would take the two names for two tensors."""
    names = first_names(model)
    aliased = [n for n in gm.graph.nodes if n.op == "get_attr" and names.get(str(n.target), n.target) != n.target]
    for node in aliased:
        first = names[str(node.target)]
        owner, _, attr = first.rpartition(".")
        holder: nn.Module = gm
        for part in owner.split(".") if owner else ():
            if not hasattr(holder, part):
                holder.add_module(part, nn.Module())
            holder = getattr(holder, part)
        if not hasattr(holder, attr):
            alias_owner, _, alias_attr = str(node.target).rpartition(".")
            setattr(holder, attr, getattr(gm.get_submodule(alias_owner), alias_attr))
        node.target = first
    if aliased:
        gm.recompile()


def _set_tensor(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    try:
        holder = gm.get_submodule(owner)
    except AttributeError:
        return  # not used by the graph
    if attr in holder._parameters:
        holder._parameters[attr] = value  # type: ignore[assignment]
    elif attr in holder._buffers:
        holder._buffers[attr] = value


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """``logger`` logs errors only, for the duration (export warns about the sizes it could not
    relate to user code just before it fails; the failure is reported with its reason)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (None if it has neither)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return None if first is None else first.device


def _on_device(value: Any, device: torch.device | None) -> Any:
    """``value`` with every tensor on ``device``: meta tensors become zeros there, real
    ones become meta tensors for a meta model; others are left to export's own checks."""

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or device is None or t.device == device:
            return t
        if t.is_meta:
            return torch.zeros(t.shape, dtype=t.dtype, device=device)
        return t.to("meta") if device.type == "meta" else t

    return tree_map(move, value)


def _headline(exc: Exception, lines: int = 3) -> str:
    """The first non-empty lines of an error message (export's explanations run long)."""
    text = [line for line in str(exc).splitlines() if line.strip()]
    return " ".join(text[:lines]) + (" ..." if len(text) > lines else "")


def _constants_as_buffers(gm: fx.GraphModule, names: Collection[str]) -> None:
    """Register the tensor constants export lifted (plain tensor attributes, tensors made in
    ``forward``) as non-persistent buffers, as an fx GraphModule holds them: the rules then
    relate their axes as they relate a buffer's."""
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = gm.get_submodule(owner)
        value = getattr(module, attr)
        delattr(module, attr)
        module.register_buffer(attr, value, persistent=False)


def _attributes_before_first_use(gm: fx.GraphModule) -> None:
    """Move every used ``get_attr`` node just before the first node that reads it."""
    placed: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        for a in node.all_input_nodes:
            if a.op == "get_attr" and a not in placed:
                node.prepend(a)
                placed.add(a)
    gm.recompile()
