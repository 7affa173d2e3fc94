"""Coverage of ``depgraph`` and Torch-Pruning over Hugging Face models and a Llama/Qwen sweep.

Run::

    python benchmarks/hf_coverage.py                    # everything, writes results/hf_coverage.md
    python benchmarks/hf_coverage.py --models llama,gpt2 --out /tmp/hf.md   # a subset by name

Models are built with random weights (``torch.manual_seed(0)``, eager attention, eval mode)
from the tiny configs of ``tests/test_hf.py`` (vocab 64, hidden 32, MLP 48, 2 layers, 4
heads, 2 key/value heads; GPT-2 and ViT with the same sizes), plus a sweep of Llama- and
Qwen2-style configurations over layers, query heads, key/value heads (1 = multi-query, equal
to the query heads = multi-head, else grouped-query) and tied input/output embeddings.
Decoders take ``{"input_ids": ids, "use_cache": False}`` with ``ids`` of shape ``(1, 8)``,
BERT ``{"input_ids": ids}``, ViT ``{"pixel_values": x}`` with ``x`` of shape ``(1, 3, 16, 16)``.

depgraph columns: ``depgraph.analyze(model, inputs, tracer="export")`` (analyzed, number of
groups, unsupported ops), then a random plan keeping a random ``ceil(n / 2)`` of the ``n``
units of every group, ``depgraph.prune`` and ``depgraph.simulate``, run on other inputs of
the same shape (a different seed); *equivalent* when ``max |y_pruned - y_simulated| <= 1e-4 x
max |y_simulated|`` on the model's ``logits`` (``last_hidden_state`` for BERT). Seconds cover
the build, analysis, plan, prune, simulate and forwards.

*own class, other shape (head_dim whole)*: a second plan keeps half of every group's units
but head_dim's (the groups whose size is the head width, or that hold a rotary ``inv_freq``:
one ``head_dim`` attribute cannot describe a value head_dim pruned apart from q/k's);
``yes`` when ``depgraph.prune`` returns the model's own class and its output equals
``simulate``'s (same tolerance) on inputs of another shape (batch 2, length 11), the plan
re-applied to an analysis at that shape. *config rebuilds it*: the pruned model's config
builds (on the meta device) parameters of the pruned model's shapes.

Torch-Pruning columns, on a fresh copy of the same model and the same inputs:
``tp.DependencyGraph().build_dependency`` (built, and the number of groups of
``get_all_groups(root_module_types=[nn.Linear, nn.Conv2d])``), then
``tp.pruner.MagnitudePruner`` (L2 magnitude, ``pruning_ratio=0.5``, ``ignored_layers`` = the
``lm_head`` or classifier) set up as Torch-Pruning's own LLM example does: ``num_heads`` maps
every separate query projection to the query heads and every key/value projection to the
key/value heads, with ``prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5``
(fused projections, GPT-2's ``c_attn`` and Phi-3's ``qkv_proj``, get no entry: Torch-Pruning
has no way to say where their parts start). *pruned + forward* is ``yes`` when ``step()``
returns and the pruned model then runs forward on the inputs; *output kept* says whether its
output still has the original shape. Torch-Pruning gets at most ``TP_TIMEOUT_S`` seconds per
model (it is reported to hang on grouped-query Llama); errors are recorded with their
first line.

Every model runs in its own forked process: depgraph's columns first, then Torch-Pruning's,
so a timeout or a crash of Torch-Pruning only empties its own columns. Prints the markdown
table and the summary lines; writes it to ``--out`` (by default
``benchmarks/results/hf_coverage.md`` for a full run, nowhere for a subset).
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
import transformers
from _util import RESULTS, environment, first_line, markdown_table, receive, write
from coverage import random_plan, tp_version, unsupported_summary
from torch import Tensor, nn

import depgraph

HEADER = ["model", "config", "analyzed", "groups", "unsupported ops", "pruned", "equivalent (err / scale)",
          "params kept", "own class, other shape (head_dim whole)", "config rebuilds it", "depgraph s",
          "depgraph error", "TP graph built", "TP groups",
          "TP pruned (0.5) + forward", "TP output kept", "TP params kept", "TP s", "TP error"]
RTOL = 1e-4
"""Allowed max |prune - simulate| relative to max |simulate|."""
TP_TIMEOUT_S = 30
"""Seconds Torch-Pruning may take on one model (a tiny model takes a few when it works)."""
DEPGRAPH_TIMEOUT_S = 600
"""Seconds depgraph's columns may take on one model."""
TP_RATIO = 0.5
SMALL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 64}
"""The tiny decoder/encoder config of ``tests/test_hf.py``."""
IDS = (1, 8)
"""Shape of the token ids."""

warnings.filterwarnings("ignore", module="torch_pruning")


@dataclass(frozen=True)
class Spec:
    """One model to cover: a transformers model class, its config class and config values."""

    name: str
    model_class: str
    config_class: str
    config: dict[str, Any]

    def build(self) -> nn.Module:
        """The model with seeded random weights, eager attention, in eval mode."""
        torch.manual_seed(0)
        config = getattr(transformers, self.config_class)(**self.config)
        model_class = getattr(transformers, self.model_class)
        return model_class._from_config(config, attn_implementation="eager").eval()

    def inputs(self, seed: int, batch: int = 1, length: int = IDS[1]) -> dict[str, Any]:
        """Keyword inputs of the model (see the module docstring), drawn with ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        if self.model_class.startswith("ViT"):
            return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=gen)}
        ids = torch.randint(0, 64, (batch, length), generator=gen)
        if self.model_class == "BertModel":
            return {"input_ids": ids}
        return {"input_ids": ids, "use_cache": False}

    def describe(self) -> str:
        """The config values that differ from the defaults of the model's family, in short."""
        short = {"num_hidden_layers": "L", "num_attention_heads": "H", "num_key_value_heads": "KV",
                 "tie_word_embeddings": "tied"}
        return " ".join(f"{short.get(k, k)}={v}" for k, v in self.config.items()
                        if k in short or k not in SMALL)


def output(spec: Spec, result: Any) -> Tensor:
    """The compared field of a model's output: ``last_hidden_state`` for BERT, else ``logits``."""
    return result.last_hidden_state if spec.model_class == "BertModel" else result.logits


def decoder(name: str, model_class: str, config_class: str, **extra: Any) -> Spec:
    """A decoder of the ``tests/test_hf.py`` size (2 key/value heads unless ``extra`` says otherwise)."""
    return Spec(name, model_class, config_class, {**SMALL, "num_key_value_heads": 2, **extra})


def named_models() -> list[Spec]:
    """The Hugging Face list: BERT, GPT-2, Llama (GQA), Qwen2, Mistral, Phi-3, ViT."""
    return [
        Spec("bert", "BertModel", "BertConfig", dict(SMALL)),
        Spec("gpt2", "GPT2LMHeadModel", "GPT2Config",
             {"vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}),
        decoder("llama", "LlamaForCausalLM", "LlamaConfig"),
        decoder("qwen2", "Qwen2ForCausalLM", "Qwen2Config"),
        decoder("mistral", "MistralForCausalLM", "MistralConfig", sliding_window=4),
        decoder("phi3", "Phi3ForCausalLM", "Phi3Config", pad_token_id=0),
        Spec("vit", "ViTForImageClassification", "ViTConfig",
             {"image_size": 16, "patch_size": 4, "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 48, "num_labels": 5}),
    ]


SWEEP = [("llama", 2, 4, 1, False), ("llama", 2, 4, 4, False), ("llama", 2, 8, 2, False),
         ("llama", 4, 8, 8, True), ("llama", 4, 4, 2, True), ("qwen2", 2, 4, 1, True),
         ("qwen2", 2, 8, 8, False), ("qwen2", 4, 8, 2, False), ("qwen2", 4, 4, 4, True)]
"""(family, layers, query heads, key/value heads, tied embeddings): every value of each factor
(layers 2/4, heads 4/8, key/value heads 1/2/4/8 -- multi-query, grouped-query, multi-head --
tied on/off) in both families, not their full product (which would take an hour here)."""
FAMILIES = {"llama": ("LlamaForCausalLM", "LlamaConfig"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Config")}


def sweep() -> list[Spec]:
    """The Llama- and Qwen2-style decoders of ``SWEEP``."""
    return [decoder(f"{family}-L{layers}-H{heads}-KV{kv}{'-tied' if tied else ''}", *FAMILIES[family],
                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                    tie_word_embeddings=tied)
            for family, layers, heads, kv, tied in SWEEP]


@dataclass
class Row:
    """What the sweep found for one model."""

    spec: Spec
    analyzed: bool = False
    groups: int | str = "-"
    unsupported: str = "-"
    pruned: str = "-"
    equivalent: str = "-"
    kept: str = "-"
    seconds: str = "-"
    own: str = "-"
    rebuilds: str = "-"
    error: str = ""
    tp: list[object] = field(default_factory=lambda: ["-"] * 7)

    def cells(self) -> list[object]:
        """The row's cells, in the order of ``HEADER``."""
        return [self.spec.name, self.spec.describe(), "yes" if self.analyzed else "no", self.groups,
                self.unsupported, self.pruned, self.equivalent, self.kept, self.own, self.rebuilds, self.seconds,
                self.error, *self.tp]


def count(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def run_depgraph(spec: Spec) -> Row:
    """depgraph's columns for ``spec``: analyze, random plan, prune, simulate, compare; never raises."""
    row, start = Row(spec), time.perf_counter()
    try:
        model = spec.build()
        analysis = depgraph.analyze(model, spec.inputs(0), tracer="export")
        row.analyzed, row.groups = True, len(analysis.groups)
        row.unsupported = unsupported_summary([u.op for u in analysis.unsupported])
        plan = random_plan(analysis)
        with torch.no_grad():
            pruned, simulated = depgraph.prune(model, plan), depgraph.simulate(model, plan)
            row.pruned = "yes"
            other = spec.inputs(1)
            yp, ys = output(spec, pruned(**other)), output(spec, simulated(**other))
    except Exception as exc:  # noqa: BLE001 -- reported in the table, not raised
        row.pruned = "no" if row.analyzed and row.pruned == "-" else row.pruned
        row.error = first_line(exc, limit=200)
        row.seconds = f"{time.perf_counter() - start:.1f}"
        return row
    row.equivalent = verdict(ys, yp)
    row.kept = f"{count(pruned) / count(model):.3f}"
    try:
        own_class(spec, model, analysis, row)
    except Exception as exc:  # noqa: BLE001 -- reported in the table, not raised
        row.error = "own class: " + first_line(exc, limit=200)
    row.seconds = f"{time.perf_counter() - start:.1f}"
    return row


def verdict(ys: Tensor, yp: Tensor) -> str:
    """``yes (err / scale)`` when max |yp - ys| <= RTOL x max |ys|, else ``NO (...)``."""
    scale = ys.abs().max().item()
    err = (yp - ys).abs().max().item() / scale
    return f"{'yes' if err <= RTOL else 'NO'} ({err:.1e} / {scale:.1e})"


def own_class(spec: Spec, model: nn.Module, analysis: depgraph.Analysis, row: Row) -> None:
    """The *own class* and *config rebuilds it* cells: a plan keeping half of every group but
    head_dim's (groups of the head width's size, or holding a rotary ``inv_freq``); whether
    prune returns the model's class, and its output against simulate's on inputs of another
    shape (batch 2, length 11), the plan re-applied to an analysis at that shape; whether the
    updated config builds parameters of the pruned shapes."""
    config = model.config
    width = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    keep = {g.index: list(range(0, g.size, 2)) for g in analysis.groups
            if g.size != width and not any(m.name.endswith("inv_freq") for m in g.members)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the config cell says whether it describes the pruned model
        pruned = depgraph.prune(model, depgraph.Plan.from_keep(analysis, keep))
    if type(pruned) is not type(model):
        row.own = f"no ({type(pruned).__name__})"
        return
    other = spec.inputs(2, batch=2, length=11)
    plan = depgraph.Plan.from_keep(depgraph.analyze(model, other, tracer="export"), keep)
    with torch.no_grad():
        row.own = verdict(output(spec, depgraph.simulate(model, plan)(**other)), output(spec, pruned(**other)))
    with torch.device("meta"):
        fresh = type(model)._from_config(pruned.config).state_dict()
    own = pruned.state_dict()
    differ = sum(own[k].shape != t.shape for k, t in fresh.items() if k in own)
    row.rebuilds = "yes" if not differ else f"no ({differ} parameters differ)"


def head(model: nn.Module) -> list[nn.Module]:
    """The layer Torch-Pruning must leave alone: ``lm_head`` or ``classifier`` (none in a bare BertModel)."""
    layers = [getattr(model, n, None) for n in ("lm_head", "classifier")]
    return [m for m in layers if isinstance(m, nn.Module)]


@dataclass(frozen=True)
class Attention:
    """An attention module and its separate query projection."""

    module: nn.Module
    q: nn.Module


ATTENTIONS: dict[nn.Module, list[Attention]] = {}
"""The attention module of each key/value projection given to Torch-Pruning (one model per process)."""


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """Torch-Pruning's ``num_heads``: separate query projections map to the query heads, key/value
    projections to the key/value heads (fused projections have no entry); fills ``ATTENTIONS``."""
    config = model.config
    q_heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or q_heads
    heads: dict[nn.Module, int] = {}
    for module in model.modules():
        for q, k, v in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value")):
            if all(isinstance(getattr(module, n, None), nn.Linear) for n in (q, k, v)):
                heads[getattr(module, q)] = q_heads
                heads[getattr(module, k)] = heads[getattr(module, v)] = kv_heads
                ATTENTIONS[getattr(module, k)] = [Attention(module, getattr(module, q))]
    return heads


def run_tp(spec: Spec, send: Callable[[list[object]], None]) -> None:
    """Torch-Pruning's cells for ``spec`` (see the module docstring), sent after each stage; never raises."""
    cells: list[object] = ["-", "-", "-", "-", "-", "-", ""]
    start = time.perf_counter()

    def stage(**done: object) -> None:
        for name, value in done.items():
            cells[TP_CELLS.index(name)] = value
        cells[5] = f"{time.perf_counter() - start:.1f}"
        send(list(cells))

    try:
        model, inputs = spec.build(), spec.inputs(0)
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)
        stage(built="yes", groups=len(list(graph.get_all_groups(root_module_types=[nn.Linear, nn.Conv2d]))),
              pruned="no")
        pruned = copy.deepcopy(model)
        pruner = tp.pruner.MagnitudePruner(
            pruned, inputs, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=TP_RATIO,
            ignored_layers=head(pruned), num_heads=attention_heads(pruned), prune_num_heads=True,
            prune_head_dims=False, head_pruning_ratio=TP_RATIO)
        pruner.step()
        update_heads(pruner.num_heads)
        with torch.no_grad():
            before, after = output(spec, model(**inputs)), output(spec, pruned(**inputs))
        kept = "yes" if after.shape == before.shape else f"no ({tuple(before.shape)} -> {tuple(after.shape)})"
        stage(pruned="yes", shape=kept, kept=f"{count(pruned) / count(model):.3f}")
    except Exception as exc:  # noqa: BLE001 -- reported in the table, not raised
        stage(built="no" if cells[0] == "-" else cells[0], error=first_line(exc, limit=200))


TP_CELLS = ["built", "groups", "pruned", "shape", "kept", "seconds", "error"]
"""Names of Torch-Pruning's cells, in the order of the TP part of ``HEADER``."""


def update_heads(num_heads: dict[nn.Module, int]) -> None:
    """After a head-pruning step, set the head counts and sizes that attention modules read in their
    forward, as Torch-Pruning's Hugging Face examples do (its pruner leaves them stale)."""
    for projection, heads in num_heads.items():
        for attention in ATTENTIONS.get(projection, []):
            q_heads = num_heads[attention.q]
            values = {"num_heads": q_heads, "num_attention_heads": q_heads, "num_key_value_heads": heads,
                      "num_key_value_groups": q_heads // heads, "all_head_size": attention.q.out_features,
                      "attention_head_size": attention.q.out_features // q_heads,
                      "head_dim": attention.q.out_features // q_heads}
            for name, value in values.items():
                if hasattr(attention.module, name):
                    setattr(attention.module, name, value)


def worker(conn: Connection, spec: Spec) -> None:
    """Body of one model's process: sends depgraph's row, then Torch-Pruning's cells."""
    conn.send(run_depgraph(spec))
    run_tp(spec, conn.send)
    conn.send(None)
    conn.close()


def isolated(spec: Spec) -> Row:
    """Run :func:`worker` for ``spec`` in a forked process; a crash or a timeout becomes an error cell."""
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=worker, args=(sender, spec))
    proc.start()
    sender.close()
    row = receive(receiver, proc, DEPGRAPH_TIMEOUT_S)
    if not isinstance(row, Row):
        row = Row(spec, error=row)
    else:
        deadline = time.monotonic() + TP_TIMEOUT_S
        while (cells := receive(receiver, proc, max(deadline - time.monotonic(), 0))) is not None:
            if not isinstance(cells, list):  # timed out or died after the last stage it reported
                row.tp[5:] = [f">{TP_TIMEOUT_S}" if cells.startswith("timed") else row.tp[5], cells]
                break
            row.tp = cells
    proc.kill()
    proc.join()
    return row


def report(rows: list[Row]) -> str:
    """The markdown page: environment, table, summary lines."""
    n = len(rows)
    tps = [r.tp for r in rows]
    summary = [
        (f"depgraph: {sum(r.analyzed for r in rows)}/{n} analyzed, "
        f"{sum(r.unsupported == '0' for r in rows)}/{n} with no unsupported op, "
        f"{sum(r.pruned == 'yes' for r in rows)}/{n} pruned and simulated, "
        f"{sum(r.equivalent.startswith('yes') for r in rows)}/{n} equivalent "
        f"(max |prune - simulate| <= {RTOL:g} x max |simulate|); with head_dim kept whole, "
        f"{sum(r.own.startswith('yes') for r in rows)}/{n} pruned models keep their class and equal simulate "
        f"at another input shape, {sum(r.rebuilds == 'yes' for r in rows)}/{n} have a config that rebuilds them."),
        (f"Torch-Pruning {tp_version()}: {sum(c[0] == 'yes' for c in tps)}/{n} dependency graphs built, "
        f"{sum(c[2] == 'yes' for c in tps)}/{n} pruned at {TP_RATIO:g} and ran forward, "
        f"{sum(c[3] == 'yes' for c in tps)}/{n} with the output shape kept, "
        f"{sum(str(c[6]).startswith('timed out') for c in tps)}/{n} timed out (> {TP_TIMEOUT_S} s)."),
    ]
    return "\n\n".join([
        "# depgraph and Torch-Pruning coverage: Hugging Face models",
        environment() + f" transformers {transformers.__version__}.",
        markdown_table(HEADER, [r.cells() for r in rows]),
        *summary,
    ])


def main() -> None:
    """Parse arguments, run the sweep, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated subset of the model names (see the table)")
    parser.add_argument("--out", type=Path, help="markdown file to write (default: results/hf_coverage.md "
                        "for a full run, none for a subset)")
    args = parser.parse_args()
    specs = named_models() + sweep()
    if args.models:
        wanted = args.models.split(",")
        specs = [s for s in specs if s.name in wanted]
    rows = []
    for spec in specs:
        rows.append(isolated(spec))
        print(" | ".join(str(c) for c in rows[-1].cells()), flush=True)
    text = report(rows)
    print(text)
    out = args.out or (None if args.models else RESULTS / "hf_coverage.md")
    if out:
        write(out, text)


if __name__ == "__main__":
    main()
