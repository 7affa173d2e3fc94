"""Per-layer sizes in a Hugging Face config: ``per_layer_config`` (transformers >= 5.14).

A config has one ``intermediate_size``, ``num_key_value_heads``, ... for the whole model; a plan
that prunes layers apart leaves layers of different sizes. transformers 5.14.0 added
``config.per_layer_config``: ``{layer: {attribute: value}}`` for the layers and attributes that
differ from the config's own value, written to ``config.json`` (keys as zero-padded strings).
It rebuilds a pruned model only where the model's class builds each layer from
``config.per_layer_config[layer]``: up to 5.24 a few classes do (Gemma 4 for its attention), Llama,
Qwen2 and Mistral do not (they read the global sizes), and ``LlamaConfig`` rejects a per-layer
``num_attention_heads`` (its validation reads the global one).

Two steps around the update of the configs in :func:`passes.adopt.update_attributes`, after the
modules have their pruned sizes:

- :func:`layer_sizes` (before): each layer's sizes after pruning, from its modules' attributes
  (``intermediate_size``) and its head-splitting views (those of the sizes the config gives that
  layer); a config that has per-layer sizes already is made uniform, for the update to read it;
- :func:`describe_layers` (after): writes ``per_layer_config`` where layers differ, and keeps it
  only when the model's class, built on the meta device from the config as ``save_pretrained``
  writes it, has every parameter shape of the pruned model. Otherwise the config keeps one size
  per model and :func:`per_layer_note` says why, for the warning of :func:`passes.adopt.adopt`.

Never imports transformers: a config supports per-layer sizes when its class has the property.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["PER_LAYER_SINCE", "LayerSizes", "describe_layers", "layer_sizes", "per_layer_note"]

PER_LAYER_SINCE = "5.14.0"
"""The first transformers release whose configs take ``per_layer_config``."""
LAYER_HEADS = {"num_attention_heads": "heads", "num_key_value_heads": "heads", "head_dim": "head_dim"}
"""Config attributes read per layer from that layer's head-splitting views, by the kind of size."""
LAYER_WIDTHS = ("intermediate_size",)
"""Config attributes read per layer from the attribute of that name on the layer's modules."""

Heads = Mapping[tuple[str, str], list[tuple[int, int]]]
"""(module, "heads" | "head_dim" | "width") -> (size before, size after) of each view in it."""


@dataclass(frozen=True)
class LayerSizes:
    """The pruned sizes of the layers a config describes: layer -> attribute -> size; ``layered``:
    the config had per-layer sizes before."""

    config: Any
    sizes: dict[int, dict[str, int]]
    layered: bool


def layer_sizes(root: nn.Module, heads: Heads) -> list[LayerSizes]:
    """Each layer's sizes after pruning, for every config in ``root`` that takes per-layer sizes
    and whose model holds its layers in a list of ``num_hidden_layers`` modules.

    Call it before the configs are updated: a layer's sizes before pruning are the config's (for
    that layer). A config with per-layer sizes is made uniform (each layer the config's global
    size), as the update reads one size per model; :func:`describe_layers` writes the layers back.
    """
    found = []
    for config, layers in _layered_configs(root):
        layered = bool(config.is_heterogeneous)  # 5.14's per_layer_config is None where it is not
        sizes = {i: _sizes(config.per_layer_config[i] if layered else config, prefix, layer, heads)
                 for i, (prefix, layer) in enumerate(layers)}
        found.append(LayerSizes(config, sizes, layered))
        config.per_layer_config = None
    return found


def describe_layers(root: nn.Module, found: list[LayerSizes]) -> None:
    """Write ``per_layer_config`` on each config whose layers differ, where the model's class
    rebuilds the pruned shapes from it (see the module docstring); leave the config uniform otherwise.

    Where layers differ or differed, a size every layer has is the config's own: the update of the
    whole config cannot tell it from sizes that were per layer. With ``per_layer_config``, such a
    size that the config derives (``head_dim`` from the hidden size and the heads, where it has
    none) is written too, as the heads it is derived from now differ."""
    for layers in found:
        config, table = layers.config, layers.sizes
        values = {attr: {s.get(attr) for s in table.values()} for attr in (*LAYER_HEADS, *LAYER_WIDTHS)}
        differ = sorted(attr for attr, seen in values.items() if len(seen) > 1)
        if not differ and not layers.layered:
            continue
        same = {attr: size for attr, seen in values.items() if len(seen) == 1 for size in seen if size is not None}
        for attr, size in same.items():
            if isinstance(getattr(config, attr, None), int):
                setattr(config, attr, size)
        per_layer = {i: {a: s[a] for a in differ if a in s} for i, s in table.items()}
        if differ and _rebuilds(root, config, same, per_layer):
            for attr, size in same.items():
                setattr(config, attr, size)
            config.per_layer_config = per_layer


def per_layer_note(model: nn.Module) -> str:
    """Why ``model``'s config cannot describe layers of different sizes, naming the transformers
    release that would (for a warning)."""
    version = getattr(sys.modules.get("transformers"), "__version__", "(unknown)")
    if not _takes_layers(getattr(model, "config", None)):
        return (f"per-layer sizes need a config with per_layer_config (transformers >= {PER_LAYER_SINCE}; "
                f"{version} is installed) and a model class that builds each layer from it")
    return (f"transformers {version} has per_layer_config, but {type(model).__name__} does not rebuild these "
            "sizes from it (its layers are built from the global sizes)")


def _takes_layers(config: Any) -> bool:
    return config is not None and hasattr(type(config), "per_layer_config") and hasattr(config, "to_json_string")


def _layered_configs(root: nn.Module) -> Iterator[tuple[Any, list[tuple[str, nn.Module]]]]:
    """(config, [(prefix, layer)]) for each distinct config that takes per-layer sizes, where a
    module holding it has a child list of ``num_hidden_layers`` modules (its layers)."""
    seen: set[int] = set()
    holders = [(name, module) for name, module in root.named_modules()
               if _takes_layers(getattr(module, "config", None))]
    for _, holder in holders:
        config = holder.config
        count = getattr(config, "num_hidden_layers", None)
        if id(config) in seen or not isinstance(count, int):
            continue
        seen.add(id(config))
        layers = next(((f"{name}.{child}" if name else child, modules) for name, module in holders
                       if module.config is config for child, modules in module.named_children()
                       if isinstance(modules, nn.ModuleList) and len(modules) == count), None)
        if layers is not None:
            prefix, modules = layers
            yield config, [(f"{prefix}.{i}.", layer) for i, layer in enumerate(modules)]


def _sizes(config: Any, prefix: str, layer: nn.Module, heads: Heads) -> dict[str, int]:
    """A layer's sizes after pruning: those of its views that had the size ``config`` gives the
    layer (``head_dim`` derived where the config has none), and its modules' widths; a size is
    left out where the layer says several or none."""
    before = {attr: getattr(config, attr, None) for attr in LAYER_HEADS}
    hidden, count = getattr(config, "hidden_size", None), before["num_attention_heads"]
    if before["head_dim"] is None and isinstance(hidden, int) and isinstance(count, int) and count:
        before["head_dim"] = hidden // count
    sizes = {}
    for attr, kind in LAYER_HEADS.items():
        after = {new for (owner, k), pairs in heads.items() if k == kind and f"{owner}.".startswith(prefix)
                 for old, new in pairs if old == before[attr]}
        if isinstance(before[attr], int) and len(after) == 1:
            sizes[attr] = after.pop()
    for attr in LAYER_WIDTHS:
        widths = {getattr(m, attr) for m in layer.modules() if isinstance(getattr(m, attr, None), int)}
        if isinstance(getattr(config, attr, None), int) and len(widths) == 1:
            sizes[attr] = widths.pop()
    return sizes


def _rebuilds(root: nn.Module, config: Any, same: dict[str, int], per_layer: dict[int, dict[str, int]]) -> bool:
    """Whether the outermost model holding ``config``, built on meta from a copy of the config with
    these sizes, as ``save_pretrained`` writes it and ``from_pretrained`` reads it, has the shapes
    of its parameters."""
    holders = (m for m in root.modules() if getattr(m, "config", None) is config and hasattr(m, "_from_config"))
    model: Any = next(holders, None)
    if model is None:
        return False
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            candidate = copy.deepcopy(config)
            for attr, size in same.items():
                setattr(candidate, attr, size)
            candidate.per_layer_config = per_layer
            if callable(getattr(candidate, "validate", None)):
                candidate.validate()  # as save_pretrained does first (transformers 5)
            saved = type(config).from_dict(json.loads(candidate.to_json_string()))
            fresh = model._from_config(saved)
    except Exception:  # noqa: BLE001 -- a config that does not take, load or build them does not describe the model
        return False
    own = model.state_dict()
    return all(own[k].shape == t.shape for k, t in fresh.state_dict().items() if k in own)
