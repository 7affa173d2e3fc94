"""The size and compute of a plan's pruned model, computed without building it.

``depgraph.cost(analysis, plan)`` gives the parameter count and the MACs (see
:mod:`passes.cost` for what counts) of ``prune(model, plan)`` at the analysis' example
inputs; without a plan, of the model itself. Both are sums of products of axis sizes,
so they are evaluated from the kept count of every group: a unit of a stem channel that
a depthwise multiplier spreads over eight later channels costs eight times as much.

>>> import torch, depgraph
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> a = depgraph.analyze(net, torch.zeros(3, 4))
>>> depgraph.cost(a), depgraph.cost(a, depgraph.Plan.from_keep(a, {0: [0, 1, 2, 3]}))
(Cost(params=58, macs=144), Cost(params=30, macs=72))
>>> CostModel(a).per_unit()[0]  # what one unit of group 0 costs
Cost(params=7, macs=18)
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

from passes.cost import Term, kept_size, mac_terms
from passes.dims import Atom, Expr, atoms_of

from .groups import Analysis, Block
from .plan import Plan

__all__ = ["Cost", "CostModel", "cost"]


@dataclass(frozen=True)
class Cost:
    """A parameter count (of the parameters the forward reads) and a number of
    multiply-accumulates (one forward pass on the analysis' example inputs)."""

    params: int
    macs: int


class CostModel:
    """Parameters and MACs of an analyzed model as functions of the kept count per group."""

    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        self.atoms = {g.index: g.atom for g in analysis.groups}
        self.param_terms, self.fixed_params = _param_terms(analysis)
        self.mac_terms, self.unmodeled = mac_terms(analysis.graph, analysis.params, analysis.nodes, analysis.lowered)
        if self.unmodeled:
            warnings.warn(f"the MACs of {', '.join(self.unmodeled[:5])} cannot be written over their axes and are not "
                          "counted: depgraph's cost undercounts this model (please report it)", stacklevel=2)
        self._by_atom = self._index()
        self.full: Cost | None = None
        """Set on a :meth:`without` view: the whole model's cost, which targets are fractions of."""

    def _index(self) -> dict[Atom, list[tuple[str, int]]]:
        by_atom: dict[Atom, list[tuple[str, int]]] = {}
        for kind, terms in (("params", self.param_terms), ("macs", self.mac_terms)):
            for i, term in enumerate(terms):
                for atom in {a for f in term.factors for a in atoms_of(f)}:
                    by_atom.setdefault(atom, []).append((kind, i))
        return by_atom

    def without(self, blocks: Iterable[Block]) -> "CostModel":
        """This model with ``blocks`` removed: their parameters and MACs count nothing (so their
        groups' units save nothing); ``full`` keeps the whole model's cost.

        >>> import torch, depgraph
        >>> class Residual(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)
        ...     def forward(self, x):
        ...         return x + self.b(self.a(x))
        >>> a = depgraph.analyze(Residual(), torch.zeros(1, 4))
        >>> view = CostModel(a).without(a.blocks)
        >>> view.of(), view.full
        (Cost(params=0, macs=0), Cost(params=76, macs=64))
        """
        view = copy.copy(self)
        blocks = list(blocks)
        view.param_terms, view.mac_terms = _outside(self.param_terms, blocks), _outside(self.mac_terms, blocks)
        view._by_atom = view._index()
        view.full = self.full or self.of()
        return view

    def counts(self, plan: Plan | dict[int, int] | None = None) -> dict[int, int]:
        """Kept units per group index: a plan's, a dict of counts, or every unit."""
        if plan is None:
            return {g.index: g.size for g in self.analysis.groups}
        if isinstance(plan, Plan):
            plan.check(self.analysis)
            kept = {int(i): int(units.numel()) for i, units in plan.keep.items()}
            return {g.index: kept.get(g.index, g.size) for g in self.analysis.groups}
        return {g.index: int(plan.get(g.index, g.size)) for g in self.analysis.groups}

    def of(self, plan: Plan | dict[int, int] | None = None) -> Cost:
        """The cost of the model ``prune(model, plan)`` returns (the model's own without a plan):
        the parameters and MACs of the blocks the plan removes not counted."""
        kept = self._kept(self.counts(plan))
        gone = plan.blocks(self.analysis) if isinstance(plan, Plan) else []
        memo: dict[Expr, int] = {}
        params = self.fixed_params + sum(term_value(t, kept, memo) for t in _outside(self.param_terms, gone))
        macs = sum(term_value(t, kept, memo) for t in _outside(self.mac_terms, gone))
        return Cost(params, macs)

    def per_unit(self, plan: Plan | dict[int, int] | None = None) -> dict[int, Cost]:
        """Per group, what removing one more of its units saves at the plan's counts (every
        unit kept without a plan); a group with no unit left to remove saves nothing."""
        counts = self.counts(plan)
        return {
            index: Cost(self.saving(counts, {index: 1}, "params"), self.saving(counts, {index: 1}, "macs"))
            if counts[index] else Cost(0, 0)
            for index in self.atoms
        }

    def saving(self, counts: dict[int, int], fewer: dict[int, int], metric: str) -> int:
        """What keeping ``fewer[g]`` fewer units of each group ``g`` saves of ``metric``
        (``"params"`` or ``"macs"``) at ``counts`` (kept units per group)."""
        kept = self._kept(counts)
        after = dict(kept)
        touched: set[int] = set()
        for index, k in fewer.items():
            atom = self.atoms[index]
            after[atom] = kept[atom] - k
            touched.update(i for kind, i in self._by_atom.get(atom, ()) if kind == metric)
        terms = self.param_terms if metric == "params" else self.mac_terms
        before_memo: dict[Expr, int] = {}
        after_memo: dict[Expr, int] = {}
        return sum(term_value(terms[i], kept, before_memo) - term_value(terms[i], after, after_memo) for i in touched)

    def _kept(self, counts: dict[int, int]) -> dict[Atom, int]:
        return {self.atoms[i]: n for i, n in counts.items()}


def cost(analysis: Analysis, plan: Plan | None = None) -> Cost:
    """Parameters and MACs of ``prune(model, plan)`` at the analysis' example inputs, from
    the axis algebra (no model is built); of the model itself without a plan."""
    return CostModel(analysis).of(plan)


def _param_terms(analysis: Analysis) -> tuple[list[Term], int]:
    """A term per parameter the forward reads (tied parameters once; the analysis relates
    them all), and the total size of parameters it reads but has no axes for (none so far).
    Parameters the forward never reads are not counted: a pruned graph drops them."""
    model: Any = analysis.model
    terms, fixed = [], 0
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for p in dict(model.named_parameters()).values():
        axes = next((analysis.params[n] for n in names[id(p)] if n in analysis.params), None)
        if axes is None:
            continue
        if len(axes) != p.dim():
            fixed += p.numel()
        else:
            terms.append(Term(1, axes, names[id(p)][0]))
    return terms, fixed


def _outside(terms: list[Term], blocks: list[Block]) -> list[Term]:
    """The terms not from a node or parameter of ``blocks``."""
    if not blocks:
        return terms
    names = {n for b in blocks for n in (*b.params, *b.nodes)}
    return [t for t in terms if t.node not in names]


def term_value(term: Term, kept: dict[Atom, int], memo: dict[Expr, int]) -> int:
    return term.coefficient * math.prod(kept_size(f, kept, memo) for f in term.factors)
