"""Coverage of ``depgraph.analyze`` over every torchvision classification model.

Run::

    python benchmarks/coverage.py                       # all models, writes results/coverage.md
    python benchmarks/coverage.py --models resnet18,vit_b_16   # a subset, printed only
    python benchmarks/coverage.py --models resnet18 --out /tmp/cov.md

Each model is built with ``weights=None`` in eval mode on the ``meta`` device (on the
CPU, then moved to meta, when its init cannot run on meta), with a ``(1, 3, 224, 224)``
input (299 for inception_v3). For each: whether bare ``torch.fx.symbolic_trace``
traces it, whether ``depgraph.analyze`` succeeds (else the error's first line), the
number of groups and unsupported ops, and the analysis time. Every model runs under
its own try/except, so one failure never stops the sweep. Prints a markdown table and
the summary line ``N/M analyzed``; writes it to ``--out`` (by default
``benchmarks/results/coverage.md`` for a full run, nowhere for a subset).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torchvision
from _util import RESULTS, build, environment, first_line, image_input, markdown_table, write
from torch import fx

import depgraph

HEADER = ["model", "built on", "fx traces", "analyzed", "groups", "unsupported ops (count: which)", "analyze s (one cold run)", "error"]


@dataclass
class Row:
    """What the sweep found for one model."""

    model: str
    built: str = "-"
    traced: str = "-"
    analyzed: bool = False
    groups: int | str = "-"
    unsupported: str = "-"
    seconds: str = "-"
    error: str = ""

    def cells(self) -> list[object]:
        """The row's cells, in the order of ``HEADER``."""
        return [self.model, self.built, self.traced, "yes" if self.analyzed else "no",
                self.groups, self.unsupported, self.seconds, self.error]


def cover(name: str) -> Row:
    """Build, trace and analyze one model; never raises."""
    row = Row(name)
    try:
        model, row.built = build(name)
    except Exception as exc:  # noqa: BLE001 -- one broken model must not stop the sweep
        row.error = "build: " + first_line(exc)
        return row
    try:
        fx.symbolic_trace(model)
        row.traced = "yes"
    except Exception:  # noqa: BLE001 -- fx raises many types
        row.traced = "no"
    x = image_input(model, name)
    start = time.perf_counter()
    try:
        analysis = depgraph.analyze(model, x)
    except Exception as exc:  # noqa: BLE001 -- reported in the table, not raised
        row.error = first_line(exc, limit=240)
        return row
    row.seconds = f"{time.perf_counter() - start:.3f}"
    row.analyzed, row.groups = True, len(analysis.groups)
    row.unsupported = unsupported_summary([u.op for u in analysis.unsupported])
    return row


def unsupported_summary(ops: list[str]) -> str:
    """``"23: stochastic_depth x18, layer_norm x5"`` (short op names, most frequent first), or ``"0"``."""
    counts = Counter(op.rpartition(".")[2] for op in ops)
    return f"{len(ops)}: " + ", ".join(f"{op} x{n}" for op, n in counts.most_common()) if ops else "0"


def report(rows: list[Row]) -> str:
    """The markdown page: environment, table, summary line."""
    done = sum(r.analyzed for r in rows)
    traced = sum(r.traced == "yes" for r in rows)
    return "\n\n".join([
        "# depgraph coverage: torchvision classification models",
        environment(),
        markdown_table(HEADER, [r.cells() for r in rows]),
        f"{done}/{len(rows)} analyzed ({traced}/{len(rows)} traced by bare torch.fx).",
    ])


def main() -> None:
    """Parse arguments, run the sweep, print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated subset of torchvision model names")
    parser.add_argument("--out", type=Path, help="markdown file to write (default: results/coverage.md "
                        "for a full run, none for a subset)")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models)
    rows = []
    for name in names:
        rows.append(cover(name))
        print(" | ".join(str(c) for c in rows[-1].cells()), flush=True)
    text = report(rows)
    print(text)
    out = args.out or (None if args.models else RESULTS / "coverage.md")
    if out:
        write(out, text)


if __name__ == "__main__":
    main()
