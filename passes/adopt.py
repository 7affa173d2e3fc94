"""Adopt: after an export or recording prune, keep the model's own class where it can run.

Needs: the model whose parameters :func:`passes.shrink.shrink` has already sliced (the
``root`` it was given), the rewritten graph module, the resolved axes of parameters and
nodes, the removed units per atom, and the example inputs of the analysis.
Does, in place on the model: updates the attributes module forwards read, from the
graph's op that uses each module's parameters (``in_channels``, ``groups``,
``num_features``, ...); updates attention attributes (``head_dim``, ``num_heads``,
``num_key_value_heads``, ``all_head_size``, ``split_size``) from the views that split a
projection into heads, an ``intermediate_size`` from the module's own parameters, and a
Hugging Face ``config`` where every layer agrees (per layer where they differ and the model's class
reads ``per_layer_config``: :mod:`passes.hf_config`). Then runs the model's own forward and the
graph on the example inputs: the model is kept only when the two give the same outputs
(it then runs at any input shape, while the graph is specialized to the example's).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map

from .dims import Expr
from .hf_config import describe_layers, layer_sizes, per_layer_note
from .meta import TensorMeta, module_paths
from .shrink import MODULE_UPDATES, Sizes, replace_module

__all__ = ["adopt", "undescribed", "update_attributes", "warn_undescribed"]

HEAD_ATTRIBUTES = {
    **dict.fromkeys(("num_heads", "num_attention_heads", "n_head", "n_heads", "num_key_value_heads",
                     "num_kv_heads", "n_kv_heads"), "heads"),
    **dict.fromkeys(("head_dim", "attention_head_size", "head_size"), "head_dim"),
    **dict.fromkeys(("all_head_size", "split_size", "inner_dim"), "width"),
}
"""Module and config attributes that count heads, a head's width, or all heads' width."""
CONFIG_HEADS = ("num_attention_heads", "num_key_value_heads", "n_head", "head_dim")
"""Config attributes set from the head-splitting views of every layer, when they agree."""
WIDTH_ATTRIBUTES = ("intermediate_size",)
"""Module attributes set from the pruned size of the module's own parameters of that size."""
HIDDEN_ATTRIBUTES = ("hidden_size", "n_embd", "embed_dim", "d_model")
"""Module and config attributes set from the embedding width (the hidden stream)."""
RTOL = 1e-4
"""Allowed max |module - graph| relative to max |graph| for the model to be kept."""

NORMS = ("LayerNorm", "RMSNorm")
"""Class-name endings of norms over the hidden stream (Hugging Face's ``LlamaRMSNorm``, ...)."""

_VIEWS = ("view", "reshape", "_unsafe_view")


def adopt(
    root: nn.Module,
    gm: fx.GraphModule,
    params: dict[str, tuple[Expr, ...]],
    nodes: dict[str, Any],
    sizes: Sizes,
    inputs: tuple[tuple[Any, ...], dict[str, Any]],
    recorded: bool = False,
) -> nn.Module:
    """``root`` if, its attributes updated, it computes what ``gm`` computes on ``inputs``; else ``gm``.

    ``recorded``: ``gm`` comes from the recording tracer (see :func:`_same_outputs`).

    ``inputs`` are ``(args, kwargs)``; a :class:`TensorMeta` among them becomes a tensor
    (random normal for floating dtypes, ones otherwise) on the model's device. On the
    ``meta`` device only output shapes can be compared.
    """
    update_attributes(root, gm, params, nodes, sizes)
    if not _same_outputs(root, gm, inputs, recorded):
        return gm
    warn_undescribed(root, stacklevel=4)
    return root


def warn_undescribed(root: nn.Module, stacklevel: int = 2) -> None:
    """Warn for each Hugging Face-style model in ``root`` whose config builds other parameters
    than it has (:func:`undescribed`): saved with its config, it would not reload as it is."""
    for _, model, differ in undescribed(root):
        warnings.warn(
            f"the pruned {type(model).__name__} runs, but its config cannot describe its sizes, so rebuilding it "
            f"from the config fails ({len(differ)} parameters differ; {differ[0]}): the config has one size per "
            "model (heads and head_dim derived from the hidden size where it has no head_dim, the same sizes in "
            f"every layer, as many layers as it says; {per_layer_note(model)}). Save the pruned model whole "
            "(torch.save) or save the plan and prune a fresh model",
            stacklevel=stacklevel,
        )


def update_attributes(
    root: nn.Module, gm: fx.GraphModule, params: dict[str, tuple[Expr, ...]], nodes: dict[str, Any], sizes: Sizes
) -> None:
    """Set the pruned sizes on ``root``'s modules and configs (module docstring)."""
    _update_modules(root, gm, nodes, sizes)
    heads = _head_pairs(gm, nodes, sizes)
    hidden = _hidden_pairs(root, params, sizes)
    for name, module in root.named_modules():
        for attr, kind in HEAD_ATTRIBUTES.items():
            _assign(module, attr, heads.get((name, kind), []))
        _assign_repeats(module, heads.get((name, "heads"), []))
        for attr in WIDTH_ATTRIBUTES:
            if isinstance(getattr(module, attr, None), int):  # only then: all parameters are scanned
                prefix = f"{name}." if name else ""
                _assign(module, attr, [(e.size, sizes.size(e)) for p, axes in params.items()
                                       if p.startswith(prefix) for e in axes])
        for attr in HIDDEN_ATTRIBUTES:
            _assign(module, attr, hidden)
    everywhere: dict[str, list[tuple[int, int]]] = {}
    for (_, kind), pairs in heads.items():
        everywhere.setdefault(kind, []).extend(pairs)
    every = [(e.size, sizes.size(e)) for axes in params.values() for e in axes]
    layers = layer_sizes(root, heads)  # before the configs change: each layer's sizes before are the config's
    for config in _configs(root):
        _update_config(config, everywhere, hidden, every)
    describe_layers(root, layers)


def _hidden_pairs(root: nn.Module, params: dict[str, tuple[Expr, ...]], sizes: Sizes) -> list[tuple[int, int]]:
    """(size before, size after) of the hidden stream: the last axis of embeddings' and layer
    norms' weights (the widths of attention heads coincide with it too often to use those)."""
    pairs = []
    for name, module in root.named_modules():
        norm = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(NORMS)
        axes = params.get(f"{name}.weight" if name else "weight")
        if (norm or isinstance(module, nn.Embedding)) and axes:
            pairs.append((axes[-1].size, sizes.size(axes[-1])))
    return pairs


def _update_modules(root: nn.Module, gm: fx.GraphModule, nodes: dict[str, Any], sizes: Sizes) -> None:
    """Module classes with an entry in MODULE_UPDATES, from the op that first reads their parameters."""
    ops = _module_ops(root, gm)
    for name, module in root.named_modules():
        update, node = MODULE_UPDATES.get(type(module)), ops.get(name)
        source = node.args[0] if node is not None and node.args else None
        if update is not None and isinstance(source, fx.Node) and source.name in nodes:
            replacement = update(module, node, nodes, sizes)
            if replacement is not None:  # nn.MultiheadAttention -> PrunedMultiheadAttention
                replace_module(root, name, replacement)
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # Hugging Face's (in, out) linear
            module.nx, module.nf = module.weight.shape


def _update_config(config: Any, heads: dict[str, list], hidden: list[tuple[int, int]], every: list) -> None:
    """Heads and head_dim from every layer's views, the hidden size from embeddings and norms,
    and ``intermediate_size`` from every parameter axis of that size, when each agrees throughout."""
    for attr in CONFIG_HEADS:
        _assign(config, attr, heads.get(HEAD_ATTRIBUTES[attr], []))
    for attr in HIDDEN_ATTRIBUTES:
        _assign(config, attr, hidden)
    for attr in WIDTH_ATTRIBUTES:
        _assign(config, attr, every)
    widths = {new for _, new in heads.get("head_dim", [])}
    hidden_size, count = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if getattr(config, "head_dim", None) is None and len(widths) == 1 and isinstance(hidden_size, int) and count:
        # a config that derives head_dim as hidden_size // num_attention_heads (Mistral, Qwen2 in
        # transformers 4): say it when the pruned sizes no longer give it
        width = widths.pop()
        if hidden_size // count != width:
            config.head_dim = width


def _module_ops(root: nn.Module, gm: fx.GraphModule) -> dict[str, fx.Node]:
    """For each module of ``root`` holding parameters, by name: the first op of ``gm`` that
    reads one of them (its first parameter that is read)."""
    users: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users:
            users.setdefault(str(node.target), next(iter(node.users)))
    ops = {}
    for name, module in root.named_modules():
        prefix = f"{name}." if name else ""
        node = next((users[prefix + p] for p, _ in module.named_parameters(recurse=False) if prefix + p in users), None)
        if node is not None:
            ops[name] = node
    return ops


def _head_pairs(gm: fx.GraphModule, nodes: dict[str, Any], sizes: Sizes) -> dict[tuple[str, str], list]:
    """(module, "heads" | "head_dim" | "width") -> (size before, size after) of every view in
    that module that splits its input's last axis into (heads, head_dim)."""
    found: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", "").split(".")[0] not in _VIEWS:
            continue
        source, out = node.args[0], nodes.get(node.name)
        axes = nodes.get(source.name) if isinstance(source, fx.Node) else None
        if not (isinstance(out, tuple) and isinstance(axes, tuple) and len(out) == len(axes) + 1 >= 3):
            continue
        if [e.size for e in out[:-2]] != [e.size for e in axes[:-1]] or out[-2].size * out[-1].size != axes[-1].size:
            continue
        owner = (module_paths(node) or [""])[-1]
        for kind, expr in (("heads", out[-2]), ("head_dim", out[-1]), ("width", axes[-1])):
            found.setdefault((owner, kind), []).append((expr.size, sizes.size(expr)))
    return found


def _assign(holder: Any, attr: str, pairs: list[tuple[int, int]]) -> None:
    """Set ``holder.attr`` to the size after pruning of the axes that had its value before,
    when they all agree (several, or none, leave it alone)."""
    value = getattr(holder, attr, None)
    if not isinstance(value, int) or isinstance(value, bool):
        return
    after = {new for old, new in pairs if old == value}
    if len(after) == 1:
        setattr(holder, attr, after.pop())


def _assign_repeats(module: nn.Module, heads: list[tuple[int, int]]) -> None:
    """``num_key_value_groups`` (query heads per key/value head) from the module's query and
    key/value head counts before and after, when they say one thing."""
    repeats = getattr(module, "num_key_value_groups", None)
    if not isinstance(repeats, int) or isinstance(repeats, bool):
        return
    after = {q_new // kv_new for q, q_new in set(heads) for kv, kv_new in set(heads)
             if q == repeats * kv and kv_new and q_new % kv_new == 0}
    if len(after) == 1:
        setattr(module, "num_key_value_groups", after.pop())


def _configs(root: nn.Module) -> Iterator[Any]:
    """The distinct Hugging Face-style configs (objects with ``to_dict``) the modules hold."""
    seen: set[int] = set()
    for module in root.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict") and id(config) not in seen:
            seen.add(id(config))
            yield config


def undescribed(root: nn.Module) -> Iterator[tuple[str, nn.Module, list[str]]]:
    """(name, model, differences) for each outermost Hugging Face-style model (a module with a
    ``config`` and ``_from_config``) whose config builds parameters of other shapes, or builds
    parameters it lacks (a layer count the config does not follow), or lacks some it has (built
    on meta)."""
    outer: list[str] = []
    for name, model in root.named_modules():
        if not (hasattr(model, "_from_config") and hasattr(model, "config")):
            continue
        if any(name.startswith(f"{o}.") or not o for o in outer):
            continue
        outer.append(name)
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fresh = model._from_config(copy.deepcopy(model.config))
        except Exception:  # noqa: BLE001 -- a config that cannot build at all says nothing about sizes
            continue
        own, built = model.state_dict(), fresh.state_dict()
        differ = [f"{k} is {tuple(own[k].shape)}, the config builds {tuple(t.shape)}"
                  for k, t in built.items() if k in own and own[k].shape != t.shape]
        differ += [f"the config builds {k}, which it lacks" for k in built if k not in own]
        differ += [f"it has {k}, which the config does not build" for k in own if k not in built]
        if differ:
            yield name, model, differ


def _same_outputs(
    root: nn.Module, gm: fx.GraphModule, inputs: tuple[tuple[Any, ...], dict[str, Any]], recorded: bool
) -> bool:
    """Whether ``root`` computes what ``gm`` computes on ``inputs`` (same random seed; the
    buffers are restored afterwards, as a training-mode batch norm updates them).

    A ``recorded`` graph is specialized to the values of the run it recorded (the boxes a
    detector kept): once pruned weights choose others it may stop with an error. Then the
    model agrees when its own forward runs and every module the graph reached before it
    stopped gives the value of the graph's op that reads its weight."""
    device = next((t.device for t in (*root.parameters(), *root.buffers())), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    args, kwargs = tree_map(lambda x: _example(x, device, gen), inputs)
    state = {id(t): (t, t.detach().clone()) for t in (*root.buffers(), *gm.buffers())}
    try:
        graph, values, finished = _run_graph(gm, args, kwargs, recorded)
        own, outputs = _run_model(root, args, kwargs)
    except Exception:  # noqa: BLE001 -- a forward that cannot run with the new sizes means: keep the graph
        return False
    finally:
        with torch.no_grad():
            for tensor, saved in state.values():
                tensor.copy_(saved)
    if finished:
        return _close(tree_flatten(graph)[0], tree_flatten(own)[0])
    pairs = [(values[node.name], outputs[name]) for name, node in _module_ops(root, gm).items()
             if node.name in values and name in outputs]
    return bool(pairs) and all(_close(_first(a), _first(b)) for a, b in pairs)


def _run_graph(gm: fx.GraphModule, args: Any, kwargs: Any, recorded: bool) -> tuple[Any, dict[str, Any], bool]:
    """``gm``'s output, the value of every node it computed, and whether it finished (only a
    ``recorded`` graph may stop early; anything else raises)."""
    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            values[n.name] = super().run_node(n)
            return values[n.name]

    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if not recorded:
            return gm(*args, **kwargs), values, True
        try:
            return Recorder(gm).run(*tree_flatten((tuple(args), kwargs))[0]), values, True
        except Exception:  # noqa: BLE001 -- a recorded graph may not run again once pruned
            return None, values, False


def _run_model(root: nn.Module, args: Any, kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """``root``'s output and the first output of each module that holds parameters."""
    outputs: dict[str, Any] = {}

    def keep(name: str) -> Any:
        def hook(_module: nn.Module, _args: Any, out: Any) -> None:  # returning a value would replace the output
            outputs.setdefault(name, out)
        return hook

    hooks = [m.register_forward_hook(keep(name)) for name, m in root.named_modules()
             if next(m.parameters(recurse=False), None) is not None]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return root(*args, **kwargs), outputs
    finally:
        for hook in hooks:
            hook.remove()


def _first(value: Any) -> Any:
    """An op's or module's main output: the first of a tuple (batch norm's output, statistics)."""
    return value[0] if isinstance(value, (tuple, list)) and value else value


def _example(x: Any, device: torch.device, gen: torch.Generator) -> Any:
    if not isinstance(x, TensorMeta):
        return x
    if x.dtype.is_floating_point:
        return torch.randn(x.shape, generator=gen, dtype=x.dtype).to(device)
    return torch.ones(x.shape, dtype=x.dtype, device=device)


def _close(expected: Any, actual: Any) -> bool:
    want, want_spec = tree_flatten(expected)
    got, got_spec = tree_flatten(actual)
    if want_spec != got_spec:
        return False
    for a, b in zip(want, got):
        if not isinstance(a, torch.Tensor):
            if a != b:
                return False
        elif not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        elif not a.is_meta and a.numel():
            if a.is_floating_point():
                both = a.isnan() & b.isnan()  # a variance of one kept entry is nan in both
                scale = max(a.nan_to_num(0.0).abs().max().item(), math.ulp(1.0))
                if not torch.where(both, 0.0, (a - b).abs()).max().item() <= RTOL * scale:
                    return False
            elif not torch.equal(a, b):
                return False
    return True
