"""Hugging Face transformers through the torch.export frontend.

Models are built from tiny configs with random weights (no downloads) and analyzed with
``tracer="export"`` (torch.fx cannot trace them). Group structures below were derived by
hand for the Llama config (hidden 32, 4 query heads, 2 key/value heads, head_dim 8, so
each key/value head serves ``rep = 2`` query heads; MLP intermediate 48):

- one key/value-head group per layer: pruning a kv head removes its rows of k_proj and
  v_proj, the rows of its ``rep`` query heads in q_proj and their columns in o_proj;
- the head_dim of v (with o_proj's columns in every query head) is its own group;
- the head_dim of q and k is pinned: rotary embeddings pair slot i with slot i + 4
  (rotate-half), and Hugging Face computes cos/sin under ``torch.no_grad()``, which export
  keeps as a subgraph no rule relates. When cos/sin are computed in the graph, the pairs
  form a group with the rotary frequency buffer (:class:`Rotary`);
- the query heads within a kv head (``rep``) are a group too: repeat_kv expands k and v
  to ``rep`` copies, and fewer copies (query head r of every kv head gone) is a prune;
- the MLP intermediate is a group per layer (gate and up rows, down columns);
- the hidden stream is one group; logits' vocab axis (lm_head rows) is pinned.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from equivalence import check_plan, random_keep
from test_export import ShapeGuarded
from torch import Tensor, nn

import depgraph
from depgraph import Analysis, Plan
from passes.meta import TensorMeta
from passes.rules.aten import GRAD_REGION

transformers = pytest.importorskip("transformers")
ROTARY_IN_GRAPH = int(transformers.__version__.split(".")[0]) >= 5

SMALL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 64}
IDS = (1, 8)


class Field(nn.Module):
    """A Hugging Face model called with ``use_cache=False`` (decoders), returning one field of
    its ModelOutput, so that the equivalence oracle compares ``logits`` / ``last_hidden_state``."""

    def __init__(self, model: nn.Module, field: str, **kwargs: Any) -> None:
        super().__init__()
        self.model, self.field, self.kwargs = model, field, kwargs

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self.model(x, **self.kwargs), self.field)


def _decoder(model_class: str, config_class: str, **extra: Any) -> Callable[[str], nn.Module]:
    def build(attn: str) -> nn.Module:
        config = getattr(transformers, config_class)(**SMALL, num_key_value_heads=2, **extra)
        model = getattr(transformers, model_class)._from_config(config, attn_implementation=attn)
        return Field(model, "logits", use_cache=False)
    return build


def _gpt2(attn: str) -> nn.Module:
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return Field(transformers.GPT2LMHeadModel._from_config(config, attn_implementation=attn), "logits",
                 use_cache=False)


def _bert(attn: str) -> nn.Module:
    config = transformers.BertConfig(**SMALL)
    return Field(transformers.BertModel._from_config(config, attn_implementation=attn), "last_hidden_state")


def _vit(attn: str) -> nn.Module:
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=48, num_labels=5)
    return Field(transformers.ViTForImageClassification._from_config(config, attn_implementation=attn), "logits")


MODELS: dict[str, Callable[[str], nn.Module]] = {
    "llama": _decoder("LlamaForCausalLM", "LlamaConfig"),
    "qwen2": _decoder("Qwen2ForCausalLM", "Qwen2Config"),
    "mistral": _decoder("MistralForCausalLM", "MistralConfig", sliding_window=4),
    "phi3": _decoder("Phi3ForCausalLM", "Phi3Config", pad_token_id=0),
    "gpt2": _gpt2,
    "bert": _bert,
    "vit": _vit,
}


def _inputs(name: str) -> tuple[Tensor]:
    gen = torch.Generator().manual_seed(0)
    if name == "vit":
        return (torch.randn(1, 3, 16, 16, generator=gen),)
    return (torch.randint(0, 64, IDS, generator=gen),)


def _build(name: str, attn: str = "eager") -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name](attn).eval()


def _groups(a: Analysis) -> list[tuple[int, list[tuple[str, int, list[int]]]]]:
    return [(g.size, [(m.name, m.dim, m.indices([0]).tolist()) for m in g.members]) for g in a.groups]


def _reasons(a: Analysis) -> dict[tuple[str, int], set[str]]:
    found: dict[tuple[str, int], set[str]] = {}
    for p in a.pinned:
        for m in p.members:
            found.setdefault(m, set()).add(p.reason)
    return found


# -- group structure, derived by hand ------------------------------------------------------


def test_llama_groups_kv_heads_head_dim_mlp_and_hidden_stream() -> None:
    a = depgraph.analyze(_build("llama"), _inputs("llama"), tracer="export")
    assert a.tracer == "export"
    assert a.unsupported == []
    # transformers 4.x computes rotary cos/sin under torch.no_grad, which export hides in a
    # subgraph: q/k head_dim is pinned. 5.x computes them in the graph: the rotate-half pairs
    # (slot i with slot i + hd/2, shared by every layer through inv_freq) form one more group.
    pairs = [4] if ROTARY_IN_GRAPH else []
    assert [g.size for g in a.groups] == [32, *pairs, 2, 2, 8, 48, 2, 2, 8, 48]
    layer = "model.model.layers.0"
    attn, mlp = f"{layer}.self_attn", f"{layer}.mlp"
    first = 1 + len(pairs)
    first_of_rep = [*range(8), *range(16, 24)]
    assert _groups(a)[first : first + 4] == [
        # kv head 0: k/v rows 0-7, the rows of query heads 0 and 1 (rep = 2), their o_proj columns
        (2, [(f"{attn}.q_proj.weight", 0, list(range(16))), (f"{attn}.k_proj.weight", 0, list(range(8))),
             (f"{attn}.v_proj.weight", 0, list(range(8))), (f"{attn}.o_proj.weight", 1, list(range(16)))]),
        # repeat slot 0: query heads 0 and 2, the first of each kv head's two
        (2, [(f"{attn}.q_proj.weight", 0, first_of_rep), (f"{attn}.o_proj.weight", 1, first_of_rep)]),
        # v's head_dim slot 0: in both kv heads of v_proj, in all four query heads of o_proj
        (8, [(f"{attn}.v_proj.weight", 0, [0, 8]), (f"{attn}.o_proj.weight", 1, [0, 8, 16, 24])]),
        (48, [(f"{mlp}.gate_proj.weight", 0, [0]), (f"{mlp}.up_proj.weight", 0, [0]),
              (f"{mlp}.down_proj.weight", 1, [0])]),
    ]
    hidden = {(m.name, m.dim) for m in a.groups[0].members}
    assert {("model.model.embed_tokens.weight", 1), ("model.model.norm.weight", 0), ("model.lm_head.weight", 1),
            (f"{attn}.q_proj.weight", 1), (f"{attn}.o_proj.weight", 0), (f"{mlp}.down_proj.weight", 0)} <= hidden
    reasons = _reasons(a)
    if ROTARY_IN_GRAPH:  # unit 0 of the pairs: slots 0 and 4 of every head (hd = 8)
        assert _groups(a)[1][1][:2] == [("model.model.rotary_emb.inv_freq", 0, [0]),
                                        (f"{attn}.q_proj.weight", 0, list(range(0, 32, 4)))]
    else:
        assert GRAD_REGION in reasons[(f"{attn}.q_proj.weight", 0)]  # rotary: q/k head_dim stays whole
        assert GRAD_REGION in reasons[(f"{attn}.k_proj.weight", 0)]
    assert reasons[("model.lm_head.weight", 0)] == {"axis of a model output"}


def test_phi3_fused_qkv_and_gate_up_split_like_llama() -> None:
    a = depgraph.analyze(_build("phi3"), _inputs("phi3"), tracer="export")
    attn, mlp = "model.model.layers.0.self_attn", "model.model.layers.0.mlp"
    q, k, v = list(range(16)), list(range(32, 40)), list(range(48, 56))  # qkv rows: q 0-31, k 32-47, v 48-63
    first_of_rep = [*range(8), *range(16, 24)]
    assert _groups(a)[1:5] == [
        (2, [(f"{attn}.qkv_proj.weight", 0, q + k + v), (f"{attn}.o_proj.weight", 1, list(range(16)))]),
        (2, [(f"{attn}.qkv_proj.weight", 0, first_of_rep), (f"{attn}.o_proj.weight", 1, first_of_rep)]),
        (8, [(f"{attn}.qkv_proj.weight", 0, [48, 56]), (f"{attn}.o_proj.weight", 1, [0, 8, 16, 24])]),
        (48, [(f"{mlp}.gate_up_proj.weight", 0, [0, 48]), (f"{mlp}.down_proj.weight", 1, [0])]),
    ]


def test_gpt2_heads_through_conv1d_and_fused_c_attn() -> None:
    a = depgraph.analyze(_build("gpt2"), _inputs("gpt2"), tracer="export")
    attn = "model.transformer.h.0.attn"
    heads = [i for part in (0, 32, 64) for i in range(part, part + 8)]  # head 0 of q, k and v
    assert (4, [(f"{attn}.c_attn.bias", 0, heads), (f"{attn}.c_attn.weight", 1, heads),
                (f"{attn}.c_proj.weight", 0, list(range(8)))]) in _groups(a)


# -- simulate equals prune -------------------------------------------------------------------

CASES = [(name, "eager") for name in MODELS] + [("llama", "sdpa"), ("gpt2", "sdpa")]


@pytest.mark.parametrize(("name", "attn"), CASES)
def test_simulate_equals_prune(name: str, attn: str) -> None:
    model, inputs = _build(name, attn), _inputs(name)
    a = depgraph.analyze(model, inputs, tracer="export")
    assert a.unsupported == []
    pruned, _ = check_plan(model, inputs, Plan.from_keep(a, random_keep(a, seed=1)))
    with torch.no_grad():
        assert pruned(*inputs).shape == model(*inputs).shape


def test_keyword_inputs_are_recorded_saved_and_applied(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMALL, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    kwargs = {"input_ids": _inputs("llama")[0], "use_cache": False}
    a = depgraph.analyze(model, kwargs, tracer="export")
    kv, mlp = (next(g.index for g in a.groups if g.size == n) for n in (2, 48))
    plan = Plan.from_keep(a, {0: [0, 3, 5, 9, 20, 31], kv: [1], mlp: list(range(0, 48, 3))})
    assert plan.inputs == ()
    assert plan.keywords == {"input_ids": TensorMeta((1, 8), torch.int64), "use_cache": False}
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.keywords == plan.keywords
    # a kv head pruned in layer 0 only: the config (one size for every layer) cannot say so
    with torch.no_grad(), pytest.warns(UserWarning, match="its config cannot describe its sizes"):
        simulated, pruned = depgraph.simulate(model, loaded)(**kwargs), depgraph.prune(model, loaded)(**kwargs)
    assert isinstance(pruned, transformers.modeling_outputs.CausalLMOutputWithPast)
    assert pruned.logits.shape == (1, 8, 64)
    scale = simulated.logits.abs().max().item()
    assert (pruned.logits - simulated.logits).abs().max().item() <= 1e-4 * scale


# -- rotary embeddings computed in the graph: head_dim pairs ---------------------------------


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Attention with rotary embeddings whose cos/sin are computed in the graph."""

    def __init__(self, dim: int = 16, heads: int = 2, head_dim: int = 8) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q, self.k, self.v = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.o = nn.Linear(heads * head_dim, dim)
        inv_freq = 1.0 / 100 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        freqs = torch.arange(n, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        q, k, v = (p(x).view(b, n, self.heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        att = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim**-0.5, dim=-1) @ v
        return self.o(att.transpose(1, 2).reshape(b, n, -1))


def test_rotary_keeps_head_dim_pairs_with_their_frequency() -> None:
    torch.manual_seed(0)
    model, x = ShapeGuarded(Rotary()).eval(), torch.randn(1, 5, 16)
    a = depgraph.analyze(model, x, tracer="export")
    # slot 0 of q/k goes with slot 4 (its rotate-half pair) in both heads, and with inv_freq[0]
    pairs = [0, 4, 8, 12]
    assert _groups(a)[0] == (4, [("model.inv_freq", 0, [0]), ("model.q.weight", 0, pairs),
                                 ("model.q.bias", 0, pairs), ("model.k.weight", 0, pairs),
                                 ("model.k.bias", 0, pairs)])
    check_plan(model, (x,), Plan.from_keep(a, {0: [1, 3], 2: [2, 5, 6]}))


def test_a_llama_built_on_the_meta_device_has_the_groups_of_a_real_one() -> None:
    # export cannot run Hugging Face's rotary embedding on meta tensors (it opens an autocast
    # region for device "meta"); the frontend exports meta models as fake CPU tensors instead
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    real = LlamaForCausalLM(cfg).eval()
    with torch.device("meta"):
        meta = LlamaForCausalLM(cfg).eval()
    ids = torch.zeros(1, 8, dtype=torch.long)

    def groups(model: torch.nn.Module, x: torch.Tensor) -> list:
        a = depgraph.analyze(model, {"input_ids": x, "use_cache": False}, tracer="export")
        return [(g.size, [(m.name, m.dim, m.indices([0]).tolist()) for m in g.members]) for g in a.groups]

    expected = groups(real, ids)
    assert len(expected) == (10 if ROTARY_IN_GRAPH else 9) and groups(meta, ids.to("meta")) == expected
    assert all(p.is_meta for p in meta.parameters())


def test_tied_embeddings_analyze_on_meta_as_on_real_tensors() -> None:
    # exported on meta, the tied weight may be named by its alias (lm_head.weight): the
    # analysis must still see one tensor, with the groups of the real model
    config = transformers.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True)
    real = transformers.LlamaForCausalLM(config).eval()
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(config).eval()
    ids = torch.zeros(1, 8, dtype=torch.long)
    on_real = depgraph.analyze(real, {"input_ids": ids, "use_cache": False}, tracer="export")
    on_meta = depgraph.analyze(meta, {"input_ids": ids.to("meta"), "use_cache": False}, tracer="export")
    assert on_meta.fingerprint == on_real.fingerprint
    assert not any(m.name == "lm_head.weight" for g in on_meta.groups for m in g.members)
