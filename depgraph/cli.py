"""Command line: ``python -m depgraph analyze torchvision:resnet50``.

The model is named ``package.module:factory`` (``torchvision:NAME`` is short for
``torchvision.models:NAME``); the factory is called with no arguments (torchvision
factories get ``weights=None``, so nothing is downloaded).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import Callable, Sequence

import torch
from torch import nn

from passes.errors import DepgraphError

from .analyze import analyze

__all__ = ["main", "load_model"]


def load_model(spec: str) -> nn.Module:
    """Build the model named by ``package.module:factory``.

    >>> type(load_model("torchvision:resnet18")).__name__
    'ResNet'
    """
    module_name, sep, factory_name = spec.partition(":")
    if not sep or not factory_name:
        raise SystemExit(f"model must be given as package.module:factory (e.g. torchvision:resnet50), got {spec!r}")
    if module_name == "torchvision":
        module_name = "torchvision.models"
    try:
        factory: Callable[..., nn.Module] = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"cannot find {factory_name!r} in {module_name!r}: {exc}") from exc
    return factory(weights=None) if module_name.startswith("torchvision") else factory()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m depgraph", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("analyze", help="print the coupling groups of a model")
    p.add_argument("model", help="package.module:factory, e.g. torchvision:resnet50")
    p.add_argument("--input-shape", type=lambda s: tuple(int(x) for x in s.split(",")),
                   help="example input shape, e.g. 1,3,224,224 (inferred when omitted)")
    args = parser.parse_args(argv)
    build_start = time.perf_counter()
    model = load_model(args.model).eval()
    built = time.perf_counter() - build_start
    example = torch.zeros(args.input_shape) if args.input_shape else None
    try:
        result = analyze(model, example)
    except DepgraphError as exc:
        print(f"depgraph: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    print(f"analyzed {args.model} in {result.seconds:.3f} s (building the model took {built:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
