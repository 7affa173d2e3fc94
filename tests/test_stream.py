"""Streaming prune of a checkpoint directory: reloads to the in-memory prune, resumes, refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import depgraph
from depgraph import stream
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
    prune_checkpoint(src, _plan(a), out, analysis=a)
    assert written == ["model-00002-of-00005.safetensors", "model-00003-of-00005.safetensors"]
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
