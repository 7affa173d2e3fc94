"""Helpers shared by the benchmark scripts: building models on ``meta``, timing, markdown.

Not a script; ``coverage.py``, ``analyze_speed.py`` and ``prune_speed.py`` import it (run them as
``python benchmarks/<script>.py`` so this directory is on ``sys.path``).
"""

from __future__ import annotations

import datetime
import gc
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"


def get_model(name: str) -> nn.Module:
    """torchvision model ``name`` (``weights=None``), or timm's for ``timm:NAME`` (``pretrained=False``)."""
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name.removeprefix("timm:"), pretrained=False)
    return torchvision.models.get_model(name, weights=None)


def build(name: str) -> tuple[nn.Module, str]:
    """Build model ``name`` (:func:`get_model`), in eval mode, on ``meta``.

    Returns the model and where it was built: ``"meta"``, or ``"cpu"`` when building
    on meta failed and the model was built on the CPU and then moved to meta.
    """
    try:
        with torch.device("meta"):
            model = get_model(name)
        where = "meta"
    except Exception:  # noqa: BLE001 -- any init that reads values cannot run on meta
        model = get_model(name).to("meta")
        where = "cpu"
    return model.eval(), where


def image_input(model: nn.Module, name: str, size: int | None = None) -> torch.Tensor:
    """A ``(1, 3, size, size)`` meta input; by default the size the model expects.

    timm models carry their input size, torchvision's ViTs their ``image_size``; inception_v3 needs
    299; everything else gets 224.
    """
    if size is None and hasattr(model, "pretrained_cfg"):  # timm
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    if size is None:
        size = getattr(model, "image_size", 299 if name == "inception_v3" else 224)
    return torch.zeros(1, 3, size, size, device="meta")


def first_line(exc: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters, safe in a table cell."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def median_time(
    fn: Callable[[], Any], repeats: int, warmup: int = 1, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Median time of ``fn()`` in seconds over ``repeats`` calls, after ``warmup`` calls.

    ``clock`` is ``time.perf_counter`` (wall) or ``time.process_time`` (CPU time of this
    process, which other jobs on a shared machine disturb less). The garbage collector
    runs before each call, outside the timed region.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are formatted with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> str:
    """One line saying when and where the numbers were taken."""
    return (
        f"Run {datetime.datetime.now():%Y-%m-%d %H:%M} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs visible (shared with other jobs: expect noise), Python "
        f"{platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}."
    )


def write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (creating its directory) and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(f"wrote {path}")


def count_params(model: "torch.nn.Module") -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def tp_magnitude_prune(model: "torch.nn.Module", x: "torch.Tensor", ratio: float) -> "torch.nn.Module":
    """A copy of ``model`` pruned by Torch-Pruning's ``MagnitudePruner`` (L2) at ``pruning_ratio=ratio``,
    the final classifier (last Linear or Conv2d) ignored, nn.MultiheadAttention heads declared."""
    import copy

    import torch_pruning as tp
    import torchvision
    from torch import nn

    model = copy.deepcopy(model)
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=ratio, ignored_layers=[last], num_heads=heads)
    pruner.step()
    if isinstance(model, torchvision.models.VisionTransformer):
        model.hidden_dim = model.conv_proj.out_channels  # read by its forward's reshape
    return model


def receive(receiver: Connection, proc: multiprocessing.Process, timeout: float) -> Any:
    """The next message from ``proc``, or why none came within ``timeout`` seconds (a string)."""
    try:
        return receiver.recv() if receiver.poll(timeout) else f"timed out after {timeout:.0f} s"
    except EOFError:
        proc.join()
        return f"worker process died (exit code {proc.exitcode}; out of memory?)"


def in_fork(target: Callable[..., None], args: tuple[Any, ...], timeouts: Sequence[float]) -> list[Any]:
    """Run ``target(connection, *args)`` in a forked process and collect one message per entry
    of ``timeouts``, each within its seconds; one that does not come is replaced by the reason
    (a string) and ends the collection. The process is then killed (its memory returns)."""
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(sender, *args))
    proc.start()
    sender.close()
    messages: list[Any] = []
    for timeout in timeouts:
        messages.append(receive(receiver, proc, timeout))
        if isinstance(messages[-1], str):
            break
    proc.kill()
    proc.join()
    return messages
