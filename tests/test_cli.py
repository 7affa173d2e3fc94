"""The command line: every subcommand and model spec, exit codes 0 / 1 / 2 with one-line messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import depgraph
from depgraph.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_analyze_prints_json_graphml_dot_and_lookups(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = _run(capsys, "analyze", "torchvision:resnet18")
    assert code == 0 and "12 groups" in out
    code, out, _ = _run(capsys, "analyze", "torchvision:resnet18", "--json")
    data = json.loads(out)
    assert code == 0 and len(data["groups"]) == 12 and data["groups"][1]["members"][0] == ["layer1.0.conv1.weight", 0]
    assert _run(capsys, "analyze", "torchvision:resnet18", "--graphml", str(tmp_path / "g.graphml"))[0] == 0
    assert "group:0" in (tmp_path / "g.graphml").read_text()
    assert _run(capsys, "analyze", "torchvision.models:resnet18", "--dot", str(tmp_path / "g.dot"))[0] == 0
    assert '"group 1" -- "layer1.0.conv1";' in (tmp_path / "g.dot").read_text()
    code, out, _ = _run(capsys, "analyze", "torchvision:resnet18", "--lookup", "layer1.0.conv1.weight:0:5")
    assert code == 0 and out.startswith("group 1 (64 units), unit 5: layer1.0.conv1.weight dim 0 [5];")


def test_prune_writes_a_plan_weights_and_a_summary_that_rebuild_the_model(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = _run(capsys, "prune", "torchvision:resnet18", "--target", "macs=0.5", "--input-shape",
                        "1,3,64,64", "--out", str(tmp_path))
    assert code == 0 and "MACs" in out and (tmp_path / "summary.txt").read_text().strip() == out.strip()
    import torchvision
    from safetensors.torch import load_model

    plan = depgraph.Plan.load(tmp_path / "plan.json")
    rebuilt = depgraph.prune(torchvision.models.resnet18(weights=None).eval(), plan)
    load_model(rebuilt, str(tmp_path / "model.safetensors"))
    a = depgraph.analyze(rebuilt, torch.zeros(1, 3, 64, 64))
    assert 0.49 <= depgraph.cost(a).macs / depgraph.cost(depgraph.analyze(
        torchvision.models.resnet18(weights=None), torch.zeros(1, 3, 64, 64))).macs <= 0.5
    config = tmp_path / "config.json"
    config.write_text(json.dumps([{"op_types": ["Conv2d"], "sparse_ratio": 0.25}]))
    assert _run(capsys, "prune", "torchvision:resnet18", "--config", str(config), "--out", str(tmp_path / "c"))[0] == 0


def llama_dir(path: Path, shard: str | None = None, **sizes: int) -> None:
    """A tiny Llama (hidden 32, MLP 48, 4 query / 2 key-value heads, 2 layers) saved at ``path``
    (in shards of ``shard`` bytes, e.g. "20KB", if given)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                         "max_position_embeddings": 32, **sizes}, architectures=["LlamaForCausalLM"])
    transformers.LlamaForCausalLM(config).save_pretrained(path, **({"max_shard_size": shard} if shard else {}))


def assert_reloads_as_pruned(src: Path, out: Path, intermediate_size: int) -> None:
    """``from_pretrained(out)`` gives the logits of the model at ``src`` pruned with ``out``'s plan."""
    import transformers

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    original = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    expected = depgraph.prune(original, depgraph.Plan.load(out / "plan.json"))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected(ids).logits)
    assert reloaded.config.intermediate_size == intermediate_size


def test_hugging_face_directory_round_trips_through_from_pretrained(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    llama_dir(tmp_path / "src")
    mlp = tmp_path / "mlp.json"  # MLP widths only: a config describes them (head sizes pruned apart would not)
    mlp.write_text(json.dumps([{"op_names_re": [".*mlp\\.gate_proj"], "sparse_ratio": 0.25}]))
    code, out, _ = _run(capsys, "prune", f"hf:{tmp_path / 'src'}", "--config", str(mlp), "--out", str(tmp_path / "out"))
    assert code == 0 and "from_pretrained" in out
    assert_reloads_as_pruned(tmp_path / "src", tmp_path / "out", intermediate_size=36)
    code, out, _ = _run(capsys, "analyze", f"hf:{tmp_path / 'src' / 'config.json'}")  # a config alone: random weights
    assert code == 0 and "groups" in out


def test_hugging_face_layers_a_config_cannot_describe_are_saved_as_safetensors_saying_why(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    llama_dir(tmp_path / "src")
    mlp = tmp_path / "mlp.json"  # layer 0 keeps 24 of 48 MLP units, layer 1 keeps 36: Llama builds one width
    mlp.write_text(json.dumps([{"op_names_re": [r".*layers\.0\.mlp\.gate_proj"], "sparse_ratio": 0.5},
                               {"op_names_re": [r".*layers\.1\.mlp\.gate_proj"], "sparse_ratio": 0.25}]))
    with pytest.warns(UserWarning, match="its config cannot describe its sizes"):
        code, out, _ = _run(capsys, "prune", f"hf:{tmp_path / 'src'}", "--config", str(mlp),
                            "--out", str(tmp_path / "out"))
    assert code == 0 and "config cannot describe the pruned sizes" in out and "from_pretrained(" not in out
    assert (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / "config.json").exists()


def test_hugging_face_layers_pruned_apart_round_trip_through_per_layer_config(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers.PretrainedConfig, "per_layer_config"):
        pytest.skip(f"transformers {transformers.__version__} has no per_layer_config (added in 5.14.0)")
    from test_hf_per_layer import _build

    _build("Llama", layerwise=True).save_pretrained(tmp_path / "src")  # a class building each layer from it
    mlp = tmp_path / "mlp.json"  # layer 0 keeps 24 of 48 MLP units, layer 1 keeps 36
    mlp.write_text(json.dumps([{"op_names_re": [r".*layers\.0\.mlp\.gate_proj"], "sparse_ratio": 0.5},
                               {"op_names_re": [r".*layers\.1\.mlp\.gate_proj"], "sparse_ratio": 0.25}]))
    code, out, _ = _run(capsys, "prune", f"hf:{tmp_path / 'src'}", "--config", str(mlp), "--out", str(tmp_path / "out"))
    assert code == 0 and "pruned shard by shard" in out  # its class, registered with the Auto classes, is found
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["per_layer_config"] == {"0": {"intermediate_size": 24}, "1": {"intermediate_size": 36}}
    assert saved["architectures"] == ["LayerwiseLlamaForCausalLM"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    expected = depgraph.prune(original, depgraph.Plan.load(tmp_path / "out" / "plan.json"))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected(ids).logits)


def test_an_exported_program(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    torch.export.save(torch.export.export(model, (torch.zeros(3, 4),)), tmp_path / "m.pt2")
    code, out, _ = _run(capsys, "analyze", str(tmp_path / "m.pt2"))
    assert code == 0 and "1 groups" in out


def test_report_writes_one_html_file_showing_a_plan(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import torchvision

    a = depgraph.analyze(torchvision.models.resnet18(weights=None), torch.zeros(1, 3, 32, 32))
    depgraph.Plan.from_keep(a, {1: range(40)}).save(tmp_path / "plan.json")
    out = tmp_path / "new" / "report.html"
    code, printed, _ = _run(capsys, "report", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--plan",
                            str(tmp_path / "plan.json"), "--out", str(out))
    assert code == 0 and printed.startswith(f"wrote {out}: 12 groups, ")
    html = out.read_text()
    assert "depgraph report: torchvision:resnet18" in html and '"index":1,"size":64,"kept":40' in html
    assert _run(capsys, "report", "torchvision:resnet18", "--out", str(tmp_path / "plain.html"))[0] == 0


def test_report_refuses_a_plan_made_for_another_model_or_not_a_plan(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    a = depgraph.analyze(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.zeros(1, 4))
    depgraph.Plan.from_keep(a, {0: [0, 1]}).save(tmp_path / "plan.json")
    code, out, err = _run(capsys, "report", "torchvision:resnet18", "--plan", str(tmp_path / "plan.json"), "--out",
                          str(tmp_path / "r.html"))
    assert code == 1 and err.startswith("depgraph: PlanError: this plan was made for a different analysis")
    assert err.count("\n") == 1 and not out and not (tmp_path / "r.html").exists()
    (tmp_path / "bad.json").write_text("{not json")
    code, _, err = _run(capsys, "report", "torchvision:resnet18", "--plan", str(tmp_path / "bad.json"), "--out",
                        str(tmp_path / "r.html"))
    assert code == 1 and "is not a depgraph plan" in err and err.count("\n") == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["analyze", "resnet18"], "model must be torchvision:NAME"),
    (["analyze", "torchvision:resnet1800"], "'torchvision' has no factory 'resnet1800'"),
    (["analyze", "nosuchpackage:f"], "cannot import 'nosuchpackage'"),
    (["analyze", "timm:no_such_net"], "timm has no model 'no_such_net'"),
    (["analyze", "missing.pt2"], "no such file: missing.pt2"),
    (["analyze", "hf:/no/such/dir"], "no such Hugging Face directory or config file"),
    (["prune", "torchvision:resnet18", "--config", "missing.json", "--out", "x"], "no such config file"),
    (["analyze", "torchvision:resnet18", "--lookup", "fc.weight:x"], "--lookup takes NAME[:DIM[:INDEX]]"),
    (["report", "torchvision:resnet18", "--plan", "missing.json", "--out", "r.html"], "no such plan file"),
    (["report", "missing.pt2", "--out", "r.html"], "no such file: missing.pt2"),
])
def test_bad_usage_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1 and not out


def test_refusals_exit_1_and_malformed_options_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = _run(capsys, "prune", "torchvision:resnet18", "--target", "macs=0.0001", "--out", str(tmp_path))
    assert code == 1 and err.startswith("depgraph: InputError: the macs cannot go below") and err.count("\n") == 1
    code, _, err = _run(capsys, "analyze", "torchvision:resnet18", "--lookup", "fc.wieght")
    assert code == 1 and "did you mean 'fc.weight'" in err
    for argv in (["prune", "torchvision:resnet18", "--target", "macs", "--out", "x"], ["frobnicate"],
                 ["prune", "torchvision:resnet18", "--out", "x"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2


def test_hugging_face_shards_are_pruned_shard_by_shard_with_random_importance(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    llama_dir(tmp_path / "src", shard="20KB")
    mlp = tmp_path / "mlp.json"
    mlp.write_text(json.dumps([{"op_names_re": [".*mlp\\.gate_proj"], "sparse_ratio": 0.25}]))
    loaded: list[str] = []
    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loaded.append(a[0]) or None))  # streaming loads no weights
    code, out, _ = _run(capsys, "prune", f"hf:{tmp_path / 'src'}", "--config", str(mlp), "--importance", "random",
                        "--out", str(tmp_path / "out"))
    monkeypatch.undo()
    assert code == 0 and "pruned shard by shard" in out and not loaded
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == sorted(
        p.name for p in (tmp_path / "src").glob("*.safetensors"))
    assert_reloads_as_pruned(tmp_path / "src", tmp_path / "out", intermediate_size=36)


def test_hugging_face_shards_stream_with_a_magnitude_importance_and_solve_as_loaded_whole(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    llama_dir(tmp_path / "src", shard="20KB")
    mlp = tmp_path / "mlp.json"  # two groups, alike in both layers (so the config describes them)
    mlp.write_text(json.dumps([{"op_names_re": [".*mlp\\.gate_proj"], "sparse_ratio": 0.25}]))
    loaded: list[str] = []
    with monkeypatch.context() as patch:
        patch.setattr(transformers.LlamaForCausalLM, "from_pretrained",
                      classmethod(lambda cls, *a, **k: loaded.append(a[0]) or None))  # streaming loads no model
        code, out, err = _run(capsys, "prune", f"hf:{tmp_path / 'src'}", "--config", str(mlp), "--importance", "l1",
                              "--out", str(tmp_path / "a"))
    assert code == 0 and "shard by shard" in out and not loaded and "note" not in err
    code, out, err = _run(capsys, "prune", f"hf:{tmp_path / 'src'}", "--config", str(mlp), "--importance", "l1",
                          "--no-stream", "--out", str(tmp_path / "b"))
    assert code == 0 and "shard by shard" not in out and (tmp_path / "b" / "model.safetensors").exists()
    streamed, whole = (depgraph.Plan.load(tmp_path / d / "plan.json").keep for d in "ab")
    assert streamed.keys() == whole.keys() and len(whole) == 2
    assert all(torch.equal(streamed[i], whole[i]) for i in whole)
    assert_reloads_as_pruned(tmp_path / "src", tmp_path / "a", intermediate_size=36)
    code, out, err = _run(capsys, "prune", f"hf:{tmp_path / 'src'}", "--config", str(mlp), "--importance",
                          "bn_scale", "--out", str(tmp_path / "c"))
    assert "--importance bn_scale needs the model in memory" in err and "shard by shard" not in out


def test_hugging_face_shards_whose_plan_the_config_cannot_describe_are_pruned_in_memory(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from test_hf_per_layer import _reads_per_layer

    if _reads_per_layer("Llama") is None:
        pytest.skip("LlamaForCausalLM builds its layers from per_layer_config: layers pruned apart stream")
    llama_dir(tmp_path / "src", shard="20KB")
    mlp = tmp_path / "mlp.json"  # layer 0 keeps 24 of 48 MLP units, layer 1 keeps 36
    mlp.write_text(json.dumps([{"op_names_re": [r".*layers\.0\.mlp\.gate_proj"], "sparse_ratio": 0.5},
                               {"op_names_re": [r".*layers\.1\.mlp\.gate_proj"], "sparse_ratio": 0.25}]))
    code, out, err = _run(capsys, "prune", f"hf:{tmp_path / 'src'}", "--config", str(mlp), "--out", str(tmp_path / "o"))
    assert code == 0 and "shard by shard" not in out
    assert "cannot describe the pruned sizes" in err and "is loaded whole and pruned in memory" in err
    assert not list((tmp_path / "o").glob("*.index.json")) and not (tmp_path / "o" / "config.json").exists()
    plan = depgraph.Plan.load(tmp_path / "o" / "plan.json")
    assert sorted(len(k) for k in plan.keep.values()) == [24, 36]
    pruned = depgraph.prune(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "src").eval(), plan)
    saved = load_file(tmp_path / "o" / "model.safetensors")
    assert {k: t.shape for k, t in saved.items()} == {k: t.shape for k, t in pruned.state_dict().items()}
