"""Importance read from a checkpoint directory, one tensor at a time: :func:`checkpoint_importance`.

``solve`` reads weights from ``analysis.model``; a model built on ``meta``
(:func:`depgraph.stream.meta_model`) has none. :class:`CheckpointTensors` maps each parameter
name of that model to its tensor in the directory's safetensors files, read from the file
into memory of its own when asked for (as :func:`depgraph.prune_checkpoint` reads) and not
kept; :func:`checkpoint_importance` is an importance callable for ``solve`` that scores a
group member by member from it. Memory: one tensor (and
its per-entry scores) at a time, whatever the group: the hidden stream of an LLM, whose
members are nearly all of its weights, is scored without loading them together.

The scores are those the same criterion gives on the model loaded in memory (the same
tensors, the same arithmetic): ``l1`` / ``l2`` as ``solve(..., importance="l2")``, and
``activation`` / ``fluctuation`` from :class:`~depgraph.ActivationStats` (collected layer by
layer with :func:`depgraph.layerwise.layerwise_activation_stats`) as
``solve(..., importance=activation_importance(model, stats))``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from passes.errors import CheckpointError, InputError

from .activations import ACTIVATION_KINDS, ActivationStats
from .groups import Group, Member
from .importance import AGGREGATES, _member_scores, describe
from .stream import _names, _read, _shard_files, _source_header, meta_model

__all__ = ["CheckpointTensors", "CheckpointImportance", "checkpoint_importance", "STREAMED_CRITERIA"]

STREAMED_CRITERIA = ("l1", "l2", *ACTIVATION_KINDS)
"""The criteria :func:`checkpoint_importance` computes from the checkpoint's tensors."""


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """The tensors of a safetensors checkpoint directory by the name of the parameter or buffer
    of ``model`` they hold (its first name, as ``named_parameters()`` gives it: a tied alias
    such as ``lm_head.weight`` maps to the tensor it shares), each read from its file when asked
    for (not memory-mapped: nothing stays resident): nothing is cached, so holding one tensor
    costs one tensor.

    ``model`` is the model the names come from (``meta_model(src_dir)`` when None).

    Examples
    --------
    >>> import tempfile, transformers
    >>> src = tempfile.mkdtemp()
    >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
    ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    >>> transformers.LlamaForCausalLM(config).save_pretrained(src)
    >>> tensors = CheckpointTensors(src)
    >>> len(tensors), tuple(tensors["model.layers.0.mlp.down_proj.weight"].shape)
    (12, (32, 48))
    """

    def __init__(self, src_dir: str | Path, model: nn.Module | None = None) -> None:
        self.src = Path(src_dir)
        names = _names(model if model is not None else meta_model(self.src))
        self._first = names
        self._headers = {file: _source_header(self.src / file) for file in _shard_files(self.src)}
        self._where: dict[str, tuple[str, str]] = {}
        for file, (_, entries) in self._headers.items():
            for key in entries:
                if key in names:
                    self._where.setdefault(names[key], (file, key))

    def __getitem__(self, name: str) -> torch.Tensor:
        file, key = self._where[name]
        start, entries = self._headers[file]
        with (self.src / file).open("rb", buffering=0) as f:
            return _read(f, start, entries[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __repr__(self) -> str:
        return f"CheckpointTensors({str(self.src)!r}, {len(self)} tensors)"

    def first(self, name: str) -> str:
        """The name under which this mapping holds the tensor of ``name`` (an alias, or a name
        without the model's ``base_model_prefix``)."""
        return self._first.get(name, name)

    def load(self, name: str) -> torch.Tensor:
        """The tensor of ``name``; CheckpointError naming it when the checkpoint lacks it."""
        if name not in self._where:
            raise CheckpointError(f"{self.src} holds no tensor for {name}: the checkpoint does not match its config")
        return self[name]


@dataclass(frozen=True)
class CheckpointImportance:
    """An importance callable for ``solve`` (see :func:`checkpoint_importance`): ``criterion``
    scores of each group, its members read one at a time from ``tensors``."""

    tensors: CheckpointTensors = field(repr=False)
    params: frozenset[str] = field(repr=False)
    criterion: str = "l2"
    aggregate: str = "mean"
    stats: ActivationStats | None = field(default=None, repr=False)

    def __call__(self, group: Group, _: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.stats is None:
            return self._magnitude(group)
        return self._activation(group, self.stats)

    def _magnitude(self, group: Group) -> torch.Tensor:
        """As ``importance.unit_scores`` with ``"l1"`` / ``"l2"``: a norm of each parameter member."""
        members = [m for m in group.members if m.name in self.params]
        if not members:
            raise InputError(f"{describe(group)} has no parameter member, only buffers, so a norm cannot rank it: "
                             "pass importance= as a callable (it receives the buffers)")
        power = 2 if self.criterion == "l2" else 1
        return AGGREGATES[self.aggregate](torch.stack([_member_scores(m, self.tensors.load(m.name), power)
                                                       for m in members]))

    def _activation(self, group: Group, stats: ActivationStats) -> torch.Tensor:
        """As ``activation_importance``'s element scores: the consumer members' unit sums."""
        found = [m for m in group.members if m.name in stats]
        if not found:
            raise InputError(f"the activation statistics hold no parameter of {describe(group)}: collect them on "
                             "the model of this checkpoint")
        readers = [m for m in found if stats[m.name].dim == m.dim]
        return AGGREGATES[self.aggregate](torch.stack([self._entry_sums(m, stats) for m in readers or found]))

    def _entry_sums(self, member: Member, stats: ActivationStats) -> torch.Tensor:
        w, s = self.tensors.load(member.name).float(), stats[member.name]
        scores = w.abs() * s.rms.cpu() if self.criterion == "activation" else w.square() * s.var.cpu()
        return member.unit_sums(scores)


def checkpoint_importance(src_dir: str | Path, criterion: str = "l2", *, aggregate: str = "mean",
                          stats: ActivationStats | None = None, model: nn.Module | None = None
                          ) -> CheckpointImportance:
    """An importance for ``solve`` on the model of ``src_dir`` built on ``meta``, reading the
    weights from the directory's safetensors files one tensor at a time.

    Parameters
    ----------
    src_dir
        A Hugging Face directory with safetensors weights (as :func:`depgraph.prune_checkpoint`).
    criterion
        ``"l1"`` or ``"l2"``: the norms of :mod:`depgraph.importance`; ``"activation"``
        (Wanda-sp) or ``"fluctuation"`` (FLAP) with ``stats``: the scores of
        :func:`depgraph.activation_importance`.
    aggregate
        How a group's member scores combine: give ``solve`` the same one (it combines a
        dependency group's groups with its own).
    stats
        The activation statistics of the criteria that need them, by weight name
        (:func:`depgraph.layerwise.layerwise_activation_stats`).
    model
        The model the analysis was made of (``meta_model(src_dir)`` when None).

    Returns
    -------
    CheckpointImportance
        ``solve(analysis, ..., importance=it, aggregate=aggregate)`` gives the plan
        ``solve`` gives with ``importance=criterion`` on the model loaded in memory.

    Examples
    --------
    >>> import tempfile, torch, transformers, depgraph
    >>> from depgraph.stream import meta_model
    >>> src = tempfile.mkdtemp()
    >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
    ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    >>> transformers.LlamaForCausalLM(config).save_pretrained(src)
    >>> meta = meta_model(src)
    >>> a = depgraph.analyze(meta, {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta")})
    >>> plan = depgraph.solve(a, {4: 0.5}, importance=checkpoint_importance(src, "l2", model=meta))
    >>> plan.keep[4].numel()
    24
    """
    if criterion not in STREAMED_CRITERIA:
        raise InputError(f"criterion must be one of {', '.join(STREAMED_CRITERIA)}, got {criterion!r}")
    if aggregate not in AGGREGATES:
        raise InputError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    if (criterion in ACTIVATION_KINDS) != (stats is not None):
        raise InputError(f"stats= goes with the criteria {' and '.join(ACTIVATION_KINDS)}, and they need it; "
                         f"got criterion={criterion!r} and {'no ' if stats is None else ''}stats")
    model = model if model is not None else meta_model(src_dir)
    tensors = CheckpointTensors(src_dir, model)
    return CheckpointImportance(tensors, frozenset(dict(model.named_parameters())), criterion, aggregate,
                                _checked(stats, tensors, model) if stats is not None else None)


def _checked(stats: ActivationStats, tensors: CheckpointTensors, model: nn.Module) -> ActivationStats:
    """``stats`` by the first name of each weight (a tied ``lm_head.weight`` is the embedding's);
    InputError where they do not fit the model's weights (as ``activation_importance``)."""
    names = _names(model)
    shapes = {name: t.shape for name, t in model.named_parameters()}
    checked = ActivationStats()
    for name, s in stats.items():
        first = names.get(name)
        if first not in shapes or torch.broadcast_shapes(s.mean.shape, shapes[first]) != shapes[first]:
            found = "has no such weight" if first not in shapes else f"has a weight of shape {tuple(shapes[first])}"
            raise InputError(f"the statistics of {name} do not fit the model of {tensors.src}, which {found}: "
                             "collect them on this checkpoint with depgraph.layerwise.layerwise_activation_stats")
        checked[first] = s
    return checked
