"""Real models that once broke the promise outside the example input (issue "Never silently
wrong"): train-only branches, functional grouped convs, cached derived tensors, exported
graphs fixed to one batch size, a Hugging Face decoder called with its default cache.

Every model is built with random weights; each test prunes with a plan that removes about
half of every group and compares prune with simulate at inputs the analysis never saw.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import depgraph

timm = pytest.importorskip("timm")


def half(a: depgraph.Analysis) -> depgraph.Plan:
    """Every other unit of every group (more where a group must keep more)."""
    return depgraph.Plan.from_keep(a, {g.index: list(range(0, g.size, 2)) if g.size >= 2 * g.min_keep - 1
                                       else list(range(g.min_keep)) for g in a.groups})


def assert_agree(pruned: nn.Module, simulated: nn.Module, x: Any) -> None:
    with torch.no_grad():
        p, s = pruned(x), simulated(x)
    p, s = (p.logits, s.logits) if hasattr(p, "logits") else (p, s)
    scale = max(s.abs().max().item(), 1e-3)
    assert (p - s).abs().max().item() <= 1e-4 * scale


@pytest.mark.parametrize(("name", "size"), [("googlenet", 96), ("inception_v3", 299)])
def test_auxiliary_heads_run_only_in_training_are_pruned_in_step(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, aux_logits=True, init_weights=False).eval()
    x = torch.randn(1, 3, size, size)
    a = depgraph.analyze(model, x)
    assert any("train mode" in note for note in a.notes)
    pruned = depgraph.prune(model, half(a))
    assert type(pruned) is type(model)
    assert_agree(pruned, depgraph.simulate(model, half(a)), torch.randn(2, 3, size, size))
    outputs = pruned.train()(torch.randn(2, 3, size, size))  # the auxiliary heads run: they fit the pruned trunk
    sum(o.sum() for o in outputs if o is not None).backward()
    assert all(p.grad is not None for p in pruned.parameters())


def test_weight_standardized_convs_of_nfnet() -> None:
    torch.manual_seed(0)
    model = timm.create_model("nfnet_l0", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    a = depgraph.analyze(model, x)
    pruned, simulated = depgraph.prune(model, half(a)), depgraph.simulate(model, half(a))
    assert_agree(pruned, simulated, torch.randn(2, 3, 64, 64))  # a graph: ScaledStdConv2d's groups is a literal


@pytest.mark.parametrize("name", ["levit_128s", "efficientformer_l1"])
def test_models_that_cache_attention_biases(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model(x)  # fills the attention-bias caches
    caches = {n: dict(m.attention_bias_cache) for n, m in model.named_modules() if hasattr(m, "attention_bias_cache")}
    a = depgraph.analyze(model, x)
    plan = half(a)
    pruned, simulated = depgraph.prune(model, plan), depgraph.simulate(model, plan)
    after = {n: dict(m.attention_bias_cache) for n, m in model.named_modules() if hasattr(m, "attention_bias_cache")}
    assert after.keys() == caches.keys() and all(after[n].keys() == caches[n].keys() for n in caches)
    assert_agree(pruned, simulated, torch.randn(2, 3, 224, 224))


@pytest.mark.parametrize(("name", "size"), [("vgg11_bn", 64), ("tf_efficientnet_lite0", 64), ("mobilevit_xxs", 64),
                                            ("crossvit_tiny_240", 240)])
def test_exported_models_run_at_another_batch_size(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    a = depgraph.analyze(model, torch.randn(1, 3, size, size))
    assert a.tracer == "export"
    pruned, simulated = depgraph.prune(model, half(a)), depgraph.simulate(model, half(a))
    assert_agree(pruned, simulated, torch.randn(3, 3, size, size))


def test_a_hugging_face_decoder_with_its_default_cache() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    a = depgraph.analyze(model, torch.randint(0, 64, (1, 8)))  # use_cache left at its default
    assert a.tracer == "export" and any("use_cache=False" in note for note in a.notes)
    plan = depgraph.solve(a, 0.5)
    pruned, simulated = depgraph.prune(model, plan), depgraph.simulate(model, plan)
    for shape in [(1, 8), (3, 5), (2, 12)]:
        assert_agree(pruned, simulated, torch.randint(0, 64, shape))


def test_no_tracer_error_is_ever_without_a_reason() -> None:
    class Opaque(nn.Module):
        def forward(self, x: torch.Tensor) -> Any:
            return {int(v) for v in x}  # nothing any frontend can turn into a graph

    with pytest.raises(depgraph.TraceError) as error:
        depgraph.analyze(Opaque(), torch.zeros(2, 3), tracer="auto")
    reasons = str(error.value).split("\n- ")[1:]
    assert len(reasons) == 3 and all(r.strip() for r in reasons)
