"""Streaming prune of a Hugging Face checkpoint directory: :func:`prune_checkpoint`.

The analysis reads shapes, never weights, and a plan gives each parameter's kept indices per
dimension; so a checkpoint larger than memory is pruned file by file, tensor by tensor:

1. the model is built on the ``meta`` device from the directory's ``config.json``
   (:func:`meta_model`) and analyzed with the plan's recorded inputs;
2. the same model is pruned on ``meta`` with the plan, which updates its ``config``; a config
   that cannot describe the pruned sizes is refused before anything is written. Where the plan
   removes whole decoder layers (:mod:`depgraph.depth`), the pruned meta model says where each
   tensor goes: a removed layer's tensors are left out, later layers' are renamed
   (``model.layers.5.…`` to ``model.layers.4.…``);
3. each shard of the source (``model.safetensors`` or the shards an index lists) is written under
   its own name, one tensor at a time: read, ``index_select`` along each pruned dimension, appended
   to the output file after a header computed from the source header alone (a shard left with
   no tensor is not written);
4. ``config.json``, a new index and the tokenizer and generation files follow.

The plan is solved on the meta model with an importance that reads no weights (``random``) or
reads them from the shards one tensor at a time (:func:`depgraph.ondisk.checkpoint_importance`:
``l1``, ``l2``, and Wanda-sp / FLAP from :func:`depgraph.layerwise.layerwise_activation_stats`).

A shard is written to ``NAME.partial`` and renamed when complete, and records a digest of the plan
in its metadata: a rerun skips the shards already written with the same plan, and refuses an
output directory written with another one.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import os
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from passes.adopt import undescribed
from passes.errors import CheckpointError, PlanError
from passes.trace import first_names

from .analyze import analyze
from .apply import example_inputs, prune
from .calibrate import progress_bar
from .groups import Analysis
from .plan import Plan

__all__ = ["prune_checkpoint", "meta_model", "weights_on_disk", "CheckpointError"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
EXTRAS = (".json", ".model", ".txt", ".tiktoken", ".jinja")
"""Suffixes of the files copied unchanged (tokenizer, generation config), the config and index aside."""
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
            "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
"""Bytes per entry of each safetensors dtype."""
PLAN_KEY = "depgraph_plan"
"""The metadata key, in each written shard and in the index, holding the digest of the plan."""


CheckpointError.__module__ = "depgraph.stream"


@dataclass(frozen=True)
class Piece:
    """One tensor of a shard: its name in the pruned checkpoint, safetensors dtype, pruned shape,
    the kept indices along each pruned dimension, and its name in the source checkpoint."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    keep: tuple[tuple[int, torch.Tensor], ...]
    source: str

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class Shard:
    """A source file and the tensors its pruned copy holds, in the source's order."""

    file: str
    pieces: tuple[Piece, ...]
    metadata: dict[str, str]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


def prune_checkpoint(src_dir: str | Path, plan: Plan, out_dir: str | Path, *, analysis: Analysis | None = None,
                     progress: bool | None = None) -> Path:
    """Write the checkpoint of ``src_dir`` pruned by ``plan`` to ``out_dir``, tensor by tensor.

    ``src_dir`` is a Hugging Face directory (``config.json`` and ``model.safetensors``, or shards
    and ``model.safetensors.index.json``); ``plan`` was made from :func:`depgraph.analyze` of the
    model :func:`meta_model` builds from it (pass that ``analysis`` to skip analyzing it again).
    ``out_dir`` gets the same shard files (same names, same tensors, sliced), a new index,
    the pruned ``config.json`` (with ``per_layer_config`` where layers differ and transformers
    supports it) and the other ``*.json``, ``*.model``, ``*.txt`` files unchanged, so that
    ``from_pretrained(out_dir)`` gives the model ``depgraph.prune`` gives in memory.

    Memory: one source tensor and its pruned copy at a time (each tensor is read into its own
    buffer, not memory-mapped, and the output is written as it is computed), plus the model on
    ``meta``, which holds no weights (``benchmarks/results/stream_memory.md``).

    A plan that removes blocks (``Plan.from_keep(..., drop_blocks=...)``) removes whole decoder
    layers: their tensors are left out, later layers renamed, ``num_hidden_layers`` (and
    ``layer_types``) follow. Refused with :class:`~depgraph.PlanError` before anything is written
    when the plan does not fit the model, the pruned config cannot describe the pruned sizes (then
    prune in memory and save the weights with the plan), or a removed block is only part of a
    layer (an attention without its MLP: no config describes that layer); with
    :class:`CheckpointError` when ``out_dir`` holds weights written with another plan (or not by
    this function), or its disk lacks the room for the output.
    A rerun with the same plan skips the shards already complete (a crash leaves at most a
    ``*.partial`` file). ``progress``: a tqdm bar per shard (None: when stderr is a terminal).

    Examples
    --------
    >>> import tempfile, torch, depgraph, transformers
    >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
    ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    >>> src, out = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> transformers.LlamaForCausalLM(config).save_pretrained(src)
    >>> meta = depgraph.stream.meta_model(src)
    >>> a = depgraph.analyze(meta, {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta")})
    >>> plan = depgraph.Plan.from_keep(a, {4: range(24)})  # half of the MLP width
    >>> _ = depgraph.prune_checkpoint(src, plan, out, analysis=a)
    >>> transformers.AutoModelForCausalLM.from_pretrained(out).config.intermediate_size
    24
    """
    src, out = Path(src_dir), Path(out_dir)
    model = meta_model(src)
    analysis = analysis if analysis is not None else _analysis(model, plan)
    plan.check(analysis)
    kept = _kept(plan, analysis, model)
    names = _names(model)
    config, renamed = _pruned_config(model, plan, analysis)
    shards = [s for s in _layout(src, names, renamed, kept, model.state_dict()) if s.pieces]
    digest = plan_digest(plan)
    todo = [s for s in shards if not _finished(out / s.file, s, digest)]
    _claim(src, out, digest)
    _check_space(out, todo)
    out.mkdir(parents=True, exist_ok=True)
    for shard in todo:
        _write_shard(src / shard.file, out / shard.file, shard, digest, progress)
    for stale in out.glob("*.safetensors.partial"):  # torn writes of shards a later run finished
        stale.unlink()
    _copy_extras(src, out)
    config.save_pretrained(str(out))
    if (src / INDEX).is_file():
        _write_index(out, shards, digest)
    return out


def model_class(transformers: Any, config: Any) -> Any:
    """The transformers class a config names in ``architectures``: one transformers exports, or
    one registered with an Auto class for the config's type (``AutoModelForCausalLM.register``);
    ``AutoModel`` when it names none or one neither knows."""
    architecture = (getattr(config, "architectures", None) or ["AutoModel"])[0]
    exported = getattr(transformers, architecture, None)
    if exported is not None:
        return exported
    for name in dir(transformers):
        mapping = getattr(getattr(transformers, name), "_model_mapping", None) if name.startswith("AutoModel") else None
        try:
            registered = mapping[type(config)] if mapping is not None else None
        except (KeyError, ValueError):
            continue
        for cls in registered if isinstance(registered, tuple) else (registered,):
            if getattr(cls, "__name__", None) == architecture:
                return cls
    return transformers.AutoModel


def meta_model(src_dir: str | Path) -> nn.Module:
    """The model of a Hugging Face directory built on the ``meta`` device (no weight memory), in
    eval mode: the class its config's ``architectures`` names, else ``AutoModel`` (as the command
    line's ``hf:DIR`` builds it). Plans for :func:`prune_checkpoint` are made on this model.

    >>> import tempfile, transformers
    >>> src = tempfile.mkdtemp()
    >>> transformers.LlamaConfig(architectures=["LlamaForCausalLM"]).save_pretrained(src)
    >>> model = meta_model(src)
    >>> type(model).__name__, model.lm_head.weight.device.type
    ('LlamaForCausalLM', 'meta')
    """
    try:
        import transformers
    except ImportError as exc:
        raise CheckpointError(f"pruning a Hugging Face checkpoint needs transformers: {exc}") from exc
    try:
        config = transformers.AutoConfig.from_pretrained(str(src_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{src_dir} holds no Hugging Face config: {str(exc).splitlines()[0]}") from exc
    cls = model_class(transformers, config)
    with torch.device("meta"):
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    return model.eval()


def weights_on_disk(src_dir: str | Path) -> bool:
    """Whether ``src_dir`` holds safetensors weights :func:`prune_checkpoint` can stream
    (``model.safetensors``, or ``model.safetensors.index.json`` and its shards).

    >>> weights_on_disk(".")
    False
    """
    folder = Path(src_dir)
    return folder.is_dir() and ((folder / INDEX).is_file() or (folder / SINGLE).is_file())


def plan_digest(plan: Plan) -> str:
    """A digest of what a plan keeps and removes (and of the analysis it was made for)."""
    kept = {str(i): plan.keep[i].tolist() for i in sorted(plan.keep)}
    parts: list[Any] = [plan.fingerprint, kept, {str(i): plan.sizes[i] for i in sorted(plan.sizes)}]
    if plan.drop:  # a plan without blocks keeps the digest it had before plans could remove them
        parts.append({str(i): plan.drop[i] for i in sorted(plan.drop)})
    text = json.dumps(parts)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- the plan, on the meta model -------------------------------------------------


def _analysis(model: nn.Module, plan: Plan) -> Analysis:
    """``model`` analyzed with the plan's recorded inputs and tracer."""
    args, keywords = example_inputs(model, plan.inputs, plan.keywords)
    return analyze(model, keywords or args, tracer=plan.tracer)


def _kept(plan: Plan, analysis: Analysis, model: nn.Module) -> dict[str, tuple[tuple[int, torch.Tensor], ...]]:
    """For each parameter or buffer the plan prunes: (dim, kept indices) per pruned dimension."""
    kept: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for (name, dim), removed in sorted(plan.removed_entries(analysis).items()):
        if bool(removed.any()):
            kept.setdefault(name, []).append((dim, (~removed).nonzero().flatten()))
    return {name: tuple(dims) for name, dims in kept.items()}


def _pruned_config(model: nn.Module, plan: Plan, analysis: Analysis) -> tuple[Any, dict[str, str | None]]:
    """The config of ``model`` pruned by ``plan`` (on meta, in place), and where each of the
    model's tensor names goes (:func:`_renamed`); PlanError where the config cannot describe the
    pruned sizes, as ``from_pretrained`` could not rebuild the checkpoint then."""
    before = copy.deepcopy(model.config)
    modules = dict(model.named_modules(remove_duplicate=False))
    tensors = list(first_names(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the class-or-graph choice does not matter here: only the config
        prune(model, plan, inplace=True, check=False)
    renamed = _renamed(model, modules, tensors)
    if any(renamed.get(p) is not None for b in plan.blocks(analysis) for p in b.params):  # the module still runs it
        raise PlanError(
            f"this plan removes blocks that are only part of a layer of {type(model).__name__} (e.g. an attention "
            "whose MLP stays): no config describes such a layer, so the checkpoint cannot be written. Remove every "
            "block of a layer (its attention and its MLP), or prune in memory (depgraph.prune) and save the graph"
        )
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    if prefix != ".":  # a checkpoint of the base model: names without its prefix, as _names reads them
        renamed.update({n.removeprefix(prefix): new.removeprefix(prefix) if new is not None else None
                        for n, new in list(renamed.items()) if n.startswith(prefix) and n.removeprefix(prefix)
                        not in renamed})
    problems = [d for _, _, differ in undescribed(model) for d in differ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise PlanError(
            f"the pruned {type(before).__name__} cannot describe the pruned sizes: {'; '.join(problems[:3])}{more}. "
            "from_pretrained could not rebuild the checkpoint, so nothing was written. Prune the groups alike in "
            "every layer (or use a transformers whose model classes read per_layer_config), or prune in memory "
            "(depgraph.prune) and save the weights with the plan"
        )
    return model.config, renamed


def _renamed(pruned: nn.Module, modules: dict[str, nn.Module], tensors: list[str]) -> dict[str, str | None]:
    """Each tensor name of the model before pruning (``tensors``; ``modules``: its modules by
    name) -> the name of that tensor in ``pruned``, by its module, which pruning in place keeps
    (renamed where a list of layers lost some); None where its module was removed."""
    now = {id(m): name for name, m in pruned.named_modules(remove_duplicate=False)}
    renamed: dict[str, str | None] = {}
    for name in tensors:
        owner, _, attribute = name.rpartition(".")
        path = now.get(id(modules[owner]))
        renamed[name] = None if path is None else f"{path}.{attribute}" if path else attribute
    if set(renamed.values()) - {None} != set(first_names(pruned)):
        raise PlanError(f"the pruned {type(pruned).__name__} holds tensors the source does not: its modules were "
                        "replaced, not only removed, so the checkpoint cannot be streamed; prune in memory")
    return renamed


def _names(model: nn.Module) -> dict[str, str]:
    """Every parameter and buffer name of ``model`` (tied aliases included) -> its first name."""
    names = first_names(model)
    prefix = getattr(model, "base_model_prefix", "")
    if prefix:  # a checkpoint of the base model, without its prefix
        names.update({n.removeprefix(f"{prefix}."): m for n, m in list(names.items())
                      if n.startswith(f"{prefix}.") and n.removeprefix(f"{prefix}.") not in names})
    return names


# -- the source layout ------------------------------------------------------------


def _layout(src: Path, names: dict[str, str], renamed: dict[str, str | None], kept: dict[str, Any],
            pruned: dict[str, torch.Tensor]) -> list[Shard]:
    """Each source shard's tensors with their pruned names and shapes, from the headers alone
    (a removed layer's left out); PlanError where a shape differs from the pruned meta model's
    (``pruned``, its state dict)."""
    shards = []
    for file in _shard_files(src):
        _, entries = _source_header(src / file)
        metadata = entries.pop("__metadata__", None) or {"format": "pt"}
        in_file_order = sorted(entries, key=lambda name: entries[name]["data_offsets"][0])  # read front to back
        pieces = (_piece(name, entries[name], names, renamed, kept, pruned) for name in in_file_order)
        shards.append(Shard(file, tuple(p for p in pieces if p is not None), dict(metadata)))
    return shards


def _shard_files(src: Path) -> list[str]:
    if (src / INDEX).is_file():
        try:
            weight_map = json.loads((src / INDEX).read_text())["weight_map"]
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{src / INDEX} is not a safetensors index: {exc}") from exc
        files = sorted(set(weight_map.values()))
    elif (src / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise CheckpointError(f"{src} holds no {SINGLE} nor {INDEX}: only safetensors checkpoints are streamed")
    missing = [f for f in files if not (src / f).is_file()]
    if missing:
        raise CheckpointError(f"{src} lacks the shards its index lists: {', '.join(missing)}")
    return files


def _piece(name: str, entry: dict[str, Any], names: dict[str, str], renamed: dict[str, str | None],
           kept: dict[str, Any], pruned: dict[str, torch.Tensor]) -> Piece | None:
    """The tensor ``name`` of the source (``entry``: its header entry) as the pruned checkpoint
    holds it; None where it goes with a removed block. ``names``: checkpoint name -> the model's
    first name for its tensor."""
    dtype, shape = entry["dtype"], list(entry["shape"])
    if dtype not in ITEMSIZE:
        raise CheckpointError(f"tensor {name} has dtype {dtype}, which depgraph cannot size")
    model_name = names.get(name)
    out = renamed.get(name, name)  # a name the model does not know is kept
    if out is None:
        return None
    keep = kept.get(model_name, ()) if model_name is not None else ()
    for dim, indices in keep:
        shape[dim] = len(indices)
    expected = pruned.get(renamed.get(model_name) or "") if model_name is not None else None
    if expected is not None and tuple(expected.shape) != tuple(shape):
        raise PlanError(f"{name} would be written with shape {tuple(shape)}, but the pruned model has "
                        f"{tuple(expected.shape)}: the checkpoint does not match its config")
    return Piece(out, dtype, tuple(shape), keep, name)


# -- the output directory -----------------------------------------------------------


def _claim(src: Path, out: Path, digest: str) -> None:
    """CheckpointError unless ``out`` is new, or holds only weights written with this plan."""
    if out.exists() and src.resolve() == out.resolve():
        raise CheckpointError(f"the output directory is the source {src}: choose another")
    for file in sorted(out.glob("*.safetensors")) if out.is_dir() else []:
        found = _metadata(file).get(PLAN_KEY)
        if found != digest:
            whose = f"another plan (digest {found})" if found else "something other than depgraph.prune_checkpoint"
            raise CheckpointError(f"{out} holds {file.name}, written by {whose}; this plan's digest is {digest}. "
                                  "Choose another output directory or empty this one")


def _metadata(file: Path) -> dict[str, str]:
    try:
        return dict(_source_header(file)[1].get("__metadata__") or {})
    except CheckpointError:  # an unreadable file is not ours
        return {}


def _finished(file: Path, shard: Shard, digest: str) -> bool:
    """Whether ``file`` is ``shard`` written with the plan of ``digest`` (a rerun skips it)."""
    if not file.is_file():
        return False
    try:
        start, entries = _source_header(file)
    except CheckpointError:  # unreadable: write it again
        return False
    if (entries.pop("__metadata__", None) or {}).get(PLAN_KEY) != digest:
        return False
    if file.stat().st_size != start + sum(p.nbytes for p in shard.pieces):
        return False  # its header is whole, its data not
    return {name: tuple(e["shape"]) for name, e in entries.items()} == {p.name: p.shape for p in shard.pieces}


def _check_space(out: Path, todo: list[Shard]) -> None:
    """CheckpointError when the shards left to write would not fit on ``out``'s disk."""
    needed = sum(s.nbytes for s in todo)
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise CheckpointError(f"the pruned checkpoint needs {_gib(needed)} more in {out}, whose disk has {_gib(free)} "
                              "free: free some space or choose another output directory")


def _gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"


# -- writing ------------------------------------------------------------------------


def _write_shard(source: Path, target: Path, shard: Shard, digest: str, progress: bool | None) -> None:
    """``shard`` pruned, one tensor at a time, to ``target`` (via ``target.partial``). Each source
    tensor is read into memory of its own (not memory-mapped: the pages of a mapped shard stay
    resident until it is closed) and freed once its pruned copy is written."""
    partial = target.with_name(target.name + ".partial")
    start, entries = _source_header(source)
    with source.open("rb", buffering=0) as f, partial.open("wb") as handle:
        handle.write(_header(shard, {**shard.metadata, PLAN_KEY: digest}))
        for piece in progress_bar(shard.pieces, shard.file, progress, unit="tensor"):
            tensor = _sliced(_read(f, start, entries[piece.source]), piece.keep).contiguous()
            if tuple(tensor.shape) != piece.shape:
                raise CheckpointError(f"{source}: {piece.name} has shape {tuple(tensor.shape)}, its header said "
                                      f"{piece.shape}")
            handle.write(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # a buffer
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, target)
    _give_back_freed_memory()


TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
                "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
"""The torch dtype of each safetensors dtype."""


def _source_header(source: Path) -> tuple[int, dict[str, Any]]:
    """Where a safetensors file's data starts, and its header's entry for each tensor (and its
    ``__metadata__``); CheckpointError where the file has no such header."""
    with source.open("rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < size <= source.stat().st_size - 8:
            raise CheckpointError(f"{source} is not a safetensors file: its header is missing or cut")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise CheckpointError(f"{source} is not a safetensors file: its header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{source} is not a safetensors file: its header is not a JSON object")
    return 8 + size, header


def _read(f: Any, start: int, entry: dict[str, Any]) -> torch.Tensor:
    """The tensor ``entry`` (dtype, shape, data offsets) of the file ``f`` whose data starts at ``start``."""
    begin, end = entry["data_offsets"]
    buffer = bytearray(end - begin)
    f.seek(start + begin)
    if end > begin and f.readinto(buffer) != end - begin:
        raise CheckpointError(f"{f.name} ends inside a tensor: the file is truncated")
    raw = torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)
    return raw.view(TORCH_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _give_back_freed_memory() -> None:
    """Return the heap glibc keeps after the per-tensor buffers are freed (its mmap threshold grows
    with the largest buffer freed, so later tensors come from a heap that is not given back)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _header(shard: Shard, metadata: dict[str, str]) -> bytes:
    """The safetensors header of ``shard`` (size prefix included), padded to 8 bytes."""
    entries: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for p in shard.pieces:
        entries[p.name] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _sliced(tensor: torch.Tensor, keep: Iterable[tuple[int, torch.Tensor]]) -> torch.Tensor:
    for dim, indices in keep:
        tensor = tensor.index_select(dim, indices)
    return tensor


def _copy_extras(src: Path, out: Path) -> None:
    """Tokenizer and generation files, unchanged (not the config, the index or a plan)."""
    for file in sorted(src.iterdir()):
        if file.is_file() and file.suffix in EXTRAS and file.name not in ("config.json", INDEX, "plan.json"):
            shutil.copyfile(file, out / file.name)


def _write_index(out: Path, shards: list[Shard], digest: str) -> None:
    index = {"metadata": {"total_size": sum(s.nbytes for s in shards), PLAN_KEY: digest},
             "weight_map": {p.name: s.file for s in shards for p in s.pieces}}
    partial = out / f"{INDEX}.partial"
    partial.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(partial, out / INDEX)
