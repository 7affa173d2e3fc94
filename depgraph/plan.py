"""``Plan``: the units each group keeps, from any pruner, saved as JSON."""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from passes.dims import coordinates, removed_mask
from passes.errors import PlanError
from passes.meta import TensorMeta

from .groups import Analysis, Block

__all__ = ["Plan", "Reconciliation"]


@dataclass(frozen=True)
class Reconciliation:
    """What :meth:`Plan.from_masks` changed to make external masks consistent per group.

    ``requested``: fraction of member entries the given masks removed; ``result``:
    fraction the plan removes from the same members; ``lost`` / ``added``: units some
    mask removed but the plan keeps / units some mask kept but the plan removes.
    """

    requested: float
    result: float
    lost: int
    added: int


@dataclass
class Plan:
    """Kept unit indices per group index (groups not listed keep every unit).

    ``fingerprint`` identifies the analysis the plan was made for; ``inputs`` records
    the example inputs' shapes so a fresh model can be re-analyzed to apply it, and
    ``keywords`` the keyword example inputs of a torch.export analysis (tensor shapes
    and plain values such as ``use_cache=False``).
    ``drop`` maps the index of each removed block (``analysis.blocks``) to its output node's
    name, which :meth:`check` compares with the analysis the plan is applied with.
    ``settings`` maps a target (``"fc.weight"``, ``"attn._input_"``) to the settings a
    config list gave it (``{"apply_method": "add"}``); they are saved with the plan and
    :func:`depgraph.simulate` honours the apply methods.
    """

    keep: dict[int, torch.Tensor]
    sizes: dict[int, int]
    fingerprint: str
    inputs: tuple[Any, ...] = ()
    reconciliation: Reconciliation | None = field(default=None, compare=False)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)
    tracer: str = "fx"
    keywords: dict[str, Any] = field(default_factory=dict)
    drop: dict[int, str] = field(default_factory=dict)

    # -- construction ----------------------------------------------------------

    @classmethod
    def from_keep(cls, analysis: Analysis, keep: Mapping[int, Any], drop_blocks: Iterable[Any] = ()) -> "Plan":
        """A plan keeping, for each listed group index, the given unit indices, and removing
        ``drop_blocks`` (indices into ``analysis.blocks``, or the :class:`~depgraph.Block` s).

        >>> import torch, depgraph
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> a = depgraph.analyze(net, torch.zeros(1, 4))
        >>> Plan.from_keep(a, {0: torch.tensor([0, 2, 5])}).keep[0].tolist()
        [0, 2, 5]
        """
        sizes = {g.index: g.size for g in analysis.groups}
        checked = {int(i): _check_units(i, units, sizes) for i, units in keep.items()}
        for index, units in checked.items():
            _check_minimum(analysis, index, units)
        return cls(
            checked, {i: sizes[i] for i in checked}, analysis.fingerprint, analysis.inputs, tracer=analysis.tracer,
            keywords=_keywords(analysis), drop=_drops(analysis, drop_blocks),
        )

    @classmethod
    def from_masks(
        cls, analysis: Analysis, masks: Mapping[Any, torch.Tensor], policy: str = "union"
    ) -> "Plan":
        """Reconcile per-parameter masks from any pruner into a plan.

        ``masks`` maps a parameter name (its dim 0) or ``(name, dim)`` to a boolean
        mask along that axis, True = keep. For each group, a member votes to keep a
        unit when at least half of the unit's entries are kept; ``policy="union"``
        keeps a unit any voting member keeps, ``"intersection"`` only units every
        voting member keeps. ``plan.reconciliation`` reports what that changed.
        """
        if policy not in ("union", "intersection"):
            raise PlanError(f"policy must be 'union' or 'intersection', got {policy!r}")
        wanted = {
            (k, 0) if isinstance(k, str) else tuple(k): torch.as_tensor(v, dtype=torch.bool) for k, v in masks.items()
        }
        _check_mask_names(analysis, wanted)
        keep: dict[int, torch.Tensor] = {}
        totals = [0, 0, 0, 0, 0]  # entries, removed by masks, removed by plan, lost, added
        for g in analysis.groups:
            votes = _votes(g, wanted, totals)
            if not votes:
                continue
            stacked = torch.stack(votes)
            kept = stacked.any(0) if policy == "union" else stacked.all(0)
            if not kept.any():
                raise PlanError(
                    f"the masks remove every unit of group {g.index} ({', '.join(g.layers[:3])}); "
                    "a group must keep at least one unit: use policy='union' or keep a unit in the masks"
                )
            totals[3] += int((~stacked & kept).any(0).sum())
            totals[4] += int((stacked & ~kept).any(0).sum())
            keep[g.index] = kept.nonzero().flatten()
            _count_plan(g, kept, wanted, totals)
        plan = cls.from_keep(analysis, keep)
        entries = max(totals[0], 1)
        plan.reconciliation = Reconciliation(totals[1] / entries, totals[2] / entries, totals[3], totals[4])
        return plan

    # -- reading -----------------------------------------------------------------

    def removed(self, index: int) -> torch.Tensor:
        """Unit indices group ``index`` loses."""
        if index not in self.keep:
            return torch.zeros(0, dtype=torch.long)
        mask = torch.ones(self.sizes[index], dtype=torch.bool)
        mask[self.keep[index]] = False
        return mask.nonzero().flatten()

    def removed_entries(self, analysis: Analysis) -> dict[tuple[str, int], torch.Tensor]:
        """Per member axis ``(name, dim)`` of ``analysis``, a mask of the entries this plan removes
        (every group that touches the axis counted).

        >>> import torch, depgraph
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> a = depgraph.analyze(net, torch.zeros(1, 2))
        >>> Plan.from_keep(a, {0: [0, 2]}).removed_entries(a)[("2.weight", 1)].tolist()
        [False, True, False]
        """
        removed: dict[tuple[str, int], torch.Tensor] = {}
        for group in analysis.groups:
            units = self.removed(group.index)
            for m in group.members:
                mask = removed.setdefault((m.name, m.dim), torch.zeros(m.expr.size, dtype=torch.bool))
                if len(units):
                    mask |= removed_mask(m.expr, m.atom, units)
        return removed

    def summary(self) -> str:
        """One line per group the plan prunes: kept / total units."""
        rows = [f"{'group':>5}  {'kept':>6}  {'of':>6}"]
        rows += [f"{i:>5}  {len(k):>6}  {self.sizes[i]:>6}" for i, k in sorted(self.keep.items())]
        if self.drop:
            rows.append(f"removed blocks: {', '.join(str(i) for i in sorted(self.drop))}")
        return "\n".join(rows)

    # -- persistence ------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON (kept units, group sizes, fingerprint, input shapes, settings)."""
        if self.tracer == "record":
            raise PlanError(
                "a plan from the recording tracer holds the real example inputs its graph was recorded "
                "on, which JSON does not keep: save the inputs with torch.save and the plan with pickle, "
                "or analyze with tracer='fx' or 'export' if the model allows it"
            )
        data: dict[str, Any] = {
            "format": "depgraph.plan/1",
            "fingerprint": self.fingerprint,
            "tracer": self.tracer,
            "inputs": [_input_json(x) for x in self.inputs],
            "groups": [
                {"index": i, "size": self.sizes[i], "keep": self.keep[i].tolist()} for i in sorted(self.keep)
            ],
        }
        if self.keywords:
            data["keywords"] = {k: _input_json(v) for k, v in self.keywords.items()}
        if self.settings:
            data["settings"] = self.settings
        if self.drop:
            data["blocks"] = [{"index": i, "output": self.drop[i]} for i in sorted(self.drop)]
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text())
            groups = data["groups"]
            keep = {int(g["index"]): torch.tensor(g["keep"], dtype=torch.long) for g in groups}
            sizes = {int(g["index"]): int(g["size"]) for g in groups}
            inputs = tuple(_input_from_json(x) for x in data["inputs"])
            settings = {str(k): dict(v) for k, v in data.get("settings", {}).items()}
            tracer = str(data.get("tracer", "fx"))
            keywords = {str(k): _input_from_json(v) for k, v in data.get("keywords", {}).items()}
            drop = {int(b["index"]): str(b["output"]) for b in data.get("blocks", [])}
            return cls(keep, sizes, str(data["fingerprint"]), inputs, settings=settings, tracer=tracer,
                       keywords=keywords, drop=drop)
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"{path} is not a depgraph plan: {exc}") from exc

    def check(self, analysis: Analysis) -> None:
        """Raise :class:`PlanError` unless this plan was made for ``analysis``'s structure."""
        if self.fingerprint != analysis.fingerprint:
            raise PlanError(
                "this plan was made for a different analysis (its group structure differs): "
                "solve or build the plan from depgraph.analyze() of this model with the same inputs"
            )
        sizes = {g.index: g.size for g in analysis.groups}
        for index, units in self.keep.items():
            _check_minimum(analysis, int(index), _check_units(index, units, sizes))
        for index, output in self.drop.items():
            if index >= len(analysis.blocks) or analysis.blocks[index].output != output:
                raise PlanError(
                    f"this plan removes block {index} (output {output}), which this analysis does not have "
                    f"({len(analysis.blocks)} blocks): make the plan from depgraph.analyze() of this model"
                )

    def blocks(self, analysis: Analysis) -> list[Block]:
        """The blocks of ``analysis`` this plan removes, in graph order."""
        return [analysis.blocks[i] for i in sorted(self.drop)]


def _drops(analysis: Analysis, blocks: Iterable[Any]) -> dict[int, str]:
    """Block index -> output node name, from indices into ``analysis.blocks`` or Blocks."""
    drop: dict[int, str] = {}
    for b in blocks:
        known = analysis.blocks  # found on first use: only for a plan that removes blocks
        if isinstance(b, Block):
            if b not in known:
                raise PlanError(f"{b} is not a block of this analysis: pick blocks from analysis.blocks")
            index = known.index(b)
        else:
            try:
                index = operator.index(b)
            except TypeError:
                index = -1
        if not 0 <= index < len(known):
            raise PlanError(f"drop_blocks takes indices into analysis.blocks (0..{len(known) - 1}) or Blocks, "
                            f"got {b!r}")
        drop[index] = known[index].output
    return dict(sorted(drop.items()))


def _check_units(index: Any, units: Any, sizes: dict[int, int]) -> torch.Tensor:
    if int(index) not in sizes:
        raise PlanError(f"group {index} does not exist; the analysis has groups 0..{len(sizes) - 1}")
    size = sizes[int(index)]
    t = torch.as_tensor(units).flatten().long().unique(sorted=True)
    if t.numel() == 0:
        raise PlanError(f"group {index} would keep zero units; keep at least one (it has {size})")
    if int(t.min()) < 0 or int(t.max()) >= size:
        raise PlanError(f"group {index} has {size} units; kept unit indices must lie in [0, {size}), got {t.tolist()}")
    return t


def _check_minimum(analysis: Analysis, index: int, units: torch.Tensor) -> None:
    group = analysis.groups[index]
    if units.numel() < group.min_keep:
        raise PlanError(
            f"group {index} would keep {units.numel()} of its {group.size} units; it must keep at least "
            f"{group.min_keep}: {group.min_reason}"
        )


def _check_mask_names(analysis: Analysis, wanted: dict[Any, torch.Tensor]) -> None:
    known = {(m.name, m.dim) for g in analysis.groups for m in g.members}
    unknown = sorted(str(k) for k in wanted if k not in known)
    if unknown:
        raise PlanError(f"masks name axes that no group prunes: {unknown}; use (name, dim) of a group member")


def _votes(group: Any, wanted: dict[Any, torch.Tensor], totals: list[int]) -> list[torch.Tensor]:
    votes = []
    for m in group.members:
        mask = wanted.get((m.name, m.dim))
        if mask is None:
            continue
        if mask.numel() != m.expr.size:
            raise PlanError(f"mask for {m.name} dim {m.dim} has {mask.numel()} entries, the axis has {m.expr.size}")
        unit = _unit_of(m)
        inside = unit >= 0
        kept = torch.zeros(group.size).index_add_(0, unit[inside], mask[inside].float())
        count = torch.zeros(group.size).index_add_(0, unit[inside], torch.ones(int(inside.sum())))
        votes.append(kept * 2 >= count)
        totals[0] += int(inside.sum())
        totals[1] += int((~mask[inside]).sum())
    return votes


def _count_plan(group: Any, kept: torch.Tensor, wanted: dict[Any, torch.Tensor], totals: list[int]) -> None:
    for m in group.members:
        if (m.name, m.dim) in wanted:
            unit = _unit_of(m)
            inside = unit >= 0
            totals[2] += int((~kept[unit[inside]]).sum())


def _unit_of(member: Any) -> torch.Tensor:
    """For each flat index of the member's axis, the group unit it belongs to (-1: none)."""
    return coordinates(member.expr, member.atom)


def _keywords(analysis: Analysis) -> dict[str, Any]:
    """The keyword example inputs of a torch.export analysis (metas for tensors)."""
    return dict(analysis.keywords) if analysis.tracer == "export" else {}


def _input_json(x: Any) -> Any:
    if isinstance(x, TensorMeta):
        return {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
    return {"value": x}


def _input_from_json(x: dict[str, Any]) -> Any:
    if "shape" in x:
        return TensorMeta(tuple(x["shape"]), getattr(torch, x["dtype"]))
    return x["value"]

