"""Depth pruning: plans that remove blocks (``Plan.from_keep(..., drop_blocks=)``), applied by
``simulate`` (the branch's sum gives the stream) and ``prune`` (the branch and its modules gone),
their cost, block importance and ``solve(..., depth=...)``.

Every applied plan is checked both ways: the pruned and the simulated model compute the same
thing, the pruned model has the parameters ``depgraph.cost`` predicts (and the MACs, counted on
an analysis of the pruned model), and the caller's model is unchanged.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from equivalence import fingerprint
from torch import Tensor, fx, nn
from zoo import tiny_llama

import depgraph
from depgraph import Analysis, Plan, PlanError
from depgraph.errors import InputError


class Residual(nn.Module):
    def __init__(self, width: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


class Parallel(nn.Module):
    """Two branches of one stream in one forward: ``x + f(x) + g(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.f, self.g = Residual(), Residual()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.f.fc2(F.relu(self.f.fc1(x))) + self.g.fc2(F.relu(self.g.fc1(x)))


def stack(n: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), *(Residual() for _ in range(n)), nn.Linear(8, 3)).eval()


def apply_both(model: nn.Module, inputs: object, plan: Plan, analysis: Analysis) -> tuple[nn.Module, list[str]]:
    """``prune`` and ``simulate`` ``plan``; assert they agree, that the cost predicts the pruned
    model and that ``model`` is unchanged; the pruned model and the warnings prune gave."""
    before = fingerprint(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = depgraph.prune(model, plan)
    simulated = depgraph.simulate(model, plan)
    assert fingerprint(model) == before
    keywords = isinstance(inputs, dict)
    run = (lambda m: m(**inputs)) if keywords else (lambda m: m(inputs))
    with torch.no_grad():
        yp, ys = run(pruned), (simulated(**inputs, use_cache=False) if keywords else simulated(inputs))
    yp, ys = getattr(yp, "logits", yp), getattr(ys, "logits", ys)
    torch.testing.assert_close(yp, ys, rtol=1e-4, atol=1e-5)
    predicted = depgraph.cost(analysis, plan)
    assert sum(p.numel() for p in pruned.parameters()) == predicted.params
    if not keywords:
        assert depgraph.cost(depgraph.analyze(pruned, inputs)).macs == predicted.macs
    return pruned, [str(w.message) for w in caught]


def test_a_plan_removes_blocks_and_keeps_the_sequential() -> None:
    model, x = stack(), torch.randn(5, 4)
    a = depgraph.analyze(model, x)
    assert [b.name for b in a.blocks] == ["1", "2", "3", "4"]
    plan = Plan.from_keep(a, {}, drop_blocks=[1, a.blocks[3]])
    assert plan.drop == {1: a.blocks[1].output, 3: a.blocks[3].output}
    pruned, said = apply_both(model, x, plan, a)
    assert said == []
    assert type(pruned) is nn.Sequential
    assert [type(m).__name__ for m in pruned] == ["Linear", "Residual", "Identity", "Residual", "Identity", "Linear"]
    torch.testing.assert_close(pruned(x), model[5](model[3](model[1](model[0](x)))))


def test_blocks_and_units_together() -> None:
    model, x = stack(), torch.randn(5, 4)
    a = depgraph.analyze(model, x)
    inner = next(g for g in a.groups if g.size == 16 and "3.fc1.weight" in [m.name for m in g.members])
    stream = next(g for g in a.groups if "0.weight" in [m.name for m in g.members])
    plan = Plan.from_keep(a, {stream.index: [0, 2, 3, 5, 7], inner.index: range(9)}, drop_blocks=[0])
    pruned, _ = apply_both(model, x, plan, a)
    assert pruned[0].out_features == 5 and pruned[3].fc1.out_features == 9 and isinstance(pruned[1], nn.Identity)


def test_a_block_sharing_its_forward_gives_the_graph_and_says_why() -> None:
    model, x = Parallel().eval(), torch.randn(3, 8)
    a = depgraph.analyze(model, x)
    assert len(a.blocks) == 2
    pruned, said = apply_both(model, x, Plan.from_keep(a, {}, drop_blocks=[1]), a)
    assert isinstance(pruned, fx.GraphModule)
    assert "prune returns a torch.fx.GraphModule, not a Parallel: removed block" in said[0]
    assert "whose forward also computes what stays" in said[0]
    both, said = apply_both(model, x, Plan.from_keep(a, {}, drop_blocks=[0, 1]), a)
    assert isinstance(both, fx.GraphModule) and said  # the root's own forward holds the sum
    torch.testing.assert_close(both(x), x)


def test_resnet18_without_two_blocks() -> None:
    model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(2, 3, 32, 32)
    a = depgraph.analyze(model, x)
    pruned, said = apply_both(model, x, Plan.from_keep(a, {0: range(40)}, drop_blocks=[0, 2]), a)
    assert isinstance(pruned, fx.GraphModule)  # BasicBlock applies relu after its sum: it stays
    assert "layer1.0: conv1, bn1, conv2, bn2" in said[0] and "(and 1 more)" in said[0]
    assert not any(n.startswith("layer1.0.conv") for n, _ in pruned.named_parameters())


def test_convnext_blocks_become_identities() -> None:
    stage = torchvision.models.convnext.CNBlockConfig
    settings = [stage(16, 32, 2), stage(32, None, 2)]
    torch.manual_seed(0)
    model, x = torchvision.models.ConvNeXt(settings, num_classes=5).eval(), torch.randn(2, 3, 32, 32)
    a = depgraph.analyze(model, x)
    assert [b.name for b in a.blocks] == ["features.1.0", "features.1.1", "features.3.0", "features.3.1"]
    pruned, said = apply_both(model, x, Plan.from_keep(a, {}, drop_blocks=[1, 2]), a)
    assert said == [] and type(pruned) is torchvision.models.ConvNeXt
    assert isinstance(pruned.features[1][1], nn.Identity) and isinstance(pruned.features[3][0], nn.Identity)


def test_vision_transformer_layer_goes_when_both_its_blocks_do() -> None:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(32, 8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32).eval()
    x = torch.randn(2, 3, 32, 32)
    a = depgraph.analyze(model, x)
    assert [b.modules[0].rpartition(".")[2] for b in a.blocks[:2]] == ["ln_1", "ln_2"]
    pruned, said = apply_both(model, x, Plan.from_keep(a, {}, drop_blocks=[2, 3]), a)
    assert said == [] and type(pruned) is torchvision.models.VisionTransformer
    assert isinstance(pruned.encoder.layers.encoder_layer_1, nn.Identity)
    pruned, said = apply_both(model, x, Plan.from_keep(a, {}, drop_blocks=[2]), a)
    assert isinstance(pruned, fx.GraphModule) and "encoder.layers.encoder_layer_1: ln_1, self_attention" in said[0]


def test_llama_layer_removed_keeps_the_class_generates_and_reloads(tmp_path: object) -> None:
    model = tiny_llama(layers=3)
    inputs = {"input_ids": torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))}
    a = depgraph.analyze(model, inputs)
    assert len(a.blocks) == 6
    plan = Plan.from_keep(a, {}, drop_blocks=[2, 3])  # layer 1: attention and MLP
    pruned, said = apply_both(model, inputs, plan, a)
    assert said == [] and type(pruned) is type(model)
    assert pruned.config.num_hidden_layers == 2 and len(pruned.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    assert pruned.model.layers[1].self_attn.q_proj.weight is not model.model.layers[2].self_attn.q_proj.weight
    kept, source = pruned.model.layers[1].self_attn.q_proj.weight, model.model.layers[2].self_attn.q_proj.weight
    torch.testing.assert_close(kept, source)
    generated = pruned.generate(**inputs, max_new_tokens=4, do_sample=False)
    first = pruned(**inputs).logits[0, -1].argmax()
    assert generated.shape == (1, 12) and generated[0, 8] == first
    pruned.save_pretrained(str(tmp_path))
    reloaded = type(model).from_pretrained(str(tmp_path)).eval()
    torch.testing.assert_close(reloaded(**inputs).logits, pruned(**inputs).logits)


def test_a_removed_layers_own_sizes_do_not_hold_the_config_back() -> None:
    """Layer 1 removed, layers 0 and 2 narrowed alike: the removed layer's MLP (still 48 wide in
    the analysis) does not keep ``intermediate_size`` at 48, so the pruned class is rebuilt from
    its config."""
    model = tiny_llama(layers=3)
    inputs = {"input_ids": torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))}
    a = depgraph.analyze(model, inputs)
    mlp = {g.index: range(0, 48, 2) for g in a.groups for i in (0, 2)
           if (f"model.layers.{i}.mlp.gate_proj.weight", 0) in [(m.name, m.dim) for m in g.members]}
    pruned, said = apply_both(model, inputs, Plan.from_keep(a, mlp, drop_blocks=[2, 3]), a)
    assert said == [] and type(pruned) is type(model) and pruned.config.intermediate_size == 24
    rebuilt = type(model)(pruned.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}


def test_a_config_that_does_not_count_the_layers_left_is_named() -> None:
    """A Hugging Face-style model whose config holds its layer count under a name depgraph does
    not know: with a layer removed the class runs, but its config would rebuild three layers (and
    ``from_pretrained`` fill the third with random weights), so prune says so."""
    transformers = pytest.importorskip("transformers")

    class DepthConfig(transformers.PretrainedConfig):
        model_type = "depgraph_test_depth"

        def __init__(self, depth: int = 3, width: int = 8, **kwargs: object) -> None:
            self.depth, self.width = depth, width
            super().__init__(**kwargs)

    class Residual(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.f = nn.Linear(width, width)

        def forward(self, x: Tensor) -> Tensor:
            return x + self.f(x)

    class Deep(transformers.PreTrainedModel):
        config_class = DepthConfig

        def __init__(self, config: DepthConfig) -> None:
            super().__init__(config)
            self.blocks = nn.ModuleList(Residual(config.width) for _ in range(config.depth))

        def forward(self, x: Tensor) -> Tensor:
            for block in self.blocks:
                x = block(x)
            return x

    model, x = Deep(DepthConfig()).eval(), torch.randn(2, 8)
    for tracer in ("fx", "export"):
        a = depgraph.analyze(model, x, tracer=tracer)
        with pytest.warns(UserWarning, match=r"config cannot describe its sizes.*the config builds blocks\.2\.f\."):
            pruned = depgraph.prune(model, Plan.from_keep(a, {}, drop_blocks=[1]))
        assert type(pruned) is Deep and len(pruned.blocks) == 2
        torch.testing.assert_close(pruned(x), depgraph.simulate(model, Plan.from_keep(a, {}, drop_blocks=[1]))(x))


def test_llama_attention_alone_gives_the_graph() -> None:
    model = tiny_llama(layers=2)
    inputs = {"input_ids": torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))}
    a = depgraph.analyze(model, inputs)
    mlp = next(g.index for g in a.groups if ("model.layers.1.mlp.gate_proj.weight", 0) in
               [(m.name, m.dim) for m in g.members])
    pruned, said = apply_both(model, inputs, Plan.from_keep(a, {mlp: range(20)}, drop_blocks=[0]), a)
    assert isinstance(pruned, fx.GraphModule)
    assert "removed block model.layers.0: input_layernorm, self_attn.q_proj" in said[0]


def test_nested_blocks_go_together() -> None:
    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.inner, self.post = nn.Linear(8, 8), Residual(), nn.Linear(8, 8)

        def forward(self, x: Tensor) -> Tensor:
            y = self.pre(x)
            return x + self.post(self.inner(y))

    model, x = nn.Sequential(Nested(), nn.Linear(8, 2)).eval(), torch.randn(3, 8)
    a = depgraph.analyze(model, x)
    assert [b.name for b in a.blocks] == ["0.inner", "0"]
    pruned, _ = apply_both(model, x, Plan.from_keep(a, {}, drop_blocks=[0]), a)
    assert isinstance(pruned[0].inner, nn.Identity) and isinstance(pruned[0].post, nn.Linear)
    for drop in ([1], [0, 1]):  # the outer block takes the inner one with it
        pruned, _ = apply_both(model, x, Plan.from_keep(a, {}, drop_blocks=drop), a)
        assert isinstance(pruned[0], nn.Identity)


def test_plans_with_blocks_round_trip_and_check(tmp_path: object) -> None:
    model, x = stack(), torch.randn(2, 4)
    a = depgraph.analyze(model, x)
    plan = Plan.from_keep(a, {0: [1, 2, 3]}, drop_blocks=[2])
    path = f"{tmp_path}/plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded.drop == plan.drop == {2: a.blocks[2].output}
    assert "removed blocks: 2" in loaded.summary()
    torch.testing.assert_close(depgraph.prune(model, loaded)(x), depgraph.prune(model, plan)(x))
    other = depgraph.analyze(Parallel(), torch.zeros(1, 8))
    with pytest.raises(PlanError, match=r"drop_blocks takes indices into analysis.blocks \(0..3\)"):
        Plan.from_keep(a, {}, drop_blocks=[4])
    with pytest.raises(PlanError, match="is not a block of this analysis"):
        Plan.from_keep(a, {}, drop_blocks=[other.blocks[0]])
    loaded.drop = {2: "not_a_node"}
    with pytest.raises(PlanError, match="removes block 2 .output not_a_node., which this analysis does not have"):
        depgraph.prune(model, loaded)


def test_cost_without_blocks() -> None:
    model, x = stack(2), torch.zeros(1, 4)
    a = depgraph.analyze(model, x)
    whole = depgraph.cost(a)
    one = 8 * 16 + 16 + 16 * 8 + 8  # a residual's parameters
    without_first = depgraph.cost(a, Plan.from_keep(a, {}, drop_blocks=[0]))
    assert without_first == depgraph.Cost(whole.params - one, whole.macs - 256)
    view = depgraph.CostModel(a).without(a.blocks)
    assert view.full == whole and view.of() == depgraph.Cost(whole.params - 2 * one, whole.macs - 512)


def test_block_influence_and_loss_by_hand() -> None:
    model, x = stack(2), torch.randn(6, 4)
    a = depgraph.analyze(model, x)
    with torch.no_grad():
        s0 = model[0](x)
        y1 = model[1](s0)
        y2 = model[2](y1)
    influence = depgraph.block_importance(model, a, [x[:3], x[3:]])
    for i, (s, y) in enumerate([(s0, y1), (y1, y2)]):
        expected = (1 - F.cosine_similarity(s.double(), y.double(), dim=1)).mean().item()
        assert influence[i] == pytest.approx(expected, rel=1e-6)  # float32 batches of 3 vs 6

    def loss(out: Tensor, batch: Tensor) -> Tensor:
        return out.pow(2).mean()

    scores = depgraph.block_importance(model, a, [x], kind="loss", loss=loss)
    with torch.no_grad():
        base = loss(model(x), x)
        without_first = loss(model[3](model[2](s0)), x)
    assert scores[0] == pytest.approx(float(without_first - base), rel=1e-5)
    with pytest.raises(InputError, match="kind must be one of influence, loss"):
        depgraph.block_importance(model, a, [x], kind="cosine")


def test_llama_block_influence_and_loss_from_labels() -> None:
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    a = depgraph.analyze(model, {"input_ids": ids[:1]})
    batches = [{"input_ids": ids, "labels": ids}]
    influence = depgraph.block_importance(model, a, batches)
    assert sorted(influence) == [0, 1, 2, 3] and all(0 < v < 1 for v in influence.values())
    scores = depgraph.block_importance(model, a, batches, kind="loss")
    evaluate = depgraph.calibration_loss(model, batches)
    base = model(input_ids=ids, labels=ids).loss.item()
    assert evaluate(Plan.from_keep(a, {})) == pytest.approx(base, rel=1e-5)
    assert scores[3] == pytest.approx(evaluate(Plan.from_keep(a, {}, drop_blocks=[3])) - base, abs=1e-5)


@pytest.mark.filterwarnings("ignore:target macs=0.5 landed")
def test_solve_with_depth_picks_what_evaluate_prefers() -> None:
    model, x = stack(4), torch.randn(8, 4)
    a = depgraph.analyze(model, x)
    scores = {0: 0.4, 1: 0.1, 2: 0.3, 3: 0.2}
    goal = 0.4 * depgraph.cost(a).params  # 1187 parameters, 280 per block: two blocks stay above it, three not
    deep = depgraph.solve(a, target={"params": 0.4}, depth=scores, evaluate=lambda p: -len(p.drop))
    assert list(deep.drop) == [1, 3] and depgraph.cost(a, deep).params <= goal
    wide = depgraph.solve(a, target={"params": 0.4}, depth=scores, evaluate=lambda p: len(p.drop))
    assert wide.drop == {} and depgraph.cost(a, wide).params <= goal
    evaluate = depgraph.calibration_loss(model, [x], loss=lambda out, _: out.pow(2).mean())
    chosen = depgraph.solve(a, target={"macs": 0.5}, depth=True, evaluate=evaluate)
    assert depgraph.cost(a, chosen).macs <= 0.5 * depgraph.cost(a).macs
    apply_both(model, x, chosen, a)


def test_depth_errors_name_the_fix() -> None:
    model, x = stack(2), torch.zeros(1, 4)
    a = depgraph.analyze(model, x)
    with pytest.raises(InputError, match="pass evaluate="):
        depgraph.solve(a, target={"params": 0.7}, depth=True)
    with pytest.raises(InputError, match="depth= goes with target="):
        depgraph.solve(a, 0.5, depth=True)
    with pytest.raises(InputError, match="depth= scores blocks \\[7\\]"):
        depgraph.solve(a, target={"params": 0.7}, depth={7: 1.0}, evaluate=lambda p: 0.0)
    plain = depgraph.analyze(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), x)
    with pytest.raises(InputError, match="found no removable blocks"):
        depgraph.solve(plain, target={"params": 0.7}, depth=True, evaluate=lambda p: 0.0)


def test_composed_plans_carry_removed_blocks() -> None:
    model, x = stack(4), torch.randn(3, 4)
    a = depgraph.analyze(model, x)
    first = Plan.from_keep(a, {0: range(6)}, drop_blocks=[1])
    small = depgraph.prune(model, first)
    b = depgraph.analyze(small, x)
    assert [blk.name for blk in b.blocks] == ["1", "3", "4"]
    second = Plan.from_keep(b, {0: [0, 2, 3, 5]}, drop_blocks=[2])  # the original block 3
    both = depgraph.compose(a, first, b, second)
    assert both.drop == {1: a.blocks[1].output, 3: a.blocks[3].output}
    torch.testing.assert_close(depgraph.prune(model, both)(x), depgraph.prune(small, second)(x))


def test_streaming_removes_whole_layers_and_renames_the_later_ones(tmp_path: object) -> None:
    """Layer 1 of 3 removed (attention and MLP) and the other layers' MLPs narrowed, by streaming a sharded
    checkpoint: no tensor of the removed layer is written, layer 2's are named layer 1, and
    ``from_pretrained`` gives what pruning the loaded model in memory gives. A plan removing an
    attention alone is refused before anything is written (no config describes that layer)."""
    transformers = pytest.importorskip("transformers")
    src, out = f"{tmp_path}/src", f"{tmp_path}/out"
    tiny_llama(layers=3).save_pretrained(src, max_shard_size="20KB")
    meta = depgraph.stream.meta_model(src)
    a = depgraph.analyze(meta, {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta")})
    mlp = {g.index: range(0, 48, 2) for g in a.groups for i in (0, 2)
           if (f"model.layers.{i}.mlp.gate_proj.weight", 0) in [(m.name, m.dim) for m in g.members]}
    plan = Plan.from_keep(a, mlp, drop_blocks=[2, 3])  # the layers left alike: the config describes them
    with pytest.raises(PlanError, match="only part of a layer"):
        depgraph.prune_checkpoint(src, Plan.from_keep(a, {}, drop_blocks=[2]), out, analysis=a)
    assert not os.path.exists(out)
    depgraph.prune_checkpoint(src, plan, out, analysis=a)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 2 and reloaded.model.layers[1].mlp.gate_proj.out_features == 24
    with open(f"{out}/model.safetensors.index.json") as f:
        written = json.load(f)["weight_map"]
    assert not any(".layers.2." in name for name in written)
    assert sorted(written) == sorted(reloaded.state_dict())
    expected = depgraph.prune(transformers.AutoModelForCausalLM.from_pretrained(src).eval(), plan)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected(ids).logits)
    # the blocks a plan removes are part of the digest that lets a rerun resume (or refuse)
    assert depgraph.stream.plan_digest(plan) != depgraph.stream.plan_digest(Plan.from_keep(a, mlp))


def test_values_computed_from_the_branch_and_never_used_go_with_it() -> None:
    class Dead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Linear(8, 8)

        def forward(self, x: Tensor) -> Tensor:
            h = self.f(x)
            torch.sigmoid(h).std()  # computed, never read: a chain of two nodes off the branch
            return x + h

    model, x = nn.Sequential(Dead(), nn.Linear(8, 2)).eval(), torch.randn(3, 8)
    a = depgraph.analyze(model, x)
    pruned, _ = apply_both(model, x, Plan.from_keep(a, {}, drop_blocks=[0]), a)
    torch.testing.assert_close(pruned(x), model[1](x))


@pytest.mark.parametrize("name", ["mobilenet_v2", "phi3", "gpt2", "bert", "qwen2"])
def test_named_models_without_their_first_and_last_blocks(name: str) -> None:
    if name == "mobilenet_v2":
        torch.manual_seed(0)
        model, inputs = torchvision.models.mobilenet_v2(num_classes=10).eval(), torch.randn(2, 3, 32, 32)
    else:
        from test_hf import _build, _inputs

        model, inputs = _build(name), _inputs(name)[0]
    a = depgraph.analyze(model, inputs)
    gen = torch.Generator().manual_seed(3)
    keep = {g.index: torch.randperm(g.size, generator=gen)[:max(g.min_keep, g.size // 2)] for g in a.groups[:4]}
    pruned, _ = apply_both(model, inputs, Plan.from_keep(a, keep, drop_blocks=[0, len(a.blocks) - 1]), a)
    if name == "mobilenet_v2":  # an inverted residual's forward is x + conv(x): the whole module goes
        assert type(pruned) is type(model) and isinstance(pruned.features[3], nn.Identity)


def test_calibration_loss_can_recalibrate_batch_norms_first() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    a = depgraph.analyze(model, batches[0])
    plan = Plan.from_keep(a, {0: range(32)}, drop_blocks=[1])

    def loss(out: Tensor, _: Tensor) -> Tensor:
        return out.pow(2).mean()

    recalibrated = depgraph.recalibrate_batch_norm(depgraph.simulate(model, plan), batches)
    with torch.no_grad():
        expected = sum(float(loss(recalibrated(b), b)) for b in batches) / 2
        stale = sum(float(loss(depgraph.simulate(model, plan)(b), b)) for b in batches) / 2
    assert depgraph.calibration_loss(model, batches, loss=loss, batch_norm=True)(plan) == pytest.approx(expected)
    assert depgraph.calibration_loss(model, batches, loss=loss)(plan) == pytest.approx(stale)
    assert expected != pytest.approx(stale)
