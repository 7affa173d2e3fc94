"""Calibration without loading the model: :func:`layerwise_activation_stats` and
:func:`layerwise_block_influence`.

The statistics of :func:`depgraph.activation_stats` (Wanda-sp's ``activation``, FLAP's
``fluctuation``) on a decoder LLM need each layer's inputs, which depend only on the layers
before it. So the model of a checkpoint directory is built on ``meta`` and run one stage at a
time, every calibration batch through a stage before the next:

1. the embedding (its weights alone read from the shards) embeds each batch, and the model's
   own forward computes what it passes each decoder layer (the causal or sliding-window masks,
   the rotary position embeddings), its layers replaced by recorders that run nothing;
2. each decoder layer is read from the shards into a real copy of itself, runs the carried
   hidden states with the statistics collected by hooks (:func:`depgraph.activations.recording`),
   keeps its outputs as the next layer's inputs, and is freed;
3. the final norm and ``lm_head`` run last.

:func:`layerwise_block_influence` runs the same stages and measures, in each decoder layer, the
stream before and after its attention and its MLP (the input of ``post_attention_layernorm``
is the stream after the attention), for ShortGPT's Block Influence without loading the model.

Memory: one stage's weights (a decoder layer, or the embedding, or the norm and ``lm_head``)
and the hidden states of every batch (``batches × batch size × length × hidden size``
values), on ``device``. Supported: the decoders in :data:`SUPPORTED` (``model.model.layers``,
``embed_tokens``, ``rotary_emb``, ``norm`` and ``lm_head``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from passes.errors import CheckpointError, InputError

from .activations import ActivationStats, ChannelStats, recording
from .calibrate import _call, progress_bar
from .groups import Analysis
from .ondisk import CheckpointTensors
from .stream import meta_model

__all__ = ["layerwise_activation_stats", "layerwise_block_influence", "SUPPORTED"]

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
"""The model classes :func:`layerwise_activation_stats` runs layer by layer."""

Call = tuple[tuple[Any, ...], dict[str, Any]]
"""The arguments a decoder layer is called with, its hidden states aside."""


class _Stop(Exception):
    """Raised by the last recorder: the rest of the model's forward is not needed."""


def layerwise_activation_stats(
    src_dir: str | Path, batches: Iterable[Any], *, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32, progress: bool | None = None, inputs: Callable[[Any], Any] | None = None,
) -> ActivationStats:
    """The :func:`depgraph.activation_stats` of the model of ``src_dir`` over ``batches``,
    with the weights of one decoder layer in memory at a time (see the module's description).

    Parameters
    ----------
    src_dir
        A Hugging Face directory with safetensors weights, of a class in :data:`SUPPORTED`.
    batches
        The model's inputs, as for ``activation_stats``: token ids, or dicts of keyword inputs
        (``input_ids``, ``attention_mask``); ``inputs(batch)`` picks them from a batch that
        holds more. Moved to ``device``.
    device
        Where the layers run and the hidden states stay (the statistics come back on the CPU).
    dtype
        The floating dtype the weights are cast to and the layers run in: float32, as
        ``from_pretrained`` loads them by default (with transformers 4); the checkpoint's own
        (``torch.bfloat16``) halves the memory of the hidden states.
    progress
        A progress bar over the layers on stderr (None: when stderr is a terminal).

    Returns
    -------
    ActivationStats
        The statistics of every ``nn.Linear`` of the model by weight name, equal (to float
        tolerance) to ``activation_stats(model, batches)`` of the model loaded in memory; give
        them to :func:`depgraph.ondisk.checkpoint_importance` to rank without loading it.

    Examples
    --------
    >>> import tempfile, torch, transformers
    >>> src = tempfile.mkdtemp()
    >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> transformers.LlamaForCausalLM(config).save_pretrained(src)
    >>> stats = layerwise_activation_stats(src, [torch.randint(0, 64, (2, 8))])
    >>> len(stats), stats["model.layers.1.mlp.down_proj.weight"].count
    (15, 16)
    """
    model: Any = meta_model(src_dir)  # a Hugging Face decoder: its submodules are read by name
    _check_supported(model, src_dir)
    tensors = CheckpointTensors(src_dir, model)
    device = torch.device(device)
    stage = partial(_materialized, tensors=tensors, device=device, dtype=dtype)
    stats = ActivationStats()
    with torch.no_grad():
        hidden, calls = _embedded(model, batches, stage, device, inputs)
        layers = model.model.layers
        for i in progress_bar(range(len(layers)), "layers", progress, unit="layer"):
            stats.update(_through_layer(stage({f"model.layers.{i}": layers[i]}), hidden, [c[i] for c in calls]))
        stats.update(_through_head(stage({"model.norm": model.model.norm, "lm_head": model.lm_head}), hidden))
    return ActivationStats({name: _on_cpu(s) for name, s in stats.items()})


def layerwise_block_influence(
    src_dir: str | Path, analysis: Analysis, batches: Iterable[Any], *, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32, progress: bool | None = None, inputs: Callable[[Any], Any] | None = None,
) -> dict[int, float]:
    """``depgraph.block_importance(model, analysis, batches)`` (Block Influence) of the model of
    ``src_dir``, with the weights of one decoder layer in memory at a time.

    ``analysis`` is the analysis of :func:`depgraph.stream.meta_model` of ``src_dir`` (the one the
    plan is made on); its blocks are each layer's attention and MLP. Scores are keyed by block
    index, as ``block_importance`` gives them, for ``solve(..., depth=scores)`` or
    ``Plan.from_keep(..., drop_blocks=...)``; :func:`depgraph.prune_checkpoint` removes whole
    layers (both of a layer's blocks). Other arguments as for :func:`layerwise_activation_stats`.

    Examples
    --------
    >>> import tempfile, torch, transformers, depgraph
    >>> src = tempfile.mkdtemp()
    >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> transformers.LlamaForCausalLM(config).save_pretrained(src)
    >>> meta = depgraph.stream.meta_model(src)
    >>> a = depgraph.analyze(meta, {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta")})
    >>> scores = layerwise_block_influence(src, a, [torch.randint(0, 64, (2, 8))])
    >>> sorted(scores) == list(range(len(a.blocks))) == [0, 1, 2, 3]
    True
    """
    model: Any = meta_model(src_dir)
    _check_supported(model, src_dir)
    parts = _layer_blocks(analysis, len(model.model.layers))
    tensors = CheckpointTensors(src_dir, model)
    device = torch.device(device)
    stage = partial(_materialized, tensors=tensors, device=device, dtype=dtype)
    totals = {i: (0.0, 0) for i in parts.values()}
    with torch.no_grad():
        hidden, calls = _embedded(model, batches, stage, device, inputs)
        layers = model.model.layers
        for i in progress_bar(range(len(layers)), "layers", progress, unit="layer"):
            found = _influence_in_layer(stage({f"model.layers.{i}": layers[i]}), hidden, [c[i] for c in calls])
            totals.update({parts[(i, part)]: sums for part, sums in found.items() if (i, part) in parts})
    return {i: total / max(count, 1) for i, (total, count) in sorted(totals.items())}


def _layer_blocks(analysis: Analysis, count: int) -> dict[tuple[int, str], int]:
    """(decoder layer, "attention" or "mlp") -> the index of that block in ``analysis.blocks``;
    InputError where a block is neither (the analysis is of another model)."""
    found = {}
    for index, block in enumerate(analysis.blocks):
        layer = block.name.removeprefix("model.layers.")
        kinds = {m.removeprefix(f"{block.name}.").split(".")[0] for m in block.modules}
        part = "attention" if "self_attn" in kinds else "mlp" if "mlp" in kinds else None
        if not (layer.isdigit() and int(layer) < count and part is not None):
            raise InputError(f"block {block} is not a decoder layer's attention or MLP: pass the analysis of "
                             "depgraph.stream.meta_model(src_dir), the model the plan is made on")
        found[(int(layer), part)] = index
    return found


def _influence_in_layer(stage: dict[str, nn.Module], hidden: list[torch.Tensor], calls: list[Call]
                        ) -> dict[str, tuple[float, int]]:
    """Σ (1 - cos) over the samples, and their count, of the attention and of the MLP of one
    decoder layer (the stream before and after each); ``hidden`` becomes its outputs."""
    (_, layer), = stage.items()
    middle: list[torch.Tensor] = []
    hook = layer.post_attention_layernorm.register_forward_pre_hook(lambda _, args: middle.append(args[0].clone()))
    totals = {"attention": (0.0, 0), "mlp": (0.0, 0)}
    try:
        for b, (args, kwargs) in enumerate(calls):
            middle.clear()
            out = layer(hidden[b], *args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            for part, (x, y) in (("attention", (hidden[b], middle[0])), ("mlp", (middle[0], out))):
                cos = torch.nn.functional.cosine_similarity(x.flatten(1).double(), y.flatten(1).double(), dim=1)
                total, count = totals[part]
                totals[part] = (total + float((1 - cos).sum()), count + cos.numel())
            hidden[b] = out
    finally:
        hook.remove()
    return totals


def _check_supported(model: nn.Module, src_dir: str | Path) -> None:
    name = type(model).__name__
    if name not in SUPPORTED:
        raise CheckpointError(f"{src_dir} holds a {name}; calibration layer by layer supports {', '.join(SUPPORTED)}: "
                              "load the model and use depgraph.activation_stats")


def _materialized(modules: Mapping[str, nn.Module], *, tensors: CheckpointTensors, device: torch.device,
                  dtype: torch.dtype) -> dict[str, nn.Module]:
    """One stage: a real copy of each meta module (by its name in the model), its parameters and
    buffers read from ``tensors``, floating ones cast to ``dtype``, on ``device``."""
    real = {}
    for prefix, module in modules.items():
        copied = copy.deepcopy(module)  # on meta: no memory
        state = {}
        for local, t in module.state_dict(keep_vars=True).items():
            loaded = tensors.load(tensors.first(f"{prefix}.{local}"))
            state[local] = loaded.to(device=device, dtype=dtype if loaded.is_floating_point() else loaded.dtype)
        copied.load_state_dict(state, assign=True)
        left = [n for n, b in copied.named_buffers() if b.is_meta]
        if left:
            raise CheckpointError(f"{prefix} has buffers the checkpoint does not hold ({', '.join(left)}): "
                                  "it cannot run layer by layer")
        real[prefix] = copied.eval()
    return real


def _embedded(model: Any, batches: Iterable[Any], stage: Callable[..., dict[str, nn.Module]],
              device: torch.device, inputs: Callable[[Any], Any] | None) -> tuple[list[torch.Tensor], list[list[Call]]]:
    """Each batch's embeddings, and what the model's forward passes each decoder layer with them:
    the forward runs with a real embedding and rotary embedding, its layers replaced by recorders."""
    base = model.model
    meta_embedding, meta_rotary = base.embed_tokens, base.rotary_emb
    base.embed_tokens = stage({"model.embed_tokens": meta_embedding})["model.embed_tokens"]
    base.rotary_emb = type(meta_rotary)(config=model.config).to(device)  # as from_pretrained computes it
    hidden: list[torch.Tensor] = []
    calls: list[list[Call]] = []
    try:
        with _recorders(base.layers) as seen:
            for batch in batches:
                seen.clear()
                try:
                    _call(model, _moved(inputs(batch) if inputs else batch, device))
                except _Stop:
                    pass
                hidden.append(seen[0][0])
                calls.append([call for _, call in seen])
    finally:
        base.embed_tokens, base.rotary_emb = meta_embedding, meta_rotary
    if not hidden:
        raise InputError("batches gave no batch: pass an iterable of inputs (token ids or dicts)")
    return hidden, calls


@contextmanager
def _recorders(layers: nn.ModuleList) -> Iterator[list[tuple[torch.Tensor, Call]]]:
    """Each layer's forward replaced, while inside, by one that records its hidden states and
    other arguments and returns the hidden states unchanged (the last one stops the forward)."""
    seen: list[tuple[torch.Tensor, Call]] = []

    def record(last: bool, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append((hidden_states, (args, {**kwargs, "past_key_values": None})))
        if last:
            raise _Stop
        return hidden_states

    for i, layer in enumerate(layers):
        layer.forward = partial(record, i == len(layers) - 1)
    try:
        yield seen
    finally:
        for layer in layers:
            del layer.forward


def _through_layer(stage: dict[str, nn.Module], hidden: list[torch.Tensor], calls: list[Call]) -> ActivationStats:
    """The statistics of one decoder layer; ``hidden`` becomes its outputs."""
    (prefix, layer), = stage.items()
    with recording(layer, prefix) as stats:
        for b, (args, kwargs) in enumerate(calls):
            out = layer(hidden[b], *args, **kwargs)
            hidden[b] = out[0] if isinstance(out, tuple) else out
    return stats


def _through_head(stage: dict[str, nn.Module], hidden: list[torch.Tensor]) -> ActivationStats:
    """The statistics of ``lm_head``, which reads the final norm of the last hidden states."""
    norm, head = stage["model.norm"], stage["lm_head"]
    with recording(head, "lm_head") as stats:
        for h in hidden:
            head(norm(h))
    return stats


def _moved(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _moved(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_moved(v, device) for v in batch)
    return batch


def _on_cpu(s: ChannelStats) -> ChannelStats:
    return ChannelStats(s.dim, s.count, s.mean.cpu(), s.var.cpu(), s.rms.cpu())
