"""Streaming prune of a checkpoint directory: reloads to the in-memory prune, resumes, refuses; importance
and calibration statistics read from the shards equal those of the model loaded in memory."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

import depgraph
from depgraph import layerwise, stream
from depgraph.importance import Weights, unit_scores
from depgraph.layerwise import layerwise_activation_stats
from depgraph.ondisk import CheckpointTensors, checkpoint_importance
from depgraph.stream import CheckpointError, meta_model, prune_checkpoint

transformers = pytest.importorskip("transformers")
SMALL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}


def _checkpoint(folder: Path, kind: str, shard_size: str | None, **config: Any) -> Path:
    """A random-weight ``kind`` (Llama, Qwen2) saved to ``folder`` in shards of ``shard_size``."""
    cls = getattr(transformers, f"{kind}ForCausalLM")
    settings = getattr(transformers, f"{kind}Config")(**{**SMALL, **config})
    torch.manual_seed(0)
    model = cls(settings).eval()
    model.save_pretrained(folder, **({"max_shard_size": shard_size} if shard_size else {}))
    return folder


def _analysis(src: Path) -> depgraph.Analysis:
    ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
    return depgraph.analyze(meta_model(src), {"input_ids": ids, "use_cache": False})


def _groups(a: depgraph.Analysis, suffix: str, size: int) -> list[int]:
    """Indices of the groups of ``size`` units with a member ending with ``suffix``."""
    return [g.index for g in a.groups if g.size == size and any(m.name.endswith(suffix) for m in g.members)]


def _plan(a: depgraph.Analysis, shift: int = 0) -> depgraph.Plan:
    """Every layer keeps one key/value head and half its MLP width."""
    keep: dict[int, Any] = {i: [1] for i in _groups(a, "k_proj.weight", 2) if len(a.groups[i].members) >= 4}
    keep.update({i: range(shift, 48, 2) for i in _groups(a, "mlp.gate_proj.weight", 48)})
    return depgraph.Plan.from_keep(a, keep)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, depgraph.Analysis]:
    src = _checkpoint(tmp_path_factory.mktemp("llama"), "Llama", "20KB")
    return src, _analysis(src)


@pytest.mark.parametrize("kind, shard_size, config", [
    ("Llama", "20KB", {}),
    ("Qwen2", None, {"tie_word_embeddings": True}),  # lm_head.weight is not in the checkpoint
    ("Qwen2", None, {}),
])
def test_a_streamed_checkpoint_reloads_to_the_model_pruned_in_memory(
        tmp_path: Path, kind: str, shard_size: str | None, config: dict[str, Any]) -> None:
    src = _checkpoint(tmp_path / "src", kind, shard_size, **config)
    a = _analysis(src)
    plan = _plan(a)
    out = prune_checkpoint(src, plan, tmp_path / "out", analysis=a)
    weights = sorted(p.name for p in src.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == weights and len(weights) == (5 if shard_size else 1)
    assert (out / "generation_config.json").read_text() == (src / "generation_config.json").read_text()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    expected = depgraph.prune(transformers.AutoModelForCausalLM.from_pretrained(src).eval(), plan)
    torch.testing.assert_close(_logits(reloaded), _logits(expected))
    assert (reloaded.config.num_key_value_heads, reloaded.config.intermediate_size) == (1, 24)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in expected.parameters())
    if shard_size:
        from safetensors import safe_open

        index = json.loads((out / stream.INDEX).read_text())
        listed = {}
        for name in weights:
            with safe_open(str(out / name), framework="pt") as f:
                listed.update(dict.fromkeys(f.keys(), name))
        assert index["weight_map"] == listed
        assert set(listed) == set(json.loads((src / stream.INDEX).read_text())["weight_map"])
        assert index["metadata"]["total_size"] == sum(p.numel() * p.element_size() for p in reloaded.parameters())
    else:
        assert not (out / stream.INDEX).exists()
    if config.get("tie_word_embeddings"):
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_a_rerun_skips_the_shards_already_written(
        llama: tuple[Path, depgraph.Analysis], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, a = llama
    out = prune_checkpoint(src, _plan(a), tmp_path / "out", analysis=a)
    (out / "model-00002-of-00005.safetensors").unlink()  # as if the first run stopped there
    (out / "model-00003-of-00005.safetensors").write_bytes(b"torn")
    (out / "model-00004-of-00005.safetensors.partial").write_bytes(b"torn")
    written: list[str] = []
    write = stream._write_shard
    monkeypatch.setattr(stream, "_write_shard", lambda *args: written.append(args[2].file) or write(*args))
    with pytest.raises(CheckpointError, match="model-00003-of-00005.safetensors, written by something other"):
        prune_checkpoint(src, _plan(a), out, analysis=a)  # a file it did not write: never overwritten
    (out / "model-00003-of-00005.safetensors").unlink()
    last = out / "model-00005-of-00005.safetensors"
    last.write_bytes(last.read_bytes()[:-4])  # our header, data cut short: written again
    prune_checkpoint(src, _plan(a), out, analysis=a)
    assert written == ["model-00002-of-00005.safetensors", "model-00003-of-00005.safetensors",
                       "model-00005-of-00005.safetensors"]
    assert not list(out.glob("*.partial"))  # a torn write of a shard since finished is cleaned up
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    expected = depgraph.prune(transformers.AutoModelForCausalLM.from_pretrained(src).eval(), _plan(a))
    torch.testing.assert_close(_logits(reloaded), _logits(expected))


def test_an_output_directory_written_with_another_plan_is_refused(
        llama: tuple[Path, depgraph.Analysis], tmp_path: Path) -> None:
    src, a = llama
    out = prune_checkpoint(src, _plan(a), tmp_path / "out", analysis=a)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(CheckpointError, match=r"written by another plan \(digest [0-9a-f]{16}\)"):
        prune_checkpoint(src, _plan(a, shift=1), out, analysis=a)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(CheckpointError, match="the output directory is the source"):
        prune_checkpoint(src, _plan(a), src, analysis=a)


def test_a_disk_too_small_is_refused_before_writing(
        llama: tuple[Path, depgraph.Analysis], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, a = llama
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(CheckpointError, match=r"needs 0\.00 GiB more in .*out, whose disk has 0\.00 GiB free"):
        prune_checkpoint(src, _plan(a), tmp_path / "out", analysis=a)
    assert not (tmp_path / "out").exists()


def test_a_plan_the_config_cannot_describe_is_refused_before_writing(
        llama: tuple[Path, depgraph.Analysis], tmp_path: Path) -> None:
    src, a = llama
    mlp = _groups(a, "mlp.gate_proj.weight", 48)
    plan = depgraph.Plan.from_keep(a, {mlp[0]: range(24), mlp[1]: range(36)})  # one Llama config width cannot say
    with pytest.raises(depgraph.PlanError, match=r"LlamaConfig cannot describe the pruned sizes: model\.layers\.\d"
                       r"\.mlp\.\w+_proj\.weight is \(\d+, \d+\), the config builds .*depgraph\.prune"):
        prune_checkpoint(src, plan, tmp_path / "out", analysis=a)
    assert not (tmp_path / "out").exists()


def test_a_plan_for_another_model_or_a_directory_without_weights_is_refused(
        llama: tuple[Path, depgraph.Analysis], tmp_path: Path) -> None:
    src, a = llama
    other = depgraph.analyze(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
                             torch.zeros(1, 4))
    with pytest.raises(depgraph.PlanError, match="made for a different analysis"):
        prune_checkpoint(src, depgraph.Plan.from_keep(other, {0: [1]}), tmp_path / "out", analysis=a)
    shutil.copy(src / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="holds no model.safetensors nor model.safetensors.index.json"):
        prune_checkpoint(tmp_path, _plan(a), tmp_path / "out", analysis=a)
    cut = tmp_path / "cut"
    shutil.copytree(src, cut)
    shard = sorted(cut.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=f"{shard.name} is not a safetensors file: its header is missing or cut"):
        prune_checkpoint(cut, _plan(a), tmp_path / "out", analysis=a)


# -- importance and calibration read from the shards ---------------------------------


def _in_memory(src: Path) -> tuple[torch.nn.Module, depgraph.Analysis]:
    model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    return model, depgraph.analyze(model, {"input_ids": torch.zeros(1, 8, dtype=torch.long), "use_cache": False})


def _same_plans(streamed: depgraph.Plan, loaded: depgraph.Plan) -> bool:
    return streamed.keep.keys() == loaded.keep.keys() and all(torch.equal(streamed.keep[i], loaded.keep[i])
                                                              for i in loaded.keep)


class _Live:
    """Weak references to what a wrapped function returns: ``alive[i]``, how many of them were
    still alive when it was called the ``i``-th time."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref[Any]] = []
        self.alive: list[int] = []

    def wrap(self, function: Any, values: Any = lambda result: [result]) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            gc.collect(1)  # the young generations: what the last call returned (a full collection takes seconds here)
            self.refs = [r for r in self.refs if r() is not None]
            self.alive.append(len(self.refs))
            result = function(*args, **kwargs)
            self.refs += [weakref.ref(v) for v in values(result)]
            return result
        return wrapped


@pytest.mark.parametrize("kind, shard_size, config, criterion, aggregate", [
    ("Llama", "20KB", {}, "l2", "mean"),
    ("Qwen2", None, {"tie_word_embeddings": True}, "l1", "max"),
])
def test_magnitude_read_from_the_shards_scores_and_solves_as_in_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, shard_size: str | None, config: dict[str, Any],
        criterion: str, aggregate: str) -> None:
    src = _checkpoint(tmp_path, kind, shard_size, **config)
    a = _analysis(src)
    model, loaded = _in_memory(src)
    importance = checkpoint_importance(src, criterion, aggregate=aggregate, model=a.model)
    live = _Live()
    weights = Weights.of(model)
    with monkeypatch.context() as patch:  # only here: each call collects garbage, slow in a long test session
        patch.setattr(CheckpointTensors, "__getitem__", live.wrap(CheckpointTensors.__getitem__))
        for g, expected in zip(a.groups, loaded.groups):
            assert [(m.name, m.dim) for m in g.members] == [(m.name, m.dim) for m in expected.members]
            assert torch.equal(importance(g, {}), unit_scores([expected], weights, criterion, aggregate))
    assert len(live.alive) > len(model.state_dict()) and not any(live.alive)  # one tensor in memory at a time
    for options in ({"sparsity": 0.3}, {"target": {"params": 0.8}}):
        assert _same_plans(depgraph.solve(a, importance=importance, aggregate=aggregate, **options),
                           depgraph.solve(loaded, importance=criterion, aggregate=aggregate, **options))


def _batches() -> list[Any]:
    """Token ids, and keyword inputs whose attention mask pads one sequence on the left."""
    ids = [torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    return [ids[0], ids[1], {"input_ids": ids[2], "attention_mask": mask}]


@pytest.mark.parametrize("kind, shard_size, config", [
    ("Llama", "20KB", {}),
    ("Qwen2", None, {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),  # masks per layer
])
def test_layer_by_layer_statistics_rank_as_those_of_the_model_in_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, shard_size: str | None,
        config: dict[str, Any]) -> None:
    src = _checkpoint(tmp_path, kind, shard_size, **config)
    model, loaded = _in_memory(src)
    metas: list[torch.nn.Module] = []
    monkeypatch.setattr(layerwise, "meta_model", lambda folder: metas.append(meta_model(folder)) or metas[-1])
    live = _Live()
    monkeypatch.setattr(layerwise, "_materialized",
                        live.wrap(layerwise._materialized, lambda stage: list(stage.values())))
    streamed = layerwise_activation_stats(src, _batches(), device="cpu")
    expected = depgraph.activation_stats(model, _batches())
    assert list(streamed) == list(expected) and len(expected) == 2 * 7 + 1
    for name, s in expected.items():
        assert (streamed[name].dim, streamed[name].count) == (s.dim, s.count)
        for values in ("mean", "var", "rms"):
            torch.testing.assert_close(getattr(streamed[name], values), getattr(s, values))
    assert live.alive == [0] * (1 + 2 + 1)  # one stage at a time: the embedding, each layer, norm and lm_head
    assert all(p.is_meta for p in metas[0].parameters()) and all(b.is_meta for b in metas[0].buffers())
    a = _analysis(src)
    for kind_ in ("activation", "fluctuation"):
        importance = checkpoint_importance(src, kind_, stats=streamed, model=a.model)
        assert _same_plans(depgraph.solve(a, 0.3, importance=importance),
                           depgraph.solve(loaded, 0.3, importance=depgraph.activation_importance(
                               model, expected, kind=kind_)))


class _Residual(torch.nn.Module):
    """One removable block, ``f``, outside any decoder layer."""

    def __init__(self) -> None:
        super().__init__()
        self.f = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


@pytest.mark.parametrize("kind, config", [
    ("Llama", {"num_hidden_layers": 3}),
    ("Qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
])
def test_layer_by_layer_block_influence_is_that_of_the_model_in_memory(
        tmp_path: Path, kind: str, config: dict[str, Any]) -> None:
    """Each attention's and MLP's Block Influence, one decoder layer in memory at a time, equals
    ``block_importance`` of the model loaded whole (left-padded batches included); the layers of
    least influence are then removed by streaming and the result reloads."""
    src = _checkpoint(tmp_path / "src", kind, "20KB", **config)
    ones = torch.ones(2, 9, dtype=torch.long)
    batches = [b if isinstance(b, dict) else {"input_ids": b, "attention_mask": ones} for b in _batches()]
    model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    loaded = depgraph.analyze(model, {**batches[0], "use_cache": False})
    expected = depgraph.block_importance(model, loaded, batches)
    a = _analysis(src)
    streamed = layerwise.layerwise_block_influence(src, a, batches)
    assert sorted(streamed) == sorted(expected) == list(range(2 * model.config.num_hidden_layers))
    assert [b.modules for b in a.blocks] == [b.modules for b in loaded.blocks]
    for i, value in expected.items():
        assert streamed[i] == pytest.approx(value, rel=1e-6, abs=1e-9)
    layer = min(range(model.config.num_hidden_layers), key=lambda i: streamed[2 * i] + streamed[2 * i + 1])
    out = prune_checkpoint(src, depgraph.Plan.from_keep(a, {}, drop_blocks=[2 * layer, 2 * layer + 1]),
                           tmp_path / "out", analysis=a)
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == \
        model.config.num_hidden_layers - 1
    with pytest.raises(depgraph.InputError, match="is not a decoder layer's attention or MLP"):
        layerwise.layerwise_block_influence(src, depgraph.analyze(_Residual(), torch.zeros(1, 4)), batches)


def test_importance_and_calibration_refuse_what_they_cannot_read(
        llama: tuple[Path, depgraph.Analysis], tmp_path: Path) -> None:
    src, a = llama
    with pytest.raises(depgraph.InputError, match="criterion must be one of l1, l2, activation, fluctuation"):
        checkpoint_importance(src, "bn_scale")
    with pytest.raises(depgraph.InputError, match="stats= goes with the criteria activation and fluctuation"):
        checkpoint_importance(src, "activation")
    other = depgraph.activation_stats(torch.nn.Sequential(torch.nn.Linear(4, 8)), [torch.zeros(1, 4)])
    with pytest.raises(depgraph.InputError, match=r"the statistics of 0\.weight do not fit the model of .*which has "
                       "no such weight"):
        checkpoint_importance(src, "fluctuation", stats=other)
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)
                                 ).save_pretrained(gpt2)
    with pytest.raises(CheckpointError, match="holds a GPT2LMHeadModel; calibration layer by layer supports "
                       "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        layerwise_activation_stats(gpt2, _batches())
    with pytest.raises(depgraph.InputError, match="batches gave no batch"):
        layerwise_activation_stats(src, [])
    with pytest.raises(CheckpointError, match="holds no tensor for model.norm.weight"):
        depgraph.solve(a, 0.5, importance=checkpoint_importance(_without(src, tmp_path / "cut", "model.norm.weight"),
                                                                "l2", model=a.model))


def _without(src: Path, folder: Path, name: str) -> Path:
    """A copy of the checkpoint at ``src`` without the tensor ``name``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, folder)
    for file in folder.glob("*.safetensors"):
        tensors = load_file(file)
        if tensors.pop(name, None) is not None:
            save_file(tensors, file, metadata={"format": "pt"})
    return folder
