"""``depgraph.solve``: importance + ratios (per group, global, dependency groups) -> Plan."""

from __future__ import annotations

import math
from typing import Any, Callable, Hashable, Mapping, Sequence

import torch

from passes.errors import InputError

from .config import Block, parse, resolve
from .depth import depth_plan
from .groups import Analysis
from .importance import AGGREGATES, CRITERIA, Criterion, ElementScores, Weights, describe, unit_scores
from .latency import LatencyTable, within_latency
from .plan import Plan
from .targets import STRATEGIES, check_target, target_counts

__all__ = ["solve"]

_ALL = "global_ranking=True"
"""The global group id of the plain form's global ranking (it names it in messages)."""


def solve(
    analysis: Analysis,
    sparsity: float | Mapping[int, float] | None = None,
    *,
    config_list: Sequence[Mapping[str, Any]] | None = None,
    importance: Criterion = "l2",
    aggregate: str = "mean",
    round_to: int = 1,
    global_ranking: bool = False,
    min_sparse_ratio: float = 0.0,
    max_sparse_ratio: float = 1.0,
    seed: int | None = None,
    target: Mapping[str, float] | None = None,
    latency_table: LatencyTable | None = None,
    strategy: str = "importance",
    depth: bool | Mapping[int, float] = False,
    evaluate: Callable[[Plan], float] | None = None,
) -> Plan:
    """Choose the units each group keeps: rank units by importance, remove the lowest.

    Parameters
    ----------
    analysis
        From :func:`depgraph.analyze`; weights are read from ``analysis.model``.
        Neither is modified.
    sparsity
        The plain form: a fraction of units to remove from every group, or a mapping
        ``{group index: fraction}`` (unlisted groups keep all their units).
    config_list
        The NNI-3.0 form instead of ``sparsity`` (see :mod:`depgraph.config`):
        entries select modules and give their groups ``sparse_ratio``,
        ``min/max_sparse_ratio``, ``global_group_id``, ``dependency_group_id``;
        ``apply_method`` settings are recorded in ``plan.settings``.
    importance
        ``"l1"``, ``"l2"``, ``"bn_scale"``, ``"random"``, the per-entry scores of
        :func:`depgraph.gradient_importance` (Taylor, Hessian: data-driven), or a callable
        ``f(group, tensors)`` returning one score per unit (see :mod:`depgraph.importance`).
    aggregate
        How member scores (and a dependency group's groups' scores) combine:
        ``"mean"``, ``"sum"`` or ``"max"``.
    round_to
        Keep a multiple of this many units: the multiple nearest to the requested
        count among the allowed ones (ties keep more); keeping the whole group is
        allowed unless a minimum ratio forbids it.
    global_ranking
        With a float ``sparsity``: rank all groups together (one global group).
    min_sparse_ratio, max_sparse_ratio
        With ``global_ranking``: the bounds of each group's own fraction.
    seed
        Seed for ``importance="random"`` (None: a fresh random seed); the global
        random state is not used.
    target
        Instead of ``sparsity``: ``{"macs": f}`` or ``{"params": f}``, the fraction of the
        model's MACs or parameters (:func:`depgraph.cost`) the pruned model keeps. Units
        go in the order ``strategy`` gives, across all groups, until the cost is
        at most the target (see :mod:`depgraph.targets`); ``round_to`` and
        ``min/max_sparse_ratio`` bound each group. A target below what the bounds allow
        is an error that says how low the cost can go. ``{"latency": f}`` keeps that fraction
        of the model's latency measured on its current device (:mod:`depgraph.latency`):
        the pruned model is timed and the solver corrects itself while it misses.
    strategy
        With a target, how it spreads over the groups: ``"importance"`` (the default: units
        ranked by normalized importance across all groups until the cost reaches the
        target), ``"uniform"`` (one fraction of every group) or ``"cost"`` (importance per
        cost saved, which may empty the groups whose units save the most); see
        :data:`depgraph.targets.STRATEGIES` and ``benchmarks/results/quality.md``.
    latency_table
        With a latency target: a :func:`depgraph.latency_table` of this analysis, to reuse
        (measured here otherwise: one prune and a few timed runs per group).
    depth
        With a MACs or parameters target: remove blocks (``analysis.blocks``) as well as units.
        A mapping gives each block's importance (:func:`depgraph.block_importance`); ``True``
        measures it with ``evaluate`` (the growth of its value when the block alone goes).
        Blocks go least important first; a few numbers of blocks are tried, the groups narrowed
        to the target for each, and the plan ``evaluate`` scores lowest wins (:mod:`depgraph.depth`).
    evaluate
        With ``depth``: ``evaluate(plan)`` (lower is better), e.g.
        :func:`depgraph.calibration_loss` of the model on a few batches.

    Returns
    -------
    Plan
        Kept units of every group that loses some; ``plan.settings`` holds recorded
        per-target settings (``{"fc.weight": {"apply_method": "mul"}}``).

    Notes
    -----
    A fraction ``r`` of ``n`` units removes ``floor(r * n)`` units, and never all of
    them (at least one unit is kept). Ties in importance remove the lower unit index
    first.

    **Global ranking.** The groups (or dependency groups) sharing a global id are
    ranked together; the budget counts units, not parameters: ``floor(r * N)`` of their
    ``N`` units in total, a dependency group counting its size once. Each group's
    scores are divided by the group's mean absolute score, so groups of different
    scale compete fairly. Each group first loses ``floor(min_sparse_ratio * size)``
    units, then the lowest normalized scores go until the budget is met, never past
    ``floor(max_sparse_ratio * size)`` units of a group. ``round_to`` then rounds each
    group's count, so the budget holds only approximately.

    **Dependency groups** are scored with ``aggregate`` over their groups' scores and
    keep the same unit positions in each group.

    Examples
    --------
    >>> import torch, depgraph
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    >>> with torch.no_grad():
    ...     _ = net[0].weight.copy_(torch.tensor([[3.0], [1.0], [4.0], [2.0]]))
    >>> a = depgraph.analyze(net, torch.zeros(1, 1))
    >>> depgraph.solve(a, 0.5, importance="l1", aggregate="max").keep
    {0: tensor([0, 2])}
    """
    _check_options(importance, aggregate, round_to, seed)
    if target is not None:
        if sparsity is not None or config_list is not None or global_ranking:
            raise InputError("target= chooses how much every group removes: pass it without sparsity=, "
                             "config_list= or global_ranking=")
        metric, fraction = check_target(target)
        if strategy not in STRATEGIES:
            raise InputError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        solve_at = _target_solver(analysis, importance, aggregate, round_to, (min_sparse_ratio, max_sparse_ratio),
                                  _generator(seed), strategy)
        if depth is not False:
            return _with_depth(analysis, depth, evaluate, (metric, fraction), solve_at)
        if metric == "latency":
            return within_latency(analysis, fraction, latency_table, solve_at)
        return solve_at((metric, fraction), None)
    if latency_table is not None:
        raise InputError("latency_table= goes with target={'latency': f}")
    if depth is not False:
        raise InputError("depth= goes with target={'macs': f} or {'params': f}: blocks and units share one budget")
    if (sparsity is None) == (config_list is None):
        raise InputError(
            "pass exactly one of sparsity= (a fraction, or {group index: fraction}) and config_list="
        )
    if config_list is not None:
        if global_ranking or min_sparse_ratio != 0.0 or max_sparse_ratio != 1.0:
            raise InputError("with config_list, give global_group_id, min_sparse_ratio and max_sparse_ratio "
                             "in its entries, not as arguments")
        blocks, settings = resolve(parse(config_list), analysis)
    else:
        blocks = _plain_blocks(analysis, sparsity, global_ranking, min_sparse_ratio, max_sparse_ratio)
        settings = {}
    keep = _keep(analysis, blocks, importance, aggregate, round_to, _generator(seed))
    plan = Plan.from_keep(analysis, keep)
    plan.settings = settings
    return plan


def _with_depth(analysis: Analysis, depth: bool | Mapping[int, float], evaluate: Callable[[Plan], float] | None,
                target: tuple[str, float], solve_at: Callable[[tuple[str, float], Any], Plan]) -> Plan:
    """The plan of :func:`depgraph.depth.depth_plan`, the block scores given or measured by ``evaluate``."""
    if target[0] == "latency":
        raise InputError("depth= needs a MACs or parameters target: the latency predictor does not model removed "
                         "blocks")
    if evaluate is None:
        raise InputError("depth= chooses how many blocks to remove by evaluating candidate plans: pass evaluate= "
                         "(e.g. depgraph.calibration_loss(model, batches, loss=...))")
    if not analysis.blocks:
        raise InputError("depth= found no removable blocks in this model (analysis.blocks is empty)")
    if depth is True:
        base = evaluate(Plan.from_keep(analysis, {}))
        scores = {i: evaluate(Plan.from_keep(analysis, {}, drop_blocks=[i])) - base
                  for i in range(len(analysis.blocks))}
    elif isinstance(depth, Mapping):
        scores = {int(i): float(s) for i, s in depth.items()}
        unknown = sorted(set(scores) - set(range(len(analysis.blocks))))
        if unknown:
            raise InputError(f"depth= scores blocks {unknown}, which the analysis does not have "
                             f"(it has {len(analysis.blocks)})")
    else:
        raise InputError(f"depth must be True or a mapping {{block index: importance}}, got {depth!r}")
    return depth_plan(analysis, scores, target, solve_at, evaluate)


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _target_solver(analysis: Analysis, importance: Criterion, aggregate: str, round_to: int,
                   ratios: tuple[float, float], generator: torch.Generator,
                   strategy: str) -> Callable[[tuple[str, float], Any], Plan]:
    """``solve_at(target, model)``: the plan for a target under a cost predictor (None: the
    exact :class:`~depgraph.costs.CostModel`), the units scored once."""
    low, high = _ratio("min_sparse_ratio", ratios[0]), _ratio("max_sparse_ratio", ratios[1], high=True)
    if low > high:
        raise InputError(f"min_sparse_ratio {low} is above max_sparse_ratio {high}")
    blocks = [Block((g.index,), g.size, 0.0, low, high, None, g.min_keep) for g in analysis.groups]
    weights = Weights.of(analysis.model)
    scores = [unit_scores([analysis.groups[g] for g in b.groups], weights, importance, aggregate, generator)
              for b in blocks]

    def solve_at(target: tuple[str, float], model: Any) -> Plan:
        counts = target_counts(analysis, blocks, scores, [_bounds(b) for b in blocks], target, round_to, model,
                               strategy=strategy)
        keep = {}
        for block, s, count in zip(blocks, scores, counts):
            if count:
                keep[block.groups[0]] = torch.sort(s, stable=True).indices[count:].sort().values
        return Plan.from_keep(analysis, keep)

    return solve_at


def _check_options(importance: Criterion, aggregate: str, round_to: int, seed: int | None) -> None:
    if not callable(importance) and not isinstance(importance, ElementScores) and importance not in CRITERIA:
        raise InputError(f"importance must be one of {', '.join(CRITERIA)} or a callable, got {importance!r}")
    if aggregate not in AGGREGATES:
        raise InputError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise InputError(f"round_to must be a positive integer, got {round_to!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InputError(f"seed must be an integer or None, got {seed!r}")


def _ratio(what: str, value: Any, high: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and (0 < value <= 1 if high else 0 <= value < 1):
        return float(value)
    raise InputError(f"{what} must be a number in {'(0, 1]' if high else '[0, 1)'}, got {value!r}")


def _plain_blocks(
    analysis: Analysis, sparsity: Any, global_ranking: bool, min_ratio: float, max_ratio: float
) -> list[Block]:
    if isinstance(sparsity, Mapping):
        if global_ranking:
            raise InputError("global_ranking=True needs one fraction for all groups, not a mapping")
        ratios = {int(i): _ratio(f"sparsity[{i}]", r) for i, r in sparsity.items()}
        unknown = sorted(set(ratios) - set(range(len(analysis.groups))))
        if unknown:
            raise InputError(
                f"sparsity names groups {unknown}; the analysis has groups 0..{len(analysis.groups) - 1}"
            )
    else:
        ratios = dict.fromkeys(range(len(analysis.groups)), _ratio("sparsity", sparsity))
    low, high = _ratio("min_sparse_ratio", min_ratio), _ratio("max_sparse_ratio", max_ratio, high=True)
    if not global_ranking and (low, high) != (0.0, 1.0):
        raise InputError("min_sparse_ratio and max_sparse_ratio apply to global_ranking=True; "
                         "without it each group removes exactly its sparsity")
    if low > high:
        raise InputError(f"min_sparse_ratio {low} is above max_sparse_ratio {high}")
    gid = _ALL if global_ranking else None
    return [Block((g.index,), g.size, ratios.get(g.index, 0.0), low, high, gid, g.min_keep) for g in analysis.groups]


def _floor(x: float) -> int:
    return math.floor(x + 1e-9)


def _bounds(block: Block) -> tuple[int, int]:
    """The fewest and most units ``block`` may lose."""
    return _floor(block.min_ratio * block.size), min(_floor(block.max_ratio * block.size), block.size - block.min_keep)


def _keep(
    analysis: Analysis, blocks: list[Block], importance: Criterion, aggregate: str, round_to: int,
    generator: torch.Generator,
) -> dict[int, torch.Tensor]:
    active = [b for b in blocks if b.global_id is not None or b.ratio > 0]
    weights = Weights.of(analysis.model)
    scores = [unit_scores([analysis.groups[g] for g in b.groups], weights, importance, aggregate, generator)
              for b in active]
    counts = {i: min(max(_floor(b.ratio * b.size), _bounds(b)[0]), _bounds(b)[1])
              for i, b in enumerate(active) if b.global_id is None}
    ranked: dict[Hashable, list[int]] = {}
    for i, b in enumerate(active):
        if b.global_id is not None:
            ranked.setdefault(b.global_id, []).append(i)
    budgeted = next((members for members in ranked.values() if active[members[0]].budget), [])
    for gid, members in ranked.items():
        if members is not budgeted:
            removed = _global_counts(gid, [active[i] for i in members], [scores[i] for i in members])
            counts.update(zip(members, removed))
    for i in counts:
        counts[i] = _rounded(active[i], counts[i], round_to, analysis)
    if budgeted:  # last: the budget bounds the model's cost after every other removal
        counts.update(_budget_counts(analysis, active, counts, budgeted, scores, round_to))
    keep = {}
    for i, block in enumerate(active):
        count = counts[i]
        if count:
            kept = torch.sort(scores[i], stable=True).indices[count:].sort().values
            keep.update(dict.fromkeys(block.groups, kept))
    return keep


def _budget_counts(analysis: Analysis, active: list[Block], counts: dict[int, int], members: list[int],
                   scores: list[torch.Tensor], round_to: int) -> dict[int, int]:
    """Units each block of the budgeted global group loses for the model's cost, with every
    other block's removals (``counts``) made first, to reach the group's budget."""
    start = {g.index: g.size for g in analysis.groups}
    for i, count in counts.items():
        for g in active[i].groups:
            start[g] -= count
    blocks = [active[i] for i in members]
    budget = blocks[0].budget
    assert budget is not None
    removed = target_counts(analysis, blocks, [scores[i] for i in members], [_bounds(b) for b in blocks], budget,
                            round_to, start=start)
    return dict(zip(members, removed))


def _global_counts(gid: Hashable, blocks: list[Block], scores: list[torch.Tensor]) -> list[int]:
    """Units each block loses when ``blocks`` share one budget (see :func:`solve`, Notes)."""
    total = sum(b.size for b in blocks)
    budget = _floor(blocks[0].ratio * total)
    bounds = [_bounds(b) for b in blocks]
    forced, allowed = sum(lo for lo, _ in bounds), sum(hi for _, hi in bounds)
    if not forced <= budget <= allowed:
        limit = (f"min_sparse_ratio values force {forced}" if forced > budget
                 else f"max_sparse_ratio values (and keeping a unit) allow {allowed}")
        raise InputError(
            f"global group {gid!r} removes {budget} of its {total} units (sparse_ratio {blocks[0].ratio}), "
            f"but its groups' {limit}: change the sparse_ratio or the bounds"
        )
    values, owners = [], []
    for i, (s, (lo, hi)) in enumerate(zip(scores, bounds)):
        scale = s.abs().mean()
        normalized = s / scale if scale > 0 else torch.zeros_like(s)
        values.append(torch.sort(normalized, stable=True).values[lo:hi])
        owners.append(torch.full((hi - lo,), i))
    picked = torch.sort(torch.cat(values), stable=True).indices[: budget - forced]
    extra = torch.bincount(torch.cat(owners)[picked], minlength=len(blocks))
    return [lo + int(e) for (lo, _), e in zip(bounds, extra)]


def _rounded(block: Block, count: int, round_to: int, analysis: Analysis) -> int:
    """``count`` adjusted so that the kept units are a multiple of ``round_to`` (see :func:`solve`)."""
    if round_to == 1:
        return count
    lo, hi = _bounds(block)
    size, target = block.size, block.size - count
    first, last = math.ceil((size - hi) / round_to) * round_to, (size - lo) // round_to * round_to
    below = max(first, min(last, target // round_to * round_to))
    candidates = [k for k in (below, below + round_to) if first <= k <= last] + ([size] if lo == 0 else [])
    if not candidates:
        raise InputError(
            f"round_to={round_to}: {describe(analysis.groups[block.groups[0]])} has {size} units and must "
            f"keep between {size - hi} and {size - lo}, which holds no multiple of {round_to}: change "
            "round_to or the ratios"
        )
    return size - min(candidates, key=lambda k: (abs(k - target), -k))
