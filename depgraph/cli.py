"""Command line: ``depgraph analyze torchvision:resnet50``, ``depgraph prune ... --out DIR``,
``depgraph report ... [--plan plan.json] --out report.html`` (also ``python -m depgraph``).

Model specs:

- ``torchvision:NAME`` (``weights=None``: nothing is downloaded), ``timm:NAME`` (``pretrained=False``);
- ``hf:PATH``: a local Hugging Face directory (its weights when it has them, random weights
  from its ``config.json`` otherwise) or a ``config.json`` file; never a download. ``prune`` of a
  directory holding safetensors weights builds the model on ``meta``, ranks with ``l1`` / ``l2``
  read one tensor at a time (:func:`depgraph.ondisk.checkpoint_importance`) or ``random``, and
  prunes the checkpoint shard by shard (:func:`depgraph.prune_checkpoint`; ``--no-stream``:
  load it whole);
- ``package.module:factory``: the factory called with no arguments;
- ``FILE.pt2``: a program saved by ``torch.export.save`` (its own example inputs).

Exit codes: 0 done, 1 depgraph refused (the message says why and what to do), 2 bad usage
(an unknown spec, a missing file, a malformed option).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from passes.adopt import undescribed

from .analyze import analyze
from .apply import prune
from .costs import cost
from .errors import DepgraphError, PlanError
from .groups import Analysis
from .importance import Criterion
from .ondisk import checkpoint_importance
from .plan import Plan
from .report import report
from .solver import solve
from .stream import meta_model, model_class, prune_checkpoint, weights_on_disk

__all__ = ["main", "load_model", "UsageError"]


STREAMED = ("l1", "l2", "random")
"""The ``--importance`` criteria an hf:DIR with safetensors weights is pruned with shard by shard."""


class UsageError(Exception):
    """A command line the tool cannot act on (exit code 2)."""


def load_model(spec: str) -> tuple[nn.Module, Any]:
    """The model a spec names (module doc), in eval mode, and its default example inputs
    (None: inferred by :func:`depgraph.analyze`).

    >>> model, inputs = load_model("torchvision:resnet18")
    >>> type(model).__name__, inputs
    ('ResNet', None)
    """
    if spec.endswith(".pt2"):
        return _exported(Path(spec))
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise UsageError(f"model must be torchvision:NAME, timm:NAME, hf:PATH, package.module:factory or FILE.pt2, "
                         f"got {spec!r}")
    if kind == "hf":
        return _hugging_face(Path(name))
    if kind == "timm":
        timm = _module("timm", "timm:NAME needs timm: pip install timm")
        try:
            return timm.create_model(name, pretrained=False).eval(), None
        except RuntimeError as exc:  # timm's "Unknown model"
            raise UsageError(f"timm has no model {name!r}: {exc}") from exc
    module = _module("torchvision.models" if kind == "torchvision" else kind, f"cannot import {kind!r}")
    factory: Callable[..., nn.Module] | None = getattr(module, name, None)
    if not callable(factory):
        raise UsageError(f"{kind!r} has no factory {name!r}")
    model = factory(weights=None) if kind == "torchvision" else factory()
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval(), None


def _module(name: str, message: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UsageError(f"{message}: {exc}") from exc


def _exported(path: Path) -> tuple[nn.Module, Any]:
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    program = torch.export.load(str(path))
    args, kwargs = program.example_inputs or ((), {})
    return program.module(), (dict(kwargs) if kwargs else tuple(args))


def _hugging_face(path: Path) -> tuple[nn.Module, Any]:
    transformers = _module("transformers", "hf:PATH needs transformers: pip install transformers")
    if not path.exists():
        raise UsageError(f"no such Hugging Face directory or config file: {path}")
    folder = path if path.is_dir() else path.parent
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} holds no Hugging Face config: {str(exc).splitlines()[0]}") from exc
    cls = model_class(transformers, config)
    weighted = path.is_dir() and (any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")))
    if weighted:
        model = cls.from_pretrained(str(folder), local_files_only=True)
    else:
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    return model.eval(), {"input_ids": torch.zeros(1, 16, dtype=torch.long), "use_cache": False}


def _inputs(default: Any, shape: tuple[int, ...] | None) -> Any:
    if shape is None:
        return default
    if isinstance(default, dict) and "input_ids" in default:
        return {**default, "input_ids": torch.zeros(shape, dtype=torch.long)}
    return torch.zeros(shape)


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected sizes separated by commas, e.g. 1,3,224,224; got {text!r}") from exc


def _target(text: str) -> dict[str, float]:
    metric, sep, value = text.partition("=")
    try:
        if sep:
            return {metric: float(value)}
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected METRIC=FRACTION, e.g. macs=0.5; got {text!r}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="depgraph", description=__doc__.splitlines()[0].rstrip(","),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="print the coupling groups of a model")
    _common(a)
    out = a.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print groups, pinned atoms and notes as JSON")
    out.add_argument("--graphml", metavar="FILE", help="write groups and their members as GraphML")
    out.add_argument("--dot", metavar="FILE", help="write groups and the layers they touch as Graphviz DOT")
    a.add_argument("--lookup", metavar="NAME[:DIM[:INDEX]]", help="what goes with a parameter axis or index")
    p = sub.add_parser("prune", help="solve a plan and write the pruned model")
    _common(p)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--target", type=_target, metavar="METRIC=F", help="keep F of the macs, params or latency")
    how.add_argument("--sparsity", type=float, metavar="R", help="remove R of every group's units")
    how.add_argument("--config", metavar="FILE", help="an NNI-style config list (JSON)")
    p.add_argument("--importance", default="l2", choices=["l1", "l2", "bn_scale", "random"])
    p.add_argument("--round-to", type=int, default=1, metavar="N", help="keep a multiple of N units per group")
    p.add_argument("--seed", type=int, default=0, help="seed for --importance random")
    p.add_argument("--out", required=True, metavar="DIR", help="where the plan, weights and summary go")
    p.add_argument("--no-stream", action="store_true",
                   help="load an hf:DIR checkpoint whole even where it could be pruned shard by shard")
    r = sub.add_parser("report", help="write an HTML report of the groups (and of a plan): one file, no network")
    _common(r)
    r.add_argument("--plan", metavar="FILE", help="a plan.json made for this model (as depgraph prune writes it)")
    r.add_argument("--out", required=True, metavar="FILE", help="the HTML file to write")
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="torchvision:NAME, timm:NAME, hf:PATH, package.module:factory or FILE.pt2")
    p.add_argument("--input-shape", type=_shape, metavar="SIZES",
                   help="example input shape, e.g. 1,3,224,224 (token ids for hf:; inferred when omitted)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # exits with 2 on bad usage
    try:
        return _COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"depgraph: error: {exc}", file=sys.stderr)
        return 2
    except DepgraphError as exc:
        print(f"depgraph: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _analyze(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    model, default = load_model(args.model)
    built = time.perf_counter() - start
    a = analyze(model, _inputs(default, args.input_shape))
    if args.lookup:
        name, _, rest = args.lookup.partition(":")
        dim, _, index = rest.partition(":")
        if not (dim or "0").isdigit() or not (index or "0").isdigit():
            raise UsageError(f"--lookup takes NAME[:DIM[:INDEX]] with whole numbers, got {args.lookup!r}")
        for answer in a.lookup(name, int(dim or 0), int(index) if index else None):
            print(answer)
        return 0
    if args.json:
        print(json.dumps(_as_json(a), indent=1))
        return 0
    if args.graphml:
        _write_graphml(a, Path(args.graphml))
    elif args.dot:
        Path(args.dot).write_text(_as_dot(a))
    print(a.summary())
    print(f"analyzed {args.model} in {a.seconds:.3f} s (building the model took {built:.2f} s)")
    return 0


def _prune(args: argparse.Namespace) -> int:
    folder = _streamed_folder(args)
    if folder is not None:
        try:
            return _prune_streamed(args, folder)
        except PlanError as exc:  # the plan fits the model: its config cannot describe the pruned sizes
            print(f"depgraph: note: {exc}; so {folder} is loaded whole and pruned in memory", file=sys.stderr)
    model, default = load_model(args.model)
    a = analyze(model, _inputs(default, args.input_shape))
    plan = _solve(a, args)
    pruned = prune(model, plan)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / "plan.json")
    return _write_summary(a, plan, args.model, _save_weights(pruned, out), out)


def _solve(a: Analysis, args: argparse.Namespace, importance: Criterion | None = None) -> Plan:
    """The plan of the command line's options; ``importance`` replaces ``--importance``'s name."""
    options = {"importance": args.importance if importance is None else importance, "round_to": args.round_to,
               "seed": args.seed}
    if args.target is not None:
        return solve(a, target=args.target, **options)
    if args.sparsity is not None:
        return solve(a, args.sparsity, **options)
    return solve(a, config_list=_config(Path(args.config)), **options)


def _streamed_folder(args: argparse.Namespace) -> Path | None:
    """The hf:DIR to prune shard by shard: one holding safetensors weights, with an importance
    computed from the shards (``STREAMED``), unless ``--no-stream``. A note says when another
    importance makes the checkpoint load whole."""
    kind, _, name = args.model.partition(":")
    if kind != "hf" or args.no_stream or not weights_on_disk(name):
        return None
    if args.importance not in STREAMED:
        print(f"depgraph: note: --importance {args.importance} needs the model in memory, so {name} is loaded whole; "
              f"--importance {', '.join(STREAMED)} prune the checkpoint shard by shard", file=sys.stderr)
        return None
    return Path(name)


def _prune_streamed(args: argparse.Namespace, folder: Path) -> int:
    """The plan made on the model built on ``meta``, and the checkpoint pruned shard by shard."""
    model = meta_model(folder)
    default = {"input_ids": torch.zeros(1, 16, dtype=torch.long), "use_cache": False}
    inputs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v
              for k, v in _inputs(default, args.input_shape).items()}
    a = analyze(model, inputs)
    importance = None if args.importance == "random" else checkpoint_importance(folder, args.importance, model=model)
    plan = _solve(a, args, importance)
    out = prune_checkpoint(folder, plan, Path(args.out), analysis=a)
    plan.save(out / "plan.json")
    written = f"{out} (Hugging Face, pruned shard by shard: from_pretrained({str(out)!r}))"
    return _write_summary(a, plan, args.model, written, out)


def _write_summary(a: Analysis, plan: Plan, spec: str, written: str, out: Path) -> int:
    text = _summary(a, plan, spec, written)
    (out / "summary.txt").write_text(text + "\n")
    print(text)
    return 0


def _report(args: argparse.Namespace) -> int:
    plan_path = Path(args.plan) if args.plan else None
    if plan_path is not None and not plan_path.is_file():
        raise UsageError(f"no such plan file: {plan_path}")
    plan = Plan.load(plan_path) if plan_path is not None else None
    model, default = load_model(args.model)
    a = analyze(model, _inputs(default, args.input_shape))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report(a, out, plan, title=args.model)
    print(f"wrote {out}: {len(a.groups)} groups, {len(a.pinned)} pinned atoms, {len(a.unsupported)} unsupported ops"
          + (f", plan {plan_path}" if plan_path else ""))
    return 0


def _config(path: Path) -> Any:
    if not path.is_file():
        raise UsageError(f"no such config file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not JSON: {exc}") from exc


def _save_weights(pruned: nn.Module, out: Path) -> str:
    """A Hugging Face directory where the pruned model's config rebuilds it, else model.safetensors."""
    save_pretrained = getattr(pruned, "save_pretrained", None)
    described = not any(undescribed(pruned))
    if callable(save_pretrained) and hasattr(pruned, "config") and described:
        save_pretrained(str(out))  # config.json + model.safetensors: from_pretrained(out) rebuilds it
        return f"{out} (Hugging Face: from_pretrained({str(out)!r}))"
    from safetensors.torch import save_model

    save_model(pruned, str(out / "model.safetensors"))
    why = "" if described else " (its config cannot describe the pruned sizes, so from_pretrained could not rebuild it)"
    return (f"{out / 'model.safetensors'}{why} (load: depgraph.prune(model, depgraph.Plan.load('plan.json')), then "
            "safetensors.torch.load_model)")


def _summary(a: Analysis, plan: Plan, spec: str, written: str) -> str:
    before, after = cost(a), cost(a, plan)
    rows = [f"pruned {spec}",
            f"  params {before.params:,} -> {after.params:,} ({after.params / max(before.params, 1):.1%})",
            f"  MACs   {before.macs:,} -> {after.macs:,} ({after.macs / max(before.macs, 1):.1%})",
            f"  weights: {written}", "  groups pruned (kept / units):"]
    for g in a.groups:
        if g.index in plan.keep:
            layers = ", ".join(g.layers[:3]) + (", ..." if len(g.layers) > 3 else "")
            rows.append(f"    {g.index:>4}  {len(plan.keep[g.index]):>5} / {g.size:<5}  {layers}")
    return "\n".join(rows)


def _as_json(a: Analysis) -> dict[str, Any]:
    return {
        "tracer": a.tracer,
        "seconds": a.seconds,
        "groups": [{"index": g.index, "size": g.size, "min_keep": g.min_keep, "layers": g.layers,
                    "members": [[m.name, m.dim] for m in g.members]} for g in a.groups],
        "pinned": [{"size": p.size, "reason": p.reason, "members": [list(m) for m in p.members]} for p in a.pinned],
        "unsupported": [{"op": str(u.op), "node": u.node, "reason": u.reason} for u in a.unsupported],
        "notes": a.notes,
    }


def _write_graphml(a: Analysis, path: Path) -> None:
    import networkx as nx

    graph = nx.relabel_nodes(a.to_networkx(), lambda n: ":".join(map(str, n)))
    nx.write_graphml(graph, str(path))


def _as_dot(a: Analysis) -> str:
    lines = ["graph depgraph {", "  node [shape=box];"]
    for g in a.groups:
        lines.append(f'  "group {g.index}" [shape=ellipse, label="group {g.index}\\n{g.size} units"];')
        lines += [f'  "group {g.index}" -- "{layer}";' for layer in g.layers]
    return "\n".join(lines + ["}"]) + "\n"


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"analyze": _analyze, "prune": _prune, "report": _report}

if __name__ == "__main__":
    sys.exit(main())
