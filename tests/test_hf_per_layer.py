"""Hugging Face checkpoints whose layers were pruned apart: ``per_layer_config`` (passes/hf_config).

The plan used throughout (tiny configs: hidden 32, 4 query heads on 2 key/value heads,
head_dim 8, MLP 48, two layers) keeps key/value head 1 of layer 0 (and so its 2 query
heads), 24 of layer 0's MLP units and 40 of layer 1's. No config of one size per model
describes the result; transformers >= 5.14 writes ``per_layer_config`` =
``{"0": {"intermediate_size": 24, "num_attention_heads": 2, "num_key_value_heads": 1},
"1": {"intermediate_size": 40}}``, which rebuilds the model where its class builds each
layer from ``config.per_layer_config[i]``.

Up to transformers 5.24 Llama, Qwen2 and Mistral build every layer from the global sizes
(and ``LlamaConfig`` rejects a per-layer ``num_attention_heads``): for them the pruned
model keeps its class and a uniform config, with a warning naming what is missing; their
round-trip tests skip until the installed release reads per-layer sizes. The round trip
itself is tested on :func:`_layerwise` classes: the same models whose layers are built from
``per_layer_config``, registered with the Auto classes as a checkpoint's own class would be.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import depgraph
from depgraph import Analysis, Plan
from passes.hf_config import PER_LAYER_SINCE

transformers = pytest.importorskip("transformers")

SMALL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
APART = {"0": {"intermediate_size": 24, "num_attention_heads": 2, "num_key_value_heads": 1},
         "1": {"intermediate_size": 40}}
"""``per_layer_config`` of a model pruned by :func:`_apart`, as ``config.json`` holds it."""
BASES = ("Llama", "Qwen2", "Mistral")
KEYWORDS = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "use_cache": False}
HAS_PER_LAYER = hasattr(transformers.PretrainedConfig, "per_layer_config")
needs_per_layer = pytest.mark.skipif(
    not HAS_PER_LAYER,
    reason=f"transformers {transformers.__version__} has no per_layer_config (added in {PER_LAYER_SINCE})")


def _reads_per_layer(base: str) -> str | None:
    """None where the installed ``{base}ForCausalLM`` builds layer 0 with the sizes of
    :data:`APART` from a config that has them per layer; else why not (a skip reason)."""
    if not HAS_PER_LAYER:
        return f"transformers {transformers.__version__} has no per_layer_config (added in {PER_LAYER_SINCE})"
    try:
        config = getattr(transformers, f"{base}Config")(**SMALL, per_layer_config={0: APART["0"]})
        config.validate()
        with torch.device("meta"):
            layer = getattr(transformers, f"{base}ForCausalLM")(config).model.layers[0]
        if layer.mlp.gate_proj.weight.shape[0] == 24 and layer.self_attn.k_proj.weight.shape[0] == 8:
            return None
        problem = "builds every layer from the global sizes"
    except Exception as exc:  # noqa: BLE001 -- the reason is the message
        first = str(exc).split(". ")[0]
        problem = f"cannot build from per-layer sizes ({type(exc).__name__}: {first})"
    return f"{base}ForCausalLM in transformers {transformers.__version__} {problem}"


@contextmanager
def _global_sizes(config: Any) -> Iterator[None]:
    """Let a constructor read the global sizes of a config with per-layer ones (transformers' own switch)."""
    config.allow_global_per_layer_attribute_access = True
    try:
        yield
    finally:
        vars(config).pop("allow_global_per_layer_attribute_access", None)


def _layer(config: Any, index: int) -> Any:
    """The config of one layer (transformers 5.14 has no per-layer view of a uniform config)."""
    return config.per_layer_config[index] if config.is_heterogeneous else config


@functools.cache
def _layerwise(base: str) -> tuple[type, type]:
    """(config class, causal LM class): ``{base}ForCausalLM`` whose decoder layers are built from
    ``config.per_layer_config[i]`` (everything else, and what the layers read when they run,
    from the global config), validated layer by layer, registered with AutoConfig and
    AutoModelForCausalLM under the model type ``layerwise_{base}``."""
    parent = getattr(transformers, f"{base}Config")
    stack, causal = getattr(transformers, f"{base}Model"), getattr(transformers, f"{base}ForCausalLM")

    def validate(self: Any) -> None:  # LlamaConfig's own validation reads the global head count
        for i in range(self.num_hidden_layers):
            parent.validate(_layer(self, i))

    config_class = type(f"Layerwise{base}Config", (parent,),
                        {"model_type": f"layerwise_{base.lower()}", "validate": validate})

    def build_stack(self: Any, config: Any) -> None:
        with _global_sizes(config):
            stack.__init__(self, config)
        layer = type(self.layers[0])
        self.layers = nn.ModuleList(layer(_layer(config, i), i) for i in range(config.num_hidden_layers))
        for module in self.layers.modules():
            if hasattr(module, "config"):
                module.config = config
        self.post_init()

    stack_class = type(f"Layerwise{base}Model", (stack,), {"config_class": config_class, "__init__": build_stack})

    def build_causal(self: Any, config: Any) -> None:
        with _global_sizes(config):
            causal.__init__(self, config)
        self.model = stack_class(config)
        self.post_init()

    causal_class = type(f"Layerwise{base}ForCausalLM", (causal,),
                        {"config_class": config_class, "__init__": build_causal})
    transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    transformers.AutoModel.register(config_class, stack_class, exist_ok=True)
    transformers.AutoModelForCausalLM.register(config_class, causal_class, exist_ok=True)
    return config_class, causal_class


def _build(base: str, layerwise: bool = False, layers: int = 2) -> nn.Module:
    config_class, causal_class = (_layerwise(base) if layerwise else
                                  (getattr(transformers, f"{base}Config"), getattr(transformers, f"{base}ForCausalLM")))
    torch.manual_seed(0)
    config = config_class(**{**SMALL, "num_hidden_layers": layers})
    return causal_class._from_config(config, attn_implementation="eager").eval()


def _group(a: Analysis, *members: tuple[str, int]) -> int:
    """The index of the group that has all these (parameter, dim) members."""
    return next(g.index for g in a.groups if set(members) <= {(m.name, m.dim) for m in g.members})


def _apart(model: nn.Module) -> Plan:
    """Key/value head 1 of layer 0 (query heads 2 and 3), 24 MLP units of layer 0, 40 of layer 1."""
    a = depgraph.analyze(model, KEYWORDS, tracer="export")
    attn, mlp = "model.layers.{}.self_attn", "model.layers.{}.mlp.gate_proj.weight"
    kv = _group(a, (f"{attn.format(0)}.k_proj.weight", 0), (f"{attn.format(0)}.o_proj.weight", 1))
    return Plan.from_keep(a, {kv: [1], _group(a, (mlp.format(0), 0)): list(range(0, 48, 2)),
                              _group(a, (mlp.format(1), 0)): list(range(40))})


def _assert_rebuilt(pruned: nn.Module, folder: Path) -> nn.Module:
    """Save ``pruned``, load it with AutoModelForCausalLM: the same parameter shapes and logits."""
    pruned.save_pretrained(folder)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    assert type(reloaded) is type(pruned)
    shapes = [{k: t.shape for k, t in m.state_dict().items()} for m in (reloaded, pruned)]
    assert shapes[0] == shapes[1]
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits)
    return reloaded


# -- the classes of transformers -------------------------------------------------------------


@pytest.mark.parametrize("base", BASES)
def test_a_class_reading_the_global_sizes_keeps_a_uniform_config_and_warns(base: str, tmp_path: Path) -> None:
    if _reads_per_layer(base) is None:
        pytest.skip(f"{base}ForCausalLM reads per_layer_config: see test_the_class_rebuilds_layers_pruned_apart")
    model = _build(base)
    with pytest.warns(UserWarning, match="its config cannot describe its sizes") as caught:
        pruned = depgraph.prune(model, _apart(model))
    assert type(pruned) is type(model)  # its forward reads the sizes of its own modules
    message, version = next(str(w.message) for w in caught if "describe" in str(w.message)), transformers.__version__
    if HAS_PER_LAYER:
        assert f"transformers {version} has per_layer_config, but {base}ForCausalLM does not" in message
        assert not pruned.config.is_heterogeneous and "per_layer_config" not in pruned.config.to_dict()
    else:
        assert f"per_layer_config (transformers >= {PER_LAYER_SINCE}; {version} is installed)" in message
    assert pruned.config.intermediate_size == 48 and pruned.config.num_key_value_heads == 2
    pruned.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="size mismatch|mismatched"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("base", BASES)
def test_the_class_rebuilds_layers_pruned_apart(base: str, tmp_path: Path) -> None:
    reason = _reads_per_layer(base)
    if reason is not None:
        pytest.skip(reason)
    model = _build(base)
    pruned = depgraph.prune(model, _apart(model))
    assert json.loads(pruned.config.to_json_string())["per_layer_config"] == APART
    _assert_rebuilt(pruned, tmp_path)


# -- classes that build each layer from per_layer_config -------------------------------------


@needs_per_layer
@pytest.mark.parametrize("base", BASES)
def test_layers_pruned_apart_are_written_per_layer_and_rebuilt_by_from_pretrained(base: str, tmp_path: Path) -> None:
    model = _build(base, layerwise=True)
    pruned = depgraph.prune(model, _apart(model))  # no warning: the config describes it
    assert type(pruned) is type(model)
    saved = json.loads(pruned.config.to_json_string())
    assert saved["per_layer_config"] == APART
    assert saved["intermediate_size"] == 48 and saved.get("head_dim", 8) == 8  # the global sizes stay
    assert _layer(pruned.config, 0).num_key_value_heads == 1
    assert pruned.model.layers[0].self_attn.k_proj.weight.shape == (8, 32)
    _assert_rebuilt(pruned, tmp_path)


@needs_per_layer
def test_removing_a_layer_renumbers_the_per_layer_sizes_of_the_layers_left(tmp_path: Path) -> None:
    """A model whose config has per-layer sizes (pruned apart once, reloaded) loses layer 0, then
    layers 0 and 1: the layers left keep their own sizes, and the class rebuilds the result from
    its config."""
    model = _build("Llama", layerwise=True, layers=3)
    reloaded = _assert_rebuilt(depgraph.prune(model, _apart(model)), tmp_path / "apart")
    assert json.loads(reloaded.config.to_json_string())["per_layer_config"] == APART
    b = depgraph.analyze(reloaded, KEYWORDS, tracer="export")
    for gone, left in (("0", [(40, 16), (48, 16)]), ("01", [(48, 16)])):
        blocks = [i for i, block in enumerate(b.blocks) if block.name[-1] in gone]
        shallow = depgraph.prune(reloaded, Plan.from_keep(b, {}, drop_blocks=blocks))
        assert type(shallow) is type(model) and shallow.config.num_hidden_layers == len(left)
        assert [(layer.mlp.gate_proj.out_features, layer.self_attn.k_proj.out_features)
                for layer in shallow.model.layers] == left
        _assert_rebuilt(shallow, tmp_path / f"without-{gone}")


@needs_per_layer
def test_a_per_layer_model_pruned_again_rewrites_or_drops_its_layers(tmp_path: Path) -> None:
    model = _build("Qwen2", layerwise=True)  # Qwen2's config has no head_dim: it is written
    reloaded = _assert_rebuilt(depgraph.prune(model, _apart(model)), tmp_path / "once")
    a = depgraph.analyze(reloaded, KEYWORDS, tracer="export")
    mlp, attn = "model.layers.{}.mlp.gate_proj.weight", "model.layers.1.self_attn"
    kv = _group(a, (f"{attn}.k_proj.weight", 0), (f"{attn}.o_proj.weight", 1))
    keep = {_group(a, (mlp.format(0), 0)): list(range(12)), _group(a, (mlp.format(1), 0)): list(range(0, 40, 2))}
    twice = depgraph.prune(reloaded, Plan.from_keep(a, {**keep, kv: [0]}))
    saved = json.loads(twice.config.to_json_string())
    assert saved["per_layer_config"] == {"0": {"intermediate_size": 12}, "1": {"intermediate_size": 20}}
    assert (saved["num_attention_heads"], saved["num_key_value_heads"], saved["head_dim"]) == (2, 1, 8)
    again = _assert_rebuilt(twice, tmp_path / "twice")
    a = depgraph.analyze(again, KEYWORDS, tracer="export")
    uniform = depgraph.prune(again, Plan.from_keep(a, {_group(a, (mlp.format(i), 0)): list(range(8)) for i in (0, 1)}))
    assert not uniform.config.is_heterogeneous and uniform.config.intermediate_size == 8
    _assert_rebuilt(uniform, tmp_path / "uniform")
