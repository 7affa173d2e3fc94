"""Pruning through torch.export or the recording tracer keeps the model's own class where its
forward can run with the pruned sizes (module attributes and Hugging Face configs updated), so
the pruned model runs at any input shape; where it cannot, prune returns the rewritten graph.

Every test compares the kept class against ``simulate`` on inputs of another shape than the
analysis saw: the graph could not run there, the class must, and compute the same thing.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from equivalence import check_plan
from test_export import ShapeGuarded
from test_hf import MODELS, SMALL, Field
from torch import Tensor, fx, nn

import depgraph
from depgraph import Analysis, Plan


def _close(a: Tensor, b: Tensor) -> None:
    scale = b.abs().max().item()
    assert scale > 0 and (a - b).abs().max().item() <= 1e-4 * scale


def _same_at(model: nn.Module, pruned: nn.Module, keep: dict[int, Any], inputs: Any, tracer: str) -> None:
    """``pruned`` equals ``simulate(model)`` under ``keep``, analyzed again at ``inputs``."""
    kwargs = inputs if isinstance(inputs, dict) else {}
    args = () if kwargs else inputs
    plan = Plan.from_keep(depgraph.analyze(model, inputs, tracer=tracer), keep)
    with torch.no_grad():
        _close(_tensor(pruned(*args, **kwargs)), _tensor(depgraph.simulate(model, plan)(*args, **kwargs)))


def _tensor(y: Any) -> Tensor:
    return y if isinstance(y, Tensor) else y.logits


def _halves(a: Analysis, skip: int) -> dict[int, list[int]]:
    """Every second unit of every group, but head_dim stays whole: groups of size ``skip``, and
    the rotary pairs of q/k head_dim (with ``inv_freq``; found when transformers 5 computes
    cos/sin in the graph)."""
    def head_dim(g: Any) -> bool:
        return g.size == skip or any(m.name.endswith("inv_freq") for m in g.members)
    return {g.index: list(range(0, g.size, 2)) for g in a.groups if not head_dim(g)}


# -- Hugging Face ----------------------------------------------------------------------------


def _llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMALL, num_key_value_heads=2)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


def test_pruned_llama_keeps_its_class_and_a_config_that_rebuilds_it() -> None:
    model = _llama()
    a = depgraph.analyze(model, {"input_ids": torch.ones(1, 8, dtype=torch.long), "use_cache": False})
    # hidden 32 -> 16, one of two kv heads per layer and one of its two query heads, MLP 48 -> 24
    keep = _halves(a, skip=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the config describes the pruned model: no warning
        pruned = depgraph.prune(model, Plan.from_keep(a, keep))
    assert type(pruned) is type(model)
    c = pruned.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (
        16, 1, 1, 8, 24)
    assert pruned.model.layers[0].self_attn.num_key_value_groups == 1
    assert model.config.num_attention_heads == 4  # the caller's model and config are unchanged
    rebuilt = type(model)._from_config(c)
    rebuilt.load_state_dict(pruned.state_dict())  # strict: every shape matches
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    _same_at(model, pruned, keep, {"input_ids": ids, "use_cache": False}, "export")
    out = pruned.generate(ids[:1, :5], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)  # with its key/value cache, at lengths the analysis never saw


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_hugging_face_model_keeps_its_class_when_head_dim_is_kept(name: str) -> None:
    torch.manual_seed(0)
    field = MODELS[name]("eager").eval()
    model = field.model
    pixel = name == "vit"
    x = torch.randn(1, 3, 16, 16) if pixel else torch.randint(0, 64, (1, 8))
    key = "pixel_values" if pixel else "input_ids"
    extra = {} if name in ("bert", "vit") else {"use_cache": False}
    a = depgraph.analyze(model, {key: x, **extra}, tracer="export")
    keep = _halves(a, skip=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT2, BERT, ViT: no head_dim in the config (next test)
        pruned = depgraph.prune(model, Plan.from_keep(a, keep))
    assert type(pruned) is type(model)
    other = torch.randn(2, 3, 16, 16) if pixel else torch.randint(0, 64, (2, 11))
    inputs = {key: other, **extra}
    plan = Plan.from_keep(depgraph.analyze(model, inputs, tracer="export"), keep)
    with torch.no_grad():
        got, want = pruned(**inputs), depgraph.simulate(model, plan)(**inputs)
    _close(getattr(got, field.field), getattr(want, field.field))
    if name in ("llama", "qwen2", "mistral", "phi3"):  # configs with (or given) head_dim describe the sizes
        with torch.device("meta"):
            rebuilt = type(model)._from_config(pruned.config).state_dict()
        assert {k: t.shape for k, t in rebuilt.items()} == {k: t.shape for k, t in pruned.state_dict().items()}


def test_a_config_that_cannot_describe_the_pruned_model_gives_a_warning() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager").eval()
    a = depgraph.analyze(model, {"input_ids": torch.ones(1, 8, dtype=torch.long), "use_cache": False})
    heads = [g.index for g in a.groups if g.size == 4]
    # 2 of 4 heads of width 8 in a hidden stream of 32: GPT2's config derives head_dim = 32 / 2
    with pytest.warns(UserWarning, match=r"^the pruned GPT2LMHeadModel runs, but its config cannot describe its "
                      r"sizes, so rebuilding it from the config fails \(6 parameters differ; transformer.h.0.attn"):
        pruned = depgraph.prune(model, Plan.from_keep(a, {i: [0, 3] for i in heads}))
    assert type(pruned) is type(model) and pruned.transformer.h[0].attn.split_size == 16


def test_a_forward_that_cannot_take_the_pruned_sizes_gives_the_graph() -> None:
    model = _llama()
    kwargs = {"input_ids": torch.ones(1, 8, dtype=torch.long), "use_cache": False}
    a = depgraph.analyze(model, kwargs)
    v_head_dim = next(g.index for g in a.groups if g.size == 8)
    # v's head_dim shrinks, q's and k's cannot (rotary): one head_dim attribute cannot say both
    plan = Plan.from_keep(a, {v_head_dim: [0, 1, 2, 5]})
    pruned = depgraph.prune(model, plan)
    assert isinstance(pruned, fx.GraphModule)
    check_plan(Field(model, "logits", use_cache=False), (kwargs["input_ids"],),
               Plan.from_keep(depgraph.analyze(Field(model, "logits", use_cache=False), kwargs["input_ids"]),
                              {v_head_dim: [0, 1, 2, 5]}))


# -- plain modules through export and recording ---------------------------------------------


def test_exported_convolutions_get_their_channels_and_groups_and_batch_norm_keeps_its_statistics() -> None:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                         nn.Conv2d(8, 4, 1))
    model = ShapeGuarded(body).train()  # batch norm in training mode: checking prune must not update it
    a = depgraph.analyze(model, torch.randn(2, 3, 6, 6), tracer="export")
    assert [g.size for g in a.groups] == [8]
    keep = {0: [1, 2, 6]}
    pruned = depgraph.prune(model, Plan.from_keep(a, keep))
    assert type(pruned) is ShapeGuarded
    conv, bn, depthwise = pruned.model[0], pruned.model[1], pruned.model[3]
    assert (conv.out_channels, bn.num_features, depthwise.in_channels, depthwise.groups) == (3, 3, 3, 3)
    assert torch.equal(bn.running_mean, body[1].running_mean[keep[0]])
    assert torch.equal(bn.running_var, body[1].running_var[keep[0]])
    model.eval(), pruned.eval()
    _same_at(model, pruned, keep, (torch.randn(3, 3, 10, 7),), "export")


class ValueGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.fc(x))) if x.sum() > 0 else x[..., :2]


def test_a_recorded_model_keeps_its_class_where_its_branches_run_alike() -> None:
    torch.manual_seed(0)
    model, x = ValueGate(), torch.ones(2, 4)
    a = depgraph.analyze(model, x)
    assert a.tracer == "record"
    pruned = depgraph.prune(model, Plan.from_keep(a, {0: [0, 4]}))
    assert type(pruned) is ValueGate and (pruned.fc.out_features, pruned.out.in_features) == (2, 2)
    _same_at(model, pruned, {0: [0, 4]}, (torch.full((5, 4), 0.5),), "record")


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(8, 8), nn.Linear(8, 5)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0])


def test_an_exported_multihead_attention_is_replaced_when_head_dim_is_kept() -> None:
    torch.manual_seed(0)
    model, x = ShapeGuarded(SelfAttention()).eval(), torch.randn(2, 3, 8)
    a = depgraph.analyze(model, x, tracer="export")
    # ATen exposes head_dim (4) as a group too; prune keeps the class only while it stays whole
    assert [g.size for g in a.groups] == [8, 2, 4, 8]
    keep = {0: [1, 2, 5], 1: [1], 3: [0, 3, 4]}
    pruned = depgraph.prune(model, Plan.from_keep(a, keep))
    attn = pruned.model.attn
    assert type(pruned) is ShapeGuarded and type(attn).__name__ == "PrunedMultiheadAttention"
    assert (attn.embed_dim, attn.num_heads, attn.head_dim) == (3, 1, 4)
    _same_at(model, pruned, keep, (torch.randn(4, 7, 8),), "export")
    assert isinstance(depgraph.prune(model, Plan.from_keep(a, {**keep, 2: [0, 1]})), fx.GraphModule)
