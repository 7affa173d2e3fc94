"""The equivalence oracle for plans (DESIGN.md, "Applying a plan" and "Oracles for the tests").

:func:`check_plan` applies one plan both ways and asserts the promise that ties
``simulate`` and ``prune`` together:

- ``simulate(model, plan)(x)`` equals ``prune(model, plan)(x)`` within ``1e-4``
  relative to the output's scale (``max |y|``, floored at ``1e-3``), in float32;
- the pruned model keeps the output shapes, has exactly the parameter shapes the
  plan implies (every member axis loses the indices of the removed units) and so
  fewer parameters whenever the plan removes a unit;
- the simulated model keeps every parameter shape, and its parameters are zero at
  the removed indices of every member axis;
- the caller's model is bit-for-bit unchanged (:func:`fingerprint`).

A comparison is only meaningful when the outputs are not vanishingly small: a
model whose output scale is below the ``1e-3`` floor (random-init MobileNetV3 in
eval mode outputs ~1e-10) would pass anything. :func:`calibrate` gives batch norms
the statistics of a batch so that activations keep unit scale.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

import depgraph
from depgraph import Analysis, Plan

__all__ = [
    "FLOOR",
    "RTOL",
    "Fingerprint",
    "calibrate",
    "check_plan",
    "expected_shapes",
    "fingerprint",
    "outputs_of",
    "random_keep",
    "weight_ops",
]

RTOL = 1e-4
"""Allowed max |simulate - prune|, relative to the simulated output's scale."""
FLOOR = 1e-3
"""Smallest output scale the tolerance is relative to."""

_HOOKS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


@dataclass(frozen=True)
class Fingerprint:
    """What a public call must leave unchanged on the caller's model."""

    state: str
    """sha256 over every state_dict entry's name, dtype, shape and bytes."""
    tensors: tuple[tuple[str, int, bool], ...]
    """(name, id, requires_grad) of every parameter and buffer, shared ones included."""
    modules: tuple[tuple[str, type, bool], ...]
    """(name, class, training) of every module: parametrizing a module changes its class."""
    hooks: tuple[tuple[str, str, tuple[int, ...]], ...]
    """(module, hook dict, handle ids) for every non-empty hook dict."""


def fingerprint(model: nn.Module) -> Fingerprint:
    """Fingerprint ``model``: values, tensor identities, classes, training flags, hooks."""
    digest = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.device.type != "meta":
            digest.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    named = (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
    tensors = tuple((name, id(t), t.requires_grad) for name, t in named)
    modules = tuple((name, type(m), m.training) for name, m in model.named_modules(remove_duplicate=False))
    hooks = tuple(
        (name, attr, tuple(getattr(m, attr)))
        for name, m in model.named_modules(remove_duplicate=False)
        for attr in _HOOKS
        if getattr(m, attr, None)
    )
    return Fingerprint(digest.hexdigest(), tensors, modules, hooks)


def expected_shapes(model: nn.Module, analysis: Analysis, plan: Plan) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape after pruning: each member axis loses the union, over the
    groups the plan prunes, of the indices its removed units map to."""
    removed: dict[tuple[str, int], set[int]] = {}
    for g in analysis.groups:
        units = plan.removed(g.index)
        for m in g.members:
            removed.setdefault((m.name, m.dim), set()).update(m.indices(units).tolist())
    shapes = {}
    for name, p in model.named_parameters():
        shapes[name] = tuple(n - len(removed.get((name, d), ())) for d, n in enumerate(p.shape))
    return shapes


def check_plan(model: nn.Module, inputs: tuple[Any, ...], plan: Plan) -> tuple[nn.Module, fx.GraphModule]:
    """Apply ``plan`` both ways and assert the promise (see the module docstring).

    ``model`` should be in eval mode (batch norms in train mode mix the batch, and
    simulation then differs from pruning by design). Returns ``(pruned, simulated)``.
    """
    before = fingerprint(model)
    analysis = depgraph.analyze(model, inputs)
    assert plan.fingerprint == analysis.fingerprint, "the plan was not made for this model and inputs"
    with torch.no_grad():
        reference = tree_leaves(model(*inputs))
        simulated = depgraph.simulate(model, plan)
        assert fingerprint(model) == before, "simulate changed the caller's model"
        pruned = depgraph.prune(model, plan)
        assert fingerprint(model) == before, "prune changed the caller's model"
        ys, yp = tree_leaves(simulated(*inputs)), tree_leaves(pruned(*inputs))
        assert fingerprint(model) == before, "running the results changed the caller's model"
    assert isinstance(simulated, fx.GraphModule)
    _check_outputs(reference, ys, yp)
    _check_pruned_shapes(model, analysis, plan, pruned)
    _check_masked_parameters(model, analysis, plan, simulated)
    return pruned, simulated


def _check_outputs(reference: list[Any], ys: list[Any], yp: list[Any]) -> None:
    assert len(ys) == len(yp) == len(reference)
    for i, (r, s, p) in enumerate(zip(reference, ys, yp)):
        if not isinstance(r, torch.Tensor):
            assert s == p == r, f"non-tensor output {i} differs: {r!r}, {s!r}, {p!r}"
            continue
        assert s.shape == r.shape, f"simulate changed output {i}'s shape {tuple(r.shape)} to {tuple(s.shape)}"
        assert p.shape == r.shape, f"prune changed output {i}'s shape {tuple(r.shape)} to {tuple(p.shape)}"
        scale = max(s.abs().max().item(), FLOOR)
        err = (p - s).abs().max().item()
        assert err <= RTOL * scale, f"output {i}: max |prune - simulate| = {err:.3g} > {RTOL * scale:.3g}"


def _check_pruned_shapes(model: nn.Module, analysis: Analysis, plan: Plan, pruned: nn.Module) -> None:
    expected = expected_shapes(model, analysis, plan)
    got = {name: tuple(p.shape) for name, p in pruned.named_parameters()}
    wrong = {n: (got[n], expected[n]) for n in got if n in expected and got[n] != expected[n]}
    assert not wrong, f"pruned parameter shapes (got, expected): {wrong}"
    unknown = sorted(set(got) - set(expected))
    assert not unknown, f"the pruned model has parameters the original lacks: {unknown}"
    removes = any(len(plan.removed(i)) for i in plan.keep)
    count = sum(p.numel() for p in pruned.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert count < total if removes else count == total, f"{count} parameters after pruning, {total} before"


def _check_masked_parameters(model: nn.Module, analysis: Analysis, plan: Plan, simulated: nn.Module) -> None:
    for name, p in model.named_parameters():
        masked = _lookup(simulated, name)
        if masked is not None:
            assert masked.shape == p.shape, f"simulate changed {name}'s shape {tuple(p.shape)}"
    for g in analysis.groups:
        units = plan.removed(g.index)
        if not len(units):
            continue
        for m in g.members:
            masked = _lookup(simulated, m.name)
            if isinstance(masked, torch.Tensor) and isinstance(_lookup(model, m.name), nn.Parameter):
                zero = masked.detach().index_select(m.dim, m.indices(units))
                assert not zero.any(), f"simulate left removed entries of {m.name} dim {m.dim} non-zero"


def _lookup(module: nn.Module, name: str) -> Any:
    owner, _, attr = name.rpartition(".")
    try:
        return getattr(module.get_submodule(owner), attr)
    except AttributeError:
        return None  # fx drops what the graph does not use


def calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give every batch norm the statistics of ``x``'s batch, then switch to eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: one batch sets the statistics
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def random_keep(analysis: Analysis, seed: int) -> dict[int, torch.Tensor]:
    """For every group, a random non-empty subset of its units (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in analysis.groups:
        count = int(torch.randint(1, g.size + 1, (1,), generator=gen))
        keep[g.index] = torch.randperm(g.size, generator=gen)[:count]
    return keep


def weight_ops(analysis: Analysis, weights: Collection[str]) -> list[str]:
    """Names of the ops of ``analysis.graph`` that read one of the parameters ``weights``
    (simulate and prune keep the analysis graph's node names)."""
    return [n.name for n in analysis.graph.graph.nodes
            if n.op == "call_function" and any(a.op == "get_attr" and a.target in weights for a in n.all_input_nodes)]


def outputs_of(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """``gm`` cut after the nodes ``names``, returning their values (what a recorded detector
    computes before its first data-dependent op can be compared on its own)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    graph, env = fx.Graph(owning_module=gm), {}
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
        if all(nodes[k] in env for k in names):
            break
    graph.output(tuple(env[nodes[k]] for k in names))
    graph.eliminate_dead_code()
    return fx.GraphModule(gm, graph)
