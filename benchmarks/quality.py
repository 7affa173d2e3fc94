"""Pruning quality: depgraph against Torch-Pruning 1.6.1 on two small models trained here.

Run::

    python benchmarks/quality.py                        # both tasks, MACs targets 0.5 and 0.3
    python benchmarks/quality.py --quick                # tiny settings: a smoke run (about 2 minutes)
    python benchmarks/quality.py --tasks images --targets 0.5 --out /tmp/quality.md
    python benchmarks/quality.py --kinds depth,sparse    # only some rows (width, depth, sparse, tp)

Two tasks, each trained once and cached under ``/tmp/quality-cache/`` (keyed by a hash of
its settings; without the cache the script trains):

- ``images``: scikit-learn's ``load_digits`` (1,797 8x8 images) upscaled to 32x32, a fixed
  stratified split (1,437 train / 360 test), a residual CNN (stem, a basic residual block,
  depthwise-separable residual blocks, two-branch concat blocks with a residual add, global
  pooling, a linear classifier); the metric is test accuracy.
- ``text``: a decoder-only transformer (grouped-query attention with 4 query and 2 key/value
  heads of width 32, RMSNorm, rotary position embeddings, a SwiGLU MLP) trained as a
  character-level language model on the standard library's own ``*.py`` files (every tenth
  file, by name, held out); the metric is the test cross-entropy in nats per character.

For each task and MACs target (the fraction of the model's MACs kept), every pruned model is
counted with the same counter (``depgraph.cost(depgraph.analyze(pruned, example))``), evaluated,
fine-tuned with the same optimizer, steps and data order, and evaluated again:

- depgraph: ``solve(analyze(model, example), target={"macs": f}, importance=criterion)`` then
  ``prune``; criteria ``l1``, ``l2``, ``gradient_importance`` (Taylor, Hessian) and, where the
  package has it, ``activation_importance`` (activation, fluctuation). Images: the pruned model's
  batch norms are recalibrated (``recalibrate_batch_norm``) before it is evaluated. Where
  ``solve`` takes ``strategy=``, the same calls also run with ``strategy="uniform"`` and
  ``strategy="cost"`` (the default, ``"importance"``, ranks units by normalized importance).
- depgraph, depth (the models' removable blocks, ``analysis.blocks``): "depth only" removes blocks in
  order of ascending Block Influence (``block_importance(..., kind="influence")``) until the MACs are
  at most the target; "depth+width" is ``solve(..., target={"macs": f}, importance=c,
  depth=influence, evaluate=calibration_loss(model, calibration, loss=...))``.
- depgraph, sparse training: the trained model trained again for the fine-tuning number of steps on
  loss + lambda * ``GroupRegularizer(analysis, kind="group_lasso", by_cost=True)`` (lambda from a small
  sweep scored on calibration data, see ``Settings.sparse_rhos``), then ``solve(..., importance="l2")``
  and ``prune``; and the control, the same steps with lambda = 0.
- Torch-Pruning: ``tp.pruner.BasePruner`` (``MagnitudePruner`` is its deprecated alias) with
  ``MagnitudeImportance`` (p=1, p=2), ``TaylorImportance`` and ``HessianImportance``, one uniform
  ``pruning_ratio`` found by bisection so that the measured MACs land on the target.

Writes ``--out`` (default ``benchmarks/results/quality.md``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import hashlib
import inspect
import itertools
import json
import math
import platform
import re
import string
import subprocess
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from _util import RESULTS, markdown_table, write
from torch import nn

import depgraph

CACHE = Path("/tmp/quality-cache")
TARGETS = (0.5, 0.3)
SEED = 0

warnings.filterwarnings("ignore", module="torch_pruning")

Batch = tuple[torch.Tensor, torch.Tensor]
"""Inputs and labels (class indices, or the next characters)."""
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(output, labels)``, a scalar tensor."""


def log(message: str) -> None:
    """Progress, with the time, on stderr."""
    print(f"[{datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Training, calibration and fine-tuning sizes of both tasks (``quick()`` shrinks them)."""

    image_width: int = 16
    image_epochs: int = 20
    image_lr: float = 3e-3
    image_finetune_epochs: int = 2
    text_width: int = 128
    text_layers: int = 3
    text_mlp: int = 320
    text_steps: int = 2000
    text_lr: float = 3e-3
    text_finetune_steps: int = 300
    text_batch: int = 16
    context: int = 128
    eval_windows: int = 256
    batch: int = 64
    calibration_batches: int = 8
    finetune_lr: float = 1e-3
    bisection_steps: int = 12
    strategies: tuple[str, ...] = ("importance", "uniform", "cost")
    """depgraph's ``solve(..., strategy=)`` values to run, where ``solve`` has that parameter; the
    first is its default and is labelled plain "depgraph"."""
    depth_criteria: tuple[str, ...] = ("l2", "activation")
    """Width criteria of the depth+width rows (``solve(..., depth=influence, evaluate=...)``)."""
    sparse_rhos: tuple[float, ...] = (0.01, 0.1, 1.0)
    """The sparse-training sweep: lambda = rho * (calibration loss / penalty) of the trained model,
    so the penalty starts at rho times the task loss; the rho whose pruned models have the lowest
    calibration loss (mean over the targets) is kept."""
    sparse_by_cost: bool = True
    """``GroupRegularizer(..., by_cost=)`` of the sparse-training rows."""

    @staticmethod
    def quick() -> Settings:
        return Settings(image_width=8, image_epochs=2, image_finetune_epochs=1, text_width=64, text_layers=2,
                        text_mlp=128, text_steps=60, text_finetune_steps=10, text_batch=8, context=64,
                        eval_windows=32, calibration_batches=2, bisection_steps=7)


# ---------------------------------------------------------------- training


def fit(model: nn.Module, batches: Iterator[Batch], loss: Loss, steps: int, lr: float, warmup: int = 0) -> None:
    """``steps`` AdamW steps (no weight decay) at ``lr``, linear warm-up then cosine decay; leaves eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (warmup + 1)) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for _, (x, y) in zip(range(steps), batches):
        opt.zero_grad(set_to_none=True)
        loss(model(x), y).backward()
        opt.step()
        schedule.step()
    model.eval()


class Task(Protocol):
    """What the benchmark needs from a task."""

    name: str
    metric: str
    higher_is_better: bool
    example: torch.Tensor

    def build(self) -> nn.Module: ...
    def config(self) -> dict[str, Any]: ...
    def train(self, model: nn.Module) -> None: ...
    def finetune(self, model: nn.Module, loss: Loss | None = None, seed: int = SEED + 1) -> None: ...
    def evaluate(self, model: nn.Module) -> float: ...
    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...
    def calibration(self) -> list[Batch]: ...
    def tp_options(self, model: nn.Module, ratio: float) -> dict[str, Any]: ...


# ---------------------------------------------------------------- images


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class Basic(nn.Module):
    """Two 3x3 conv-BN with a residual add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = conv_bn(c, c), conv_bn(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b(F.relu(self.a(x))))


class Separable(nn.Module):
    """Depthwise 3x3 conv-BN (groups = channels), pointwise conv-BN, residual add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.depthwise, self.pointwise = conv_bn(c, c, groups=c), conv_bn(c, c, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.pointwise(F.relu(self.depthwise(x))))


class TwoBranch(nn.Module):
    """A 1x1 and a 3x3 branch of half the width each, concatenated along channels, residual add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.narrow, self.wide = conv_bn(c, c // 2, k=1), conv_bn(c, c - c // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + torch.cat([F.relu(self.narrow(x)), F.relu(self.wide(x))], dim=1))


class DigitsNet(nn.Module):
    """32x32 grey images to 10 classes: widths w, 2w (16x16), 4w (8x8)."""

    def __init__(self, w: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(1, w), nn.ReLU(), Basic(w))
        self.stage2 = nn.Sequential(conv_bn(w, 2 * w, stride=2), nn.ReLU(), Separable(2 * w), TwoBranch(2 * w))
        self.stage3 = nn.Sequential(conv_bn(2 * w, 4 * w, stride=2), nn.ReLU(), Separable(4 * w), TwoBranch(4 * w))
        self.classifier = nn.Linear(4 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.stage3(self.stage2(self.stem(x))).mean((2, 3)))


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits in [0, 1], upscaled to 32x32 (bilinear), split 1,437 / 360 (stratified, seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    train, test = train_test_split(range(len(data.target)), test_size=360, stratify=data.target, random_state=SEED)
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    labels = torch.tensor(data.target)
    return images[train], labels[train], images[test], labels[test]


def shifted(x: torch.Tensor, generator: torch.Generator, most: int = 2) -> torch.Tensor:
    """Each image moved by up to ``most`` pixels in each direction (zero padding)."""
    padded = F.pad(x, (most,) * 4)
    offsets = torch.randint(0, 2 * most + 1, (len(x), 2), generator=generator).tolist()
    size = x.shape[-1]
    return torch.stack([p[:, i:i + size, j:j + size] for p, (i, j) in zip(padded, offsets)])


class Images:
    """Digits classification with :class:`DigitsNet`; metric: test accuracy in percent."""

    name, metric, higher_is_better = "images", "test accuracy %", True

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.x, self.y, self.x_test, self.y_test = digits()
        self.example = self.x[:1].clone()

    def config(self) -> dict[str, Any]:
        return {"width": self.s.image_width, "epochs": self.s.image_epochs, "lr": self.s.image_lr,
                "batch": self.s.batch, "split": "stratified 360, seed 0", "size": 32, "augment": "shift 2"}

    def build(self) -> nn.Module:
        torch.manual_seed(SEED)
        return DigitsNet(self.s.image_width)

    def batches(self, seed: int) -> Iterator[Batch]:
        """Shuffled training batches, shifted, epoch after epoch, from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(self.x), generator=g)
            for i in range(0, len(order) - self.s.batch + 1, self.s.batch):
                idx = order[i:i + self.s.batch]
                yield shifted(self.x[idx], g), self.y[idx]

    def steps(self, epochs: int) -> int:
        return epochs * (len(self.x) // self.s.batch)

    def train(self, model: nn.Module) -> None:
        fit(model, self.batches(SEED), self.loss, self.steps(self.s.image_epochs), self.s.image_lr,
            warmup=self.steps(1))

    def finetune(self, model: nn.Module, loss: Loss | None = None, seed: int = SEED + 1) -> None:
        """The fine-tuning steps (``loss`` instead of the task's: the sparse-training phase)."""
        fit(model, self.batches(seed), loss or self.loss, self.steps(self.s.image_finetune_epochs),
            self.s.finetune_lr)

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        model.eval()
        return 100.0 * (model(self.x_test).argmax(1) == self.y_test).float().mean().item()

    def calibration(self) -> list[Batch]:
        """The first batches of a fixed shuffle of the training set, unshifted."""
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(SEED + 2))
        b = self.s.batch
        return [(self.x[order[i * b:(i + 1) * b]], self.y[order[i * b:(i + 1) * b]])
                for i in range(self.s.calibration_batches)]

    def tp_options(self, model: nn.Module, ratio: float) -> dict[str, Any]:
        return {"ignored_layers": [model.get_submodule("classifier")]}


# ---------------------------------------------------------------- text


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (as Llama writes it)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(batch, heads, length, head_dim)``: the halves of head_dim swapped, the first negated. The dim
    is written as 3, not -1: Torch-Pruning 1.6.1 cannot build its graph around ``cat(dim=-1)`` under
    torch 2.14 (the grad_fn's saved dim reads 2**64 - 1, which it takes for "uninitialized")."""
    first, second = x.chunk(2, dim=3)
    return torch.cat((-second, first), dim=3)


class Attention(nn.Module):
    """Grouped-query causal self-attention with rotary embeddings; head counts are read from the
    projections' widths at run time, so a model with fewer heads runs unchanged."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[0], x.shape[1]
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        kv_heads, repeat = k.shape[1], q.shape[1] // k.shape[1]
        k = k[:, :, None].expand(b, kv_heads, repeat, t, self.head_dim).reshape(b, kv_heads * repeat, t, self.head_dim)
        v = v[:, :, None].expand(b, kv_heads, repeat, t, self.head_dim).reshape(b, kv_heads * repeat, t, self.head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, hidden: int) -> None:
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(dim), Attention(dim, heads, kv_heads, head_dim)
        self.mlp_norm, self.mlp = RMSNorm(dim), SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """Token ids ``(batch, length)`` to next-token logits ``(batch, length, vocab)``."""

    def __init__(self, vocab: int, dim: int = 128, layers: int = 3, heads: int = 4, kv_heads: int = 2,
                 head_dim: int = 32, hidden: int = 320) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers: list[Layer] = nn.ModuleList(  # type: ignore[assignment]
            Layer(dim, heads, kv_heads, head_dim, hidden) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", 10000.0 ** -(torch.arange(0, head_dim, 2).float() / head_dim),
                             persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).float()
        # broadcast, never index, the buffer: fx stores `inv_freq[None, :]` as `_tensor_constant0` on the model
        # itself, prune's own analysis then names it `_tensor_constant1`, and prune refuses the plan (PlanError)
        angles = positions[:, None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def stdlib_text() -> tuple[str, str, list[Path]]:
    """Training and test text from the standard library's ``*.py`` files (sorted by name; every
    tenth, from the tenth, is test), printable ASCII only (tab and newline kept)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"), key=lambda p: p.name)
    allowed = set(string.printable) - set("\r\x0b\x0c")

    def read(path: Path) -> str:
        return "".join(c for c in path.read_text(encoding="utf-8", errors="replace") if c in allowed)

    train = "".join(read(p) for i, p in enumerate(files) if i % 10 != 9)
    test = "".join(read(p) for i, p in enumerate(files) if i % 10 == 9)
    return train, test, files


class Text:
    """Character-level language modelling with :class:`Decoder`; metric: test loss in nats per character."""

    name, metric, higher_is_better = "text", "test loss (nats/char)", False

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        train, test, self.files = stdlib_text()
        self.vocab = sorted(set(train))
        index = {c: i for i, c in enumerate(self.vocab)}
        self.train_ids = torch.tensor([index[c] for c in train])
        self.test_ids = torch.tensor([index[c] for c in test if c in index])
        self.example = self.train_ids[: settings.context].unsqueeze(0).clone()

    def config(self) -> dict[str, Any]:
        s = self.s
        return {"vocab": len(self.vocab), "chars": [len(self.train_ids), len(self.test_ids)], "width": s.text_width,
                "layers": s.text_layers, "mlp": s.text_mlp, "steps": s.text_steps, "lr": s.text_lr,
                "batch": s.text_batch, "context": s.context, "python": platform.python_version()}

    def build(self) -> nn.Module:
        torch.manual_seed(SEED)
        return Decoder(len(self.vocab), self.s.text_width, self.s.text_layers, hidden=self.s.text_mlp)

    def windows(self, ids: torch.Tensor, starts: torch.Tensor) -> Batch:
        chunk = ids[starts[:, None] + torch.arange(self.s.context + 1)]
        return chunk[:, :-1], chunk[:, 1:]

    def batches(self, seed: int) -> Iterator[Batch]:
        """Random training windows from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        while True:
            starts = torch.randint(0, len(self.train_ids) - self.s.context - 1, (self.s.text_batch,), generator=g)
            yield self.windows(self.train_ids, starts)

    def train(self, model: nn.Module) -> None:
        fit(model, self.batches(SEED), self.loss, self.s.text_steps, self.s.text_lr, warmup=100)

    def finetune(self, model: nn.Module, loss: Loss | None = None, seed: int = SEED + 1) -> None:
        """The fine-tuning steps (``loss`` instead of the task's: the sparse-training phase)."""
        fit(model, self.batches(seed), loss or self.loss, self.s.text_finetune_steps, self.s.finetune_lr)

    def loss(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.flatten(0, 1), labels.flatten())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        """Mean cross-entropy over ``eval_windows`` evenly spaced test windows."""
        model.eval()
        starts = torch.linspace(0, len(self.test_ids) - self.s.context - 1, self.s.eval_windows).long()
        total = 0.0
        for chunk in starts.split(32):
            x, y = self.windows(self.test_ids, chunk)
            total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
        return total / (len(starts) * self.s.context)

    def calibration(self) -> list[Batch]:
        return [b for _, b in zip(range(self.s.calibration_batches), self.batches(SEED + 2))]

    def tp_options(self, model: nn.Module, ratio: float) -> dict[str, Any]:
        """Torch-Pruning's recipe for grouped-query attention (its ``examples/LLMs/prune_llm.py``):
        heads declared per projection, whole query heads pruned, head_dim kept (rotary)."""
        heads: dict[nn.Module, int] = {}
        for attn in (m for m in model.modules() if isinstance(m, Attention)):
            heads[attn.q_proj] = attn.q_proj.out_features // attn.head_dim
            heads[attn.k_proj] = heads[attn.v_proj] = attn.k_proj.out_features // attn.head_dim
        return {"ignored_layers": [model.get_submodule("lm_head")], "num_heads": heads, "prune_num_heads": True,
                "prune_head_dims": False, "head_pruning_ratio": ratio}


# ---------------------------------------------------------------- the trained baseline


def trained(task: Task) -> tuple[nn.Module, float, float, bool]:
    """The task's trained model, its metric, the training seconds, and whether it came from the cache."""
    key = hashlib.sha256(json.dumps({"task": task.name, **task.config(), "torch": torch.__version__},
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / f"{task.name}-{key}.pt"
    model = task.build()
    if path.exists():
        saved = torch.load(path)
        model.load_state_dict(saved["state"])
        log(f"{task.name}: trained weights from {path}")
        return model.eval(), saved["metric"], saved["seconds"], True
    log(f"{task.name}: training ({path} absent)")
    start = time.perf_counter()
    task.train(model)
    seconds = time.perf_counter() - start
    metric = task.evaluate(model)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "metric": metric, "seconds": seconds}, path)
    log(f"{task.name}: trained in {seconds:.0f} s, {task.metric} {metric:.4g}; saved {path}")
    return model.eval(), metric, seconds, False


def measured(model: nn.Module, example: torch.Tensor) -> depgraph.Cost:
    """The one counter for every model: ``depgraph.cost`` of a fresh analysis."""
    return depgraph.cost(depgraph.analyze(model, example))


# ---------------------------------------------------------------- results


@dataclass
class Row:
    """One pruned model: how it was made, what it keeps, how well it does."""

    tool: str
    criterion: str
    target: float
    macs: float | None = None  # fractions of the original's
    params: float | None = None
    pruned: float | None = None  # the metric right after pruning (images, depgraph: after BN recalibration)
    raw: float | None = None  # images: the metric right after pruning, before any BN recalibration
    finetuned: float | None = None
    note: str = ""


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200].replace("|", "\\|")


def finish(task: Task, row: Row, model: nn.Module, original: depgraph.Cost, recalibrate: list[torch.Tensor]) -> Row:
    """Count, evaluate, (recalibrate,) fine-tune and evaluate ``model`` into ``row``."""
    cost = measured(model, task.example)
    row.macs, row.params = cost.macs / original.macs, cost.params / original.params
    if abs(row.macs - row.target) > 0.01 * row.target:
        row.note += f" MACs {row.macs:.4f} miss the target by more than 1%."
    row.raw = row.pruned = task.evaluate(model)
    if recalibrate:
        model = depgraph.recalibrate_batch_norm(model, recalibrate, inplace=True)
        row.pruned = task.evaluate(model)
    task.finetune(model)
    row.finetuned = task.evaluate(model)
    log(f"  {row.tool} {row.criterion} @ {row.target}: MACs {row.macs:.4f}, params {row.params:.4f}, "
        f"{row.pruned:.4g} -> fine-tuned {row.finetuned:.4g}. {row.note}")
    return row


# ---------------------------------------------------------------- depgraph


def depgraph_criteria(task: Task, model: nn.Module, calibration: list[Batch],
                      only: tuple[str, ...] | None = None) -> list[tuple[str, Any]]:
    """``(name, importance for solve)`` per criterion (those in ``only``, where given); an importance
    that failed is its exception.

    ``gradient_importance`` hands ``loss`` the batch it fed the model, so the labels are
    looked up by the input tensor's identity."""
    inputs = [x for x, _ in calibration]
    labels = {id(x): y for x, y in calibration}

    def loss(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return task.loss(output, labels[id(x)])

    def score(kind: str) -> Any:
        if kind in ("taylor", "hessian"):
            return depgraph.gradient_importance(model, inputs, loss=loss, kind=kind)
        return depgraph.activation_importance(model, inputs, kind=kind)  # type: ignore[attr-defined]

    kinds = ["taylor", "hessian"]
    if hasattr(depgraph, "activation_importance"):
        kinds += ["activation", "fluctuation"]
    criteria: list[tuple[str, Any]] = [(n, n) for n in ("l1", "l2") if only is None or n in only]
    for name in (k for k in kinds if only is None or k in only):
        try:
            criteria.append((name, score(name)))
        except Exception as exc:  # noqa: BLE001 -- reported in the table
            log(f"  depgraph {name} importance failed: {first_line(exc)}")
            criteria.append((name, exc))
    return criteria


def depgraph_tools(settings: Settings) -> list[tuple[str, str | None]]:
    """``(label, strategy)``: depgraph as called by default, then each other strategy ``solve`` takes."""
    if "strategy" not in inspect.signature(depgraph.solve).parameters:
        return [("depgraph", None)]
    first, *others = settings.strategies
    tools: list[tuple[str, str | None]] = [("depgraph", first)]
    return tools + [(f"depgraph, strategy {s}", s) for s in others]


def depgraph_plan(analysis: depgraph.Analysis, target: float, importance: Any, strategy: str | None) -> depgraph.Plan:
    """``solve(analysis, target={"macs": target}, importance=..., strategy=...)``."""
    options = {} if strategy is None else {"strategy": strategy}
    return depgraph.solve(analysis, target={"macs": target}, importance=importance, **options)  # type: ignore[arg-type]


def warned(fn: Callable[[], Any]) -> tuple[Any, str]:
    """``fn()`` and the warnings it gave, as text for a row's notes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = fn()
    return value, " ".join(f"Warning: {w.message}." for w in caught)


def condensed(notes: str) -> str:
    """``prune``'s warning that it returns a GraphModule, in one short sentence (the rest kept)."""
    def short(match: re.Match[str]) -> str:
        why = ("a removed block shares its module's forward with what stays" if "removed block" in match[2]
               else "an attention's scale changes with head_dim" if "scaled_dot_product_attention" in match[2]
               else "a literal its modules cannot express")
        return f"prune returned a torch.fx.GraphModule, not a {match[1]}: {why}."

    return re.sub(r"Warning: prune returns a torch\.fx\.GraphModule, not a (\w+): (.*?)\.(?= Warning:|$)", short, notes)


def depgraph_row(task: Task, row: Row, model: nn.Module, analysis: depgraph.Analysis, plan: depgraph.Plan,
                 original: depgraph.Cost, recalibrate: list[torch.Tensor]) -> Row:
    """Prune by ``plan`` and finish ``row``; a measured MACs count that ``cost(analysis, plan)`` did not
    predict is noted."""
    pruned, notes = warned(lambda: depgraph.prune(model, plan))
    row.note += " " + condensed(notes) if notes else ""
    finish(task, row, pruned, original, recalibrate)
    predicted = depgraph.cost(analysis, plan).macs / original.macs
    if row.macs != predicted:
        row.note += f" cost(analysis, plan) predicted {predicted:.4f}."
        log(f"  {row.tool} {row.criterion} @ {row.target}: cost(analysis, plan) predicted {predicted:.4f}")
    return row


def depgraph_rows(task: Task, model: nn.Module, targets: list[float], calibration: list[Batch],
                  original: depgraph.Cost, settings: Settings) -> list[Row]:
    """``solve(target={"macs": f})`` then ``prune`` for every variant, criterion and target; a variant
    whose plan equals an earlier one's copies its row instead of fine-tuning the same model again."""
    analysis = depgraph.analyze(model, task.example)
    criteria = depgraph_criteria(task, model, calibration)
    recalibrate = batch_norm_inputs(model, calibration)
    rows: list[Row] = []
    done: dict[tuple[Any, ...], Row] = {}
    for tool, strategy in depgraph_tools(settings):
        for target in targets:
            for name, importance in criteria:
                row = Row(tool, name, target)
                try:
                    if isinstance(importance, Exception):
                        raise importance
                    plan, row.note = warned(lambda: depgraph_plan(analysis, target, importance, strategy))
                    key = (target, name, *((i, tuple(k.tolist())) for i, k in sorted(plan.keep.items())))
                    if key in done:
                        row = dataclasses.replace(done[key], tool=tool, note=f"Same plan as {done[key].tool}.")
                    else:
                        row = done[key] = depgraph_row(task, row, model, analysis, plan, original, recalibrate)
                except Exception as exc:  # noqa: BLE001 -- a failure is a row, and is reported
                    row.note = first_line(exc)
                    log(f"  {tool} {name} @ {target} failed: {row.note}")
                rows.append(row)
    return rows


# ---------------------------------------------------------------- depth and sparse training

DEPTH_WIDTH, DEPTH_ONLY = "depgraph, depth+width", "depgraph, depth only"
DEPTH_WIDTH_BN = "depgraph, depth+width, evaluate after BN recal."
SPARSE, EXTRA = "depgraph, sparse training", "depgraph, extra training (λ=0)"
NEW_TOOLS = (DEPTH_WIDTH, DEPTH_WIDTH_BN, DEPTH_ONLY, SPARSE, EXTRA)
"""Rows that remove blocks or train before pruning; compared with the width-only depgraph rows."""


def labelled(calibration: list[Batch], task: Task) -> dict[str, Any]:
    """``inputs=`` and ``loss=`` for ``block_importance`` / ``calibration_loss`` over ``(x, y)`` batches."""
    return {"inputs": lambda batch: batch[0], "loss": lambda output, batch: task.loss(output, batch[1])}


def block_names(analysis: depgraph.Analysis) -> list[str]:
    """A short name per block: its module, and its first sub-module where two blocks share the module
    (a transformer layer's attention and MLP)."""
    names = [b.name for b in analysis.blocks]
    out = []
    for block, name in zip(analysis.blocks, names):
        if names.count(name) > 1:
            cut = len(name) + 1 if name else 0
            name = f"{name} {block.modules[-1][cut:].split('.')[0]}"
        out.append(name)
    return out


def dropped(analysis: depgraph.Analysis, plan: depgraph.Plan) -> str:
    names = block_names(analysis)
    gone = [names[i] for i in sorted(plan.drop)]
    return f"Blocks removed: {', '.join(gone)}." if gone else "No block removed."


def depth_only_plan(analysis: depgraph.Analysis, scores: dict[int, float], target: float,
                    original: depgraph.Cost) -> tuple[depgraph.Plan | None, str]:
    """Blocks removed in order of ascending influence until the MACs are at most ``target`` (a block
    overlapping one already removed is skipped); None, and why, where removing them all stays above."""
    chosen: list[int] = []
    taken: set[str] = set()
    macs = 1.0
    for i in sorted(scores, key=lambda i: (scores[i], i)):
        block = analysis.blocks[i]
        nodes = {*block.nodes, block.add}
        if nodes & taken:
            continue
        chosen.append(i)
        taken |= nodes
        plan = depgraph.Plan.from_keep(analysis, {}, drop_blocks=chosen)
        macs, before = depgraph.cost(analysis, plan).macs / original.macs, macs
        if macs <= target:
            return plan, f"Depth alone cannot land nearer: one block fewer keeps {before:.4f}."
    return None, (f"Depth alone cannot reach {target:g}: removing every block ({len(chosen)}) keeps "
                  f"{macs:.4f} of the MACs.")


def depth_rows(task: Task, model: nn.Module, targets: list[float], calibration: list[Batch],
               original: depgraph.Cost, settings: Settings) -> list[Row]:
    """Depth only (blocks by ascending Block Influence until the target) and depth+width
    (``solve(..., depth=influence, evaluate=calibration_loss)``) at every target."""
    analysis = depgraph.analyze(model, task.example)
    if not analysis.blocks:
        return [Row(DEPTH_WIDTH, "-", t, note="The model has no removable blocks (analysis.blocks is empty).")
                for t in targets]
    options = labelled(calibration, task)
    scores = depgraph.block_importance(model, analysis, calibration, kind="influence", **options)
    names = block_names(analysis)
    log(f"  block influence: {', '.join(f'{names[i]} {s:.3f}' for i, s in scores.items())}")
    evaluate = depgraph.calibration_loss(model, calibration, **options)
    criteria = dict(depgraph_criteria(task, model, calibration, settings.depth_criteria))
    recalibrate = batch_norm_inputs(model, calibration)
    evaluators = [(DEPTH_WIDTH, evaluate)]
    if recalibrate:
        evaluators.append((DEPTH_WIDTH_BN, recalibrated_loss(task, model, calibration)))
    rows: list[Row] = []
    done: dict[tuple[int, ...], Row] = {}
    for target in targets:
        row = Row(DEPTH_ONLY, "influence", target)
        plan, row.note = depth_only_plan(analysis, scores, target, original)
        if plan is None:
            log(f"  {DEPTH_ONLY} @ {target}: {row.note}")
        elif tuple(sorted(plan.drop)) in done:
            first = done[tuple(sorted(plan.drop))]
            row = dataclasses.replace(first, target=target, note=f"Same plan as at target {first.target:g}. "
                                      + first.note.split(" MACs ")[0].strip())
            if row.macs is not None and abs(row.macs - target) > 0.01 * target:
                row.note += f" MACs {row.macs:.4f} miss the target by more than 1%."
        else:
            done[tuple(sorted(plan.drop))] = row
            row.note = f"{dropped(analysis, plan)} {row.note}"
            attempt(row, lambda: depgraph_row(task, row, model, analysis, plan, original, recalibrate))
        rows.append(row)
        for (tool, judge), name in itertools.product(evaluators, settings.depth_criteria):
            row = Row(tool, name, target)

            def made(name: str = name, target: float = target, row: Row = row, judge: Any = judge) -> None:
                importance = criteria[name]
                if isinstance(importance, Exception):
                    raise importance
                plan, row.note = warned(lambda: depgraph.solve(
                    analysis, target={"macs": target}, importance=importance, depth=scores, evaluate=judge))
                if abs(depgraph.cost(analysis, plan).macs / original.macs - target) <= 0.01 * target:
                    # a candidate that solve tried and did not return missed the target, not this plan
                    row.note = re.sub(r"Warning: target macs=\S+ landed at [^W]*?could find\.", "", row.note)
                row.note = f"{dropped(analysis, plan)} {row.note}".strip()
                depgraph_row(task, row, model, analysis, plan, original, recalibrate)

            attempt(row, made)
            rows.append(row)
    return rows


def recalibrated_loss(task: Task, model: nn.Module, calibration: list[Batch]) -> Callable[[depgraph.Plan], float]:
    """``evaluate(plan)`` for a model with batch norms: the calibration loss of ``prune(model, plan)``
    after ``recalibrate_batch_norm`` (``calibration_loss`` scores ``simulate``, whose batch norms keep
    the statistics of the unpruned model)."""
    inputs = [x for x, _ in calibration]

    def evaluate(plan: depgraph.Plan) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruned = depgraph.recalibrate_batch_norm(depgraph.prune(model, plan), inputs, inplace=True)
        with torch.no_grad():
            return sum(task.loss(pruned(x), y).item() for x, y in calibration) / len(calibration)

    return evaluate


def attempt(row: Row, make: Callable[[], Any]) -> None:
    """``make()``; its exception, if any, goes into the row's notes (a failure is a row, and is reported)."""
    try:
        make()
    except Exception as exc:  # noqa: BLE001 -- reported in the table
        row.note += " " + first_line(exc)
        log(f"  {row.tool} {row.criterion} @ {row.target} failed: {row.note}")


def batch_norm_inputs(model: nn.Module, calibration: list[Batch]) -> list[torch.Tensor]:
    """The calibration inputs where the model has batch norms (to recalibrate after pruning), else none."""
    has = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return [x for x, _ in calibration] if has else []


def sparse_trained(task: Task, model: nn.Module, analysis: depgraph.Analysis, rho: float,
                   settings: Settings, calibration: list[Batch]) -> tuple[nn.Module, float]:
    """A copy of ``model`` after the fine-tuning number of steps (other batches: seed + 3) on
    loss + lambda * GroupRegularizer, lambda = rho * (calibration loss / penalty) of ``model``; and lambda."""
    penalty = depgraph.GroupRegularizer(analysis, kind="group_lasso", by_cost=settings.sparse_by_cost)
    with torch.no_grad():
        base = sum(task.loss(model(x), y).item() for x, y in calibration) / len(calibration)
        lam = rho * base / penalty(model).item()
    trainee = copy.deepcopy(model)
    task.finetune(trainee, lambda output, labels: task.loss(output, labels) + lam * penalty(trainee), seed=SEED + 3)
    return trainee, lam


def pruned_calibration_loss(task: Task, model: nn.Module, targets: list[float], calibration: list[Batch]) -> float:
    """Mean over ``targets`` of the calibration loss of ``model`` pruned there (l2; images: after BN
    recalibration): how the sparse-training sweep picks lambda, without the test set."""
    analysis = depgraph.analyze(model, task.example)
    recalibrate = batch_norm_inputs(model, calibration)
    total = 0.0
    for target in targets:
        pruned = depgraph.prune(model, depgraph.solve(analysis, target={"macs": target}, importance="l2"))
        if recalibrate:
            pruned = depgraph.recalibrate_batch_norm(pruned, recalibrate, inplace=True)
        with torch.no_grad():
            total += sum(task.loss(pruned(x), y).item() for x, y in calibration) / len(calibration)
    return total / len(targets)


def sparse_rows(task: Task, model: nn.Module, targets: list[float], calibration: list[Batch],
                original: depgraph.Cost, settings: Settings) -> list[Row]:
    """Sparse training (group lasso) then l2 pruning at every target, lambda from the sweep; and the
    control: the same steps with lambda = 0."""
    analysis = depgraph.analyze(model, task.example)
    recalibrate = batch_norm_inputs(model, calibration)
    tried = []
    for rho in (0.0, *settings.sparse_rhos):
        trainee, lam = sparse_trained(task, model, analysis, rho, settings, calibration)
        score, _ = warned(lambda: pruned_calibration_loss(task, trainee, targets, calibration))
        log(f"  sparse training rho {rho:g} (lambda {lam:.3g}): pruned calibration loss {score:.4f}")
        tried.append((rho, lam, score, trainee))
    sweep = ", ".join(f"rho {rho:g}: {score:.4f}" for rho, _, score, _ in tried[1:])
    rho, lam, _, chosen = min(tried[1:], key=lambda t: t[2])
    rows = []
    for tool, trainee, note in [
            (SPARSE, chosen, f"rho {rho:g}, lambda {lam:.3g} (sweep, pruned calibration loss: {sweep})."),
            (EXTRA, tried[0][3], "The sparse-training steps without the penalty.")]:
        trained_analysis = depgraph.analyze(trainee, task.example)
        for target in targets:
            row = Row(tool, "l2", target, note=note)

            def made(row: Row = row, target: float = target, trainee: nn.Module = trainee,
                     a: depgraph.Analysis = trained_analysis) -> None:
                plan, notes = warned(lambda: depgraph.solve(a, target={"macs": target}, importance="l2"))
                row.note += " " + notes if notes else ""
                depgraph_row(task, row, trainee, a, plan, original, recalibrate)

            attempt(row, made)
            rows.append(row)
    return rows


# ---------------------------------------------------------------- Torch-Pruning


def tp_prune(task: Task, model: nn.Module, ratio: float, criterion: str, calibration: list[Batch]) -> nn.Module:
    """A copy of ``model`` pruned by Torch-Pruning at one uniform ``ratio``.

    Taylor: one backward of the task's loss per calibration batch (gradients summed), as
    its docs show. Hessian: its docs' per-sample loop, with the squared gradients averaged
    here: ``HessianImportance.accumulate_grad`` in 1.6.1 keys its sums by parameter but tests
    membership by name, so it keeps only the last sample's (the mean is what its
    ``__call__`` expects in ``.grad``)."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    importance = {"l1": lambda: tp.importance.MagnitudeImportance(p=1),
                  "l2": lambda: tp.importance.MagnitudeImportance(p=2),
                  "taylor": tp.importance.TaylorImportance, "hessian": tp.importance.HessianImportance}[criterion]()
    pruner = tp.pruner.BasePruner(model, task.example, importance=importance, pruning_ratio=ratio,
                                  **task.tp_options(model, ratio))
    if criterion == "taylor":
        model.zero_grad()
        for x, y in calibration:
            task.loss(model(x), y).backward()
    elif criterion == "hessian":
        mean_squared_gradients(task, model, calibration)
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def mean_squared_gradients(task: Task, model: nn.Module, calibration: list[Batch]) -> None:
    """Every parameter's ``.grad`` set to the mean over calibration samples of its squared gradient."""
    squares = {p: torch.zeros_like(p) for p in model.parameters()}
    samples = 0
    for x, y in calibration:
        for i in range(len(x)):
            model.zero_grad()
            task.loss(model(x[i:i + 1]), y[i:i + 1]).backward()
            for p, total in squares.items():
                if p.grad is not None:
                    total += p.grad.square()
            samples += 1
    for p, total in squares.items():
        p.grad = total / samples


def tp_ratio(task: Task, model: nn.Module, target: float, original: depgraph.Cost,
             steps: int) -> tuple[float, float, str]:
    """The uniform ``pruning_ratio`` whose measured MACs land nearest ``target`` (bisection; the counts per
    layer, hence the MACs, depend on the ratio only, not on the importance), those MACs, and the nearest
    MACs tried on either side of the target."""
    low, high = 0.0, 0.95
    tried: dict[float, float] = {}
    for _ in range(steps):
        ratio = (low + high) / 2
        tried[ratio] = measured(tp_prune(task, model, ratio, "l2", []), task.example).macs / original.macs
        low, high = (ratio, high) if tried[ratio] > target else (low, ratio)
    ratio, macs = min(tried.items(), key=lambda kv: abs(kv[1] - target))
    below = max((m for m in tried.values() if m <= target), default=None)
    above = min((m for m in tried.values() if m > target), default=None)
    return ratio, macs, f"nearest tried below / above: {below:.4f} / {above:.4f}" if below and above else ""


def tp_rows(task: Task, model: nn.Module, targets: list[float], calibration: list[Batch], original: depgraph.Cost,
            steps: int) -> tuple[list[Row], dict[float, tuple[float, float, str]]]:
    """Torch-Pruning at the bisected ratio for every criterion and target; also the ratios found."""
    rows, ratios = [], {}
    for target in targets:
        ratios[target] = ratio, macs, _ = tp_ratio(task, model, target, original, steps)
        log(f"  Torch-Pruning: pruning_ratio {ratio:.4f} keeps {macs:.4f} of the MACs (target {target})")
        for criterion in ("l1", "l2", "taylor", "hessian"):
            row = Row("Torch-Pruning", criterion, target, note=f"pruning_ratio {ratio:.4f}.")
            try:
                rows.append(finish(task, row, tp_prune(task, model, ratio, criterion, calibration), original, []))
            except Exception as exc:  # noqa: BLE001 -- a failure is a row, and is reported
                row.note += " " + first_line(exc)
                log(f"  Torch-Pruning {criterion} @ {target} failed: {row.note}")
                rows.append(row)
    return rows, ratios


# ---------------------------------------------------------------- one task


@dataclass
class Outcome:
    """Everything one task contributes to the page."""

    task: Task
    baseline: float
    train_seconds: float
    cached: bool
    rows: list[Row]
    ratios: dict[float, tuple[float, float, str]]
    widths: list[list[str]]
    seconds: float


def widths(model: nn.Module) -> str:
    """The widths a pruned model keeps, in a few words."""
    if hasattr(model, "get_submodule") and any(n == "embed" for n, _ in model.named_children()):
        layers = sorted({n.split(".")[1] for n, _ in model.named_modules() if n.startswith("layers.")}, key=int)
        parts = []
        for i in layers:
            q, k, v, gate = (model.get_submodule(f"layers.{i}.{p}").out_features
                             for p in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj"))
            parts.append(f"{q}/{k}/{v}/{gate}")
        return f"stream {model.get_submodule('embed').embedding_dim}; q/k/v/MLP per layer: {', '.join(parts)}"
    return "conv outputs " + ",".join(str(m.out_channels) for m in model.modules() if isinstance(m, nn.Conv2d))


KINDS = ("width", "depth", "sparse", "tp")
"""Which rows a run makes (``--kinds``): depgraph's width-only rows, depth (depth only, depth+width),
sparse training, Torch-Pruning (with depgraph at its MACs where ``width`` is also asked)."""


def run_task(task: Task, targets: list[float], settings: Settings, kinds: tuple[str, ...] = KINDS) -> Outcome:
    """Train (or load), then prune with both tools at every target, count, evaluate and fine-tune."""
    start = time.perf_counter()
    model, baseline, train_seconds, cached = trained(task)
    original = measured(model, task.example)
    calibration = task.calibration()
    log(f"{task.name}: {task.metric} {baseline:.4g}, {original.macs} MACs, {original.params} parameters")
    rows: list[Row] = []
    if "width" in kinds:
        log(f"{task.name}: depgraph")
        rows += depgraph_rows(task, model, targets, calibration, original, settings)
    if "depth" in kinds:
        log(f"{task.name}: depgraph, depth")
        rows += depth_rows(task, model, targets, calibration, original, settings)
    if "sparse" in kinds:
        log(f"{task.name}: depgraph, sparse training")
        rows += sparse_rows(task, model, targets, calibration, original, settings)
    tp_part: list[Row] = []
    ratios: dict[float, tuple[float, float, str]] = {}
    if "tp" in kinds:
        log(f"{task.name}: Torch-Pruning")
        tp_part, ratios = tp_rows(task, model, targets, calibration, original, settings.bisection_steps)
        if "width" in kinds:
            rows += at_tp_macs(task, model, ratios, calibration, original, settings)
    kept = [["original", "-", widths(model)]]
    analysis = depgraph.analyze(model, task.example)
    for target in targets:
        for tool, strategy in depgraph_tools(settings) if "width" in kinds else []:
            try:
                pruned = depgraph.prune(model, depgraph_plan(analysis, target, "l2", strategy))
                kept.append([f"{tool}, l2", f"{target:g}", widths(pruned)])
            except Exception as exc:  # noqa: BLE001 -- already reported in the rows
                kept.append([f"{tool}, l2", f"{target:g}", first_line(exc)])
        if ratios:
            pruned = tp_prune(task, model, ratios[target][0], "l2", [])
            kept.append(["Torch-Pruning, l2", f"{target:g}", widths(pruned)])
    return Outcome(task, baseline, train_seconds, cached, rows + tp_part, ratios, kept, time.perf_counter() - start)


AT_TP = "depgraph at Torch-Pruning's MACs"


def at_tp_macs(task: Task, model: nn.Module, ratios: dict[float, Any], calibration: list[Batch],
               original: depgraph.Cost, settings: Settings) -> list[Row]:
    """Where Torch-Pruning's bisection could not land within 1% of a target, depgraph (its default
    strategy) again at the MACs Torch-Pruning kept, labelled with the target: equal MACs."""
    rows: list[Row] = []
    for target, (_, macs, _) in ratios.items():
        if abs(macs - target) <= 0.01 * target:
            continue
        log(f"{task.name}: depgraph at Torch-Pruning's MACs {macs:.4f} (target {target:g})")
        own = dataclasses.replace(settings, strategies=settings.strategies[:1])
        for row in depgraph_rows(task, model, [macs], calibration, original, own):
            row.tool, row.target = AT_TP, target
            rows.append(row)
    return rows


# ---------------------------------------------------------------- the page


def best(rows: list[Row], tool: str, target: float, field: str, higher: bool) -> Row | None:
    scored = [r for r in rows if r.tool == tool and r.target == target and getattr(r, field) is not None]
    if not scored:
        return None
    return (max if higher else min)(scored, key=lambda r: getattr(r, field))


def verdict(outcome: Outcome, tool: str, target: float, field: str, what: str) -> str:
    """Whether ``tool``'s best criterion or Torch-Pruning's wins on ``field`` at ``target``, as a sentence."""
    higher = outcome.task.higher_is_better
    ours, theirs = (best(outcome.rows, t, target, field, higher) for t in (tool, "Torch-Pruning"))
    if ours is None or theirs is None:
        return f"{what}: no comparison (a tool has no result)."
    a, b = getattr(ours, field), getattr(theirs, field)
    unit = " points" if higher else " nats/char"
    if a == b:
        return f"{what}: a tie at {a:.4g} ({tool} {ours.criterion}, Torch-Pruning {theirs.criterion})."
    winner, loser = ((tool, "Torch-Pruning") if (a > b) == higher else ("Torch-Pruning", tool))
    w, lo = (ours, theirs) if winner == tool else (theirs, ours)
    return (f"{what}: **{winner}** ({w.criterion}, {getattr(w, field):.4g} at {w.macs:.4f} of the MACs) beats "
            f"{loser} ({lo.criterion}, {getattr(lo, field):.4g} at {lo.macs:.4f}) by {abs(a - b):.3g}{unit}.")


def against_width(outcome: Outcome, tool: str, target: float, field: str, what: str,
                  settings: Settings) -> str | None:
    """Whether ``tool``'s best row beats the best width-only depgraph row (any strategy) at ``target``
    on ``field``, as a sentence; None where ``tool`` has no result there."""
    higher = outcome.task.higher_is_better
    ours = best(outcome.rows, tool, target, field, higher)
    if ours is None:
        return None
    width = [b for t, _ in depgraph_tools(settings) if (b := best(outcome.rows, t, target, field, higher))]
    if not width:
        return f"{what}: no width-only row to compare with."
    theirs = (max if higher else min)(width, key=lambda r: getattr(r, field))
    a, b = getattr(ours, field), getattr(theirs, field)
    unit = " points" if higher else " nats/char"
    mine = f"{ours.criterion}, {a:.4g} at {ours.macs:.4f} of the MACs"
    other = f"{theirs.tool} {theirs.criterion}, {b:.4g} at {theirs.macs:.4f}"
    if a == b:
        return f"{what}: a tie with the best width-only row ({mine}; {other})."
    if (a > b) == higher:
        return f"{what}: **beats** the best width-only row by {abs(a - b):.3g}{unit} ({mine}; {other})."
    return f"{what}: behind the best width-only row by {abs(a - b):.3g}{unit} ({mine}; {other})."


def new_reading(outcome: Outcome, targets: list[float], settings: Settings) -> list[str]:
    """One line per new tool and target: against the best width-only depgraph row."""
    lines = []
    for tool in NEW_TOOLS:
        for target in targets:
            mine = [r for r in outcome.rows if r.tool == tool and r.target == target]
            if not mine:
                continue
            sentences = [against_width(outcome, tool, target, f, w, settings)
                         for f, w in (("finetuned", "After fine-tuning"), ("pruned", "Right after pruning"))]
            said = [x for x in sentences if x]
            same = [f"{r.criterion} {r.finetuned:.4g} against {w.finetuned:.4g}" for r in mine for w in
                    outcome.rows if w.tool == "depgraph" and w.target == target and w.criterion == r.criterion
                    and r.finetuned is not None and w.finetuned is not None]
            if same:
                said.append(f"After fine-tuning, against plain depgraph with the same criterion: {'; '.join(same)}.")
            reason = "; ".join(r.note.strip() for r in mine if r.macs is None)
            lines.append(f"- {tool}, target {target:g}. " + (" ".join(said) if said else f"No result: {reason}"))
    return lines


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def trained_how(outcome: Outcome) -> str:
    if outcome.cached:
        return f"weights from the cache; training took {outcome.train_seconds:.0f} s when it ran"
    return f"trained in this run, {outcome.train_seconds:.0f} s"


def section(outcome: Outcome, targets: list[float], settings: Settings) -> str:
    task = outcome.task
    images = task.name == "images"
    digits = 1 if images else 3
    header = ["tool", "criterion", "target", "MACs kept", "params kept", "after pruning"]
    header += ["(no BN recal.)"] if images else []
    header += ["after fine-tune", "notes"]
    table = []
    for r in outcome.rows:
        cells = [r.tool, r.criterion, f"{r.target:g}", fmt(r.macs, 4), fmt(r.params, 4), fmt(r.pruned, digits)]
        cells += [fmt(r.raw, digits)] if images else []
        table.append(cells + [fmt(r.finetuned, digits), r.note.strip() or "-"])
    reading = []
    for tool in [t for t, _ in depgraph_tools(settings)] + [AT_TP] if outcome.ratios else []:
        for target in targets:
            mine = [r for r in outcome.rows if r.tool == tool and r.target == target]
            if not mine:
                continue
            if mine and all(r.note.startswith("Same plan as") for r in mine):
                reading.append(f"- {tool}, target {target:g}: every criterion's plan is one depgraph's default "
                               "already made.")
                continue
            reading.append(f"- {tool} vs Torch-Pruning, target {target:g}. " + " ".join([
                verdict(outcome, tool, target, "finetuned", "After fine-tuning"),
                verdict(outcome, tool, target, "pruned", "Right after pruning"),
                *([verdict(outcome, tool, target, "raw", "Without depgraph's BN recalibration")] if images else []),
            ]))
    ratios = "; ".join(f"target {t:g}: pruning_ratio {r:.4f} keeps {m:.4f} ({side})"
                       for t, (r, m, side) in outcome.ratios.items())
    return "\n\n".join([
        f"## {task.name}: {task.metric} ({'higher' if task.higher_is_better else 'lower'} is better)",
        f"Trained baseline: {outcome.baseline:.4g} ({trained_how(outcome)}; this task took {outcome.seconds:.0f} s "
        f"in all). Torch-Pruning's bisected ratios: {ratios}.",
        markdown_table(header, table),
        *(["Reading it (computed from the table):\n\n" + "\n".join(reading)] if reading else []),
        *(["Depth and sparse training against width-only pruning (the best width-only depgraph row at the "
           "target, any strategy and criterion; computed from the table):\n\n" + "\n".join(new)]
          if (new := new_reading(outcome, targets, settings)) else []),
        "Widths kept by the l2 criterion:\n\n" + markdown_table(["model", "target", "widths"], outcome.widths),
    ])


def notes(settings: Settings) -> str:
    """How the numbers were made, as a bullet list."""
    return "\n".join([
        "- MACs and params kept: `depgraph.cost(depgraph.analyze(pruned, example))` over the original's, one "
        "example (batch 1; 32x32 image, or 128 characters), the same counter for both tools.",
        "- depgraph: `solve(analyze(model, example), target={'macs': f}, importance=c)`, `prune`. l1, l2: weight "
        "norms; taylor, hessian: `gradient_importance(model, batches, loss=cross-entropy, kind=...)`; activation, "
        "fluctuation: `activation_importance(model, batches, kind=...)` (present in this run: "
        f"{'yes' if hasattr(depgraph, 'activation_importance') else 'no'}). Images: **depgraph's 'after pruning' "
        "is after `recalibrate_batch_norm(pruned, calibration batches)`**; the '(no BN recal.)' column is before "
        "it, and Torch-Pruning's rows get no recalibration (both columns are the same model for them). Fine-tuning "
        "starts from the recalibrated model.",
        "- Torch-Pruning 1.6.1: `tp.pruner.BasePruner` (`MagnitudePruner` is its deprecated alias), local "
        "(uniform) `pruning_ratio`, l1/l2 = `MagnitudeImportance(p=1/2)` (group norms, mean over the group), "
        "taylor = `TaylorImportance()` after one backward per calibration batch, hessian = `HessianImportance()` "
        "from per-sample squared gradients (averaged here: its `accumulate_grad` keeps only the last sample's). "
        "1.6.1 has no `GroupNormImportance`; `MagnitudeImportance(p=2)` is its group L2 norm, and at a uniform "
        "ratio any group-norm variant (sum or mean over members, any normalizer) ranks alike. Ignored: the "
        "classifier / lm_head (their outputs are the model's outputs, which depgraph pins); the embedding is not "
        "ignored (its rows are the vocabulary, which Torch-Pruning never prunes; its width is the residual stream, "
        "which depgraph prunes too).",
        "- Text, Torch-Pruning: heads declared as in its `examples/LLMs/prune_llm.py` (`num_heads` for q/k/v, "
        "`prune_num_heads=True`, `prune_head_dims=False`, `head_pruning_ratio` = the ratio). Its graph does not "
        "link q/k/v to o_proj through `scaled_dot_product_attention`, so it skips the attention groups: it prunes "
        "the residual stream (embedding, norms, projections' inputs, o_proj/down outputs) and the MLP width, never "
        "heads (see the widths). Without `num_heads` it cuts q/k/v rows to counts that are not whole heads (at "
        "ratio 0.3 on a 64-wide model: 89 of 128 query rows, 23 of 64 key rows, head_dim 32) and the forward "
        "fails in the head reshape. "
        "The model's `rotate_half` concatenates along dim 3, not -1 (Torch-Pruning 1.6.1 fails on "
        "`cat(dim=-1)` under torch 2.14).",
        "- depgraph's strategies (`solve(..., strategy=)`, rows labelled by it; plain 'depgraph' is the default, "
        "`importance`): `importance` ranks units by normalized importance alone, across all groups; "
        "`uniform` removes one fraction of every group (the least that reaches the target), each group's least "
        "important units first, as Torch-Pruning's uniform ratio does per layer; `cost` removes the units of "
        "least normalized importance per MAC saved. See the widths under each table for where each put the cuts.",
        "- Depth: `a.blocks` lists the removable residual branches (images: the five residual blocks; text: each "
        "layer's attention and MLP sub-layers, six). Block scores: `block_importance(model, a, calibration, "
        "kind='influence')` (ShortGPT's 1 - cos(x, x + f(x))). 'depth only': blocks removed in order of ascending "
        "influence until the MACs are at most the target (`Plan.from_keep(a, {}, drop_blocks=...)`), so it lands "
        "where the last block takes it, usually below the target (the notes say where one block fewer lands); "
        "'depth+width': `solve(a, target={'macs': f}, importance=c, depth=scores, evaluate=calibration_loss(model, "
        "calibration, loss=...))`, which tries a few numbers of removed blocks, narrows groups to the target for "
        "each and keeps the plan of lowest calibration loss (of `simulate`, before any BN recalibration). The "
        "notes name the blocks removed. Same BN recalibration and fine-tuning as the width-only rows. Images "
        "only, 'depth+width, evaluate after BN recal.': the same solve with `evaluate` = the calibration loss of "
        "`prune(model, plan)` after `recalibrate_batch_norm` (the pruned model the table evaluates), since "
        "`calibration_loss` scores `simulate`, whose batch norms keep the unpruned model's statistics.",
        "- Sparse training: the trained model gets the fine-tuning number of steps (other batches of the same "
        "data, same AdamW schedule) on loss + λ·`GroupRegularizer(a, kind='group_lasso', "
        f"by_cost={settings.sparse_by_cost})`, then `solve(..., importance='l2')` at each target, `prune`, (BN "
        "recalibration,) and the same fine-tuning. λ = ρ · (calibration loss / penalty) of the trained model "
        f"(the penalty starts at ρ times the task loss), ρ swept over {', '.join(map(str, settings.sparse_rhos))}; "
        "the ρ kept is the one whose l2-pruned models have the lowest calibration loss averaged over the targets "
        "(training data, never the test set; images after BN recalibration). 'extra training (λ=0)' is the "
        "control: the same extra steps without the penalty, so the sparse rows' extra training is not mistaken "
        "for the penalty's effect.",
        f"- {AT_TP}: where Torch-Pruning's uniform ratio cannot land within 1% of a target, depgraph's default "
        "strategy again at the MACs Torch-Pruning kept (rows labelled with the target), so the two compare at "
        "equal MACs.",
        "- Calibration: the first batches of a fixed shuffle of the training data; fine-tuning: the same AdamW "
        "(lr, cosine decay), steps and data order for every pruned model.",
    ])


def code_version() -> str:
    """The commit the depgraph code was at, and whether ``depgraph/`` or ``passes/`` had uncommitted changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "?"

    dirty = git("status", "--porcelain", "--", "depgraph", "passes")
    return f"depgraph at {git('rev-parse', '--short', 'HEAD')}" + (" with uncommitted changes" if dirty else "")


def cache_note(outcomes: list[Outcome]) -> str:
    cached = [o.task.name for o in outcomes if o.cached]
    return f"trained weights from the cache for {', '.join(cached)}" if cached else "training included"


def page(outcomes: list[Outcome], args: argparse.Namespace, settings: Settings, seconds: float) -> str:
    s = dataclasses.asdict(settings)
    return "\n\n".join([
        "# Pruning quality: depgraph vs Torch-Pruning",
        f"`python benchmarks/quality.py {' '.join(args.argv)}`".replace(" `", "`"),
        f"Run {datetime.datetime.now():%Y-%m-%d %H:%M}, {seconds / 60:.1f} minutes wall time "
        f"({cache_note(outcomes)}); {args.version}; Python "
        f"{platform.python_version()}, torch {torch.__version__}, torch-pruning {version('torch-pruning')}, "
        f"scikit-learn {version('scikit-learn')}; `torch.set_num_threads({args.threads})` on a shared 2-core CPU; "
        "`torch.use_deterministic_algorithms(True, warn_only=True)`, seeds fixed.",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in s.items()) + ".",
        notes(settings),
        *(section(o, args.targets, settings) for o in outcomes),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="images,text", help="comma-separated: images, text")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="fractions of the MACs kept")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help="comma-separated rows to make: width (depgraph width-only), depth (depth only, "
                             "depth+width), sparse (sparse training + l2), tp (Torch-Pruning); default: all")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--out", type=Path, help="markdown file (default: results/quality.md; "
                                                 "with --quick, /tmp/quality-quick.md)")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    args.targets = [float(t) for t in args.targets.split(",")]
    kinds = tuple(args.kinds.split(","))
    if unknown := sorted(set(kinds) - set(KINDS)):
        parser.error(f"unknown --kinds {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    args.version = code_version()  # when the run starts: another commit may land while it runs
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    settings = Settings.quick() if args.quick else Settings()
    tasks: dict[str, Callable[[Settings], Task]] = {"images": Images, "text": Text}
    start = time.perf_counter()
    outcomes = [run_task(tasks[name](settings), args.targets, settings, kinds) for name in args.tasks.split(",")]
    text = page(outcomes, args, settings, time.perf_counter() - start)
    print(text)
    write(args.out or (Path("/tmp/quality-quick.md") if args.quick else RESULTS / "quality.md"), text)


if __name__ == "__main__":
    main()
