"""NNI-3.0-style config lists for :func:`depgraph.solve`.

:func:`parse` checks every entry without looking at the model (unknown keys and bad
values are errors that name the entry and the fix). :func:`resolve` then, per entry,
selects modules, the groups their targets touch, merges the groups that share a
``dependency_group_id`` into one :class:`Block` (pruned at the same unit positions),
and gives each block its settings. A block has one value per setting: two entries
giving it different values are a contradiction, reported with both entries.

Selection (per entry): ``(op_names ∪ op_names_re matches) ∩ op_types``, minus
``exclude_op_names``, ``exclude_op_names_re`` matches and ``exclude_op_types``; a
positive key that is absent does not restrict. Patterns use ``re.match`` on module
names, types are class names. An entry selects a group when one of the group's
members is a selected module's parameter target (``target_names``, default
``["weight"]``) on the granularity's axis: ``out_channel`` is dim 0 and ``in_channel``
dim 1 (swapped for a ConvTranspose weight); a target without that axis selects
nothing. ``_input_*`` / ``_output_*`` targets never select groups: they only carry
``apply_method``.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

from networkx.utils import UnionFind
from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from passes.errors import InputError

from .groups import Analysis
from .importance import describe

__all__ = ["KEYS", "Config", "Block", "parse", "resolve"]

_POSITIVE = ("op_types", "op_names", "op_names_re")
_SELECT = _POSITIVE + ("exclude_op_types", "exclude_op_names", "exclude_op_names_re")
_RATIOS = ("sparse_ratio", "max_sparse_ratio", "min_sparse_ratio")
_PER_TARGET = ("apply_method", "align")
KEYS = _SELECT + _RATIOS + (
    "budget", "global_group_id", "dependency_group_id", "granularity", "target_names", "target_settings"
) + _PER_TARGET
"""Every key a config entry may have."""

GRANULARITIES = ("out_channel", "in_channel")
BUDGETS = ("macs", "params")
APPLY_METHODS = ("mul", "add", "bypass")
_ALIGN_KEYS = ("module_name", "target_name", "dims")
_ACTIVATION = re.compile(r"_(input|output)_\w*")
_HINTS = {
    "sparse_threshold": "thresholds are not supported; give sparse_ratio",
    "internal_metric_block": "not needed: the analysis couples grouped convolutions itself",
    "sparsity": "that is NNI 2's name; use sparse_ratio",
    "sparsity_per_layer": "that is NNI 2's name; use sparse_ratio",
    "total_sparsity": "that is NNI 2's name; use sparse_ratio with a global_group_id",
    "max_sparsity_per_layer": "that is NNI 2's name; use max_sparse_ratio",
    "exclude": "that is NNI 2's form; use exclude_op_names / exclude_op_types in the entry that selects",
}


@dataclass(frozen=True)
class Config:
    """One checked config entry. ``group_settings`` holds the entry's ``sparse_ratio``,
    ``max_sparse_ratio``, ``min_sparse_ratio`` and ``global_group_id`` (those given);
    ``target_settings`` maps each target to its ``apply_method`` / ``align``."""

    index: int
    select: dict[str, tuple[str, ...]]
    group_settings: dict[str, Any]
    dependency: Hashable | None
    granularity: str
    targets: tuple[str, ...]
    explicit_targets: bool
    target_settings: dict[str, dict[str, Any]]

    @property
    def where(self) -> str:
        return f"config_list[{self.index}]"


@dataclass(frozen=True)
class Block:
    """Automatic groups pruned at the same unit positions (several only through a
    ``dependency_group_id``), with the settings that apply to them.

    ``ratio`` is the block's fraction of units to remove or, when ``global_id`` is set,
    the fraction its global group removes from all its blocks' units together;
    ``min_ratio`` / ``max_ratio`` bound the block's own fraction either way.
    """

    groups: tuple[int, ...]
    size: int
    ratio: float = 0.0
    min_ratio: float = 0.0
    max_ratio: float = 1.0
    global_id: Hashable | None = None
    min_keep: int = 1
    """The fewest units the block may keep (the largest ``min_keep`` of its groups)."""
    budget: tuple[str, float] | None = None
    """The global group's ``budget`` (``("macs", 0.5)``) instead of a ratio."""


# -- parse ----------------------------------------------------------------------------


def parse(config_list: Any) -> list[Config]:
    """Check a config list's keys and values (no model needed).

    >>> parse([{"op_types": ["Linear"], "sparse_ratio": 0.5}])[0].group_settings
    {'sparse_ratio': 0.5}
    >>> parse([{"op_types": ["Linear"], "sparse_ration": 0.5}])
    Traceback (most recent call last):
    ...
    depgraph.errors.InputError: config_list[0] has an unknown key 'sparse_ration'; did you mean 'sparse_ratio'?
    """
    if isinstance(config_list, (str, Mapping)) or not isinstance(config_list, Sequence):
        raise InputError(
            "config_list must be a list of dicts, e.g. [{'op_types': ['Conv2d'], 'sparse_ratio': 0.5}]"
        )
    return [_parse(i, entry) for i, entry in enumerate(config_list)]


def _parse(index: int, entry: Any) -> Config:
    where = f"config_list[{index}]"
    if not isinstance(entry, Mapping):
        raise InputError(f"{where} must be a dict, got {type(entry).__name__}")
    for key in entry:
        _check_key(where, key)
    select = {k: _strings(where, k, entry[k]) for k in _SELECT if k in entry}
    if not any(k in select for k in _POSITIVE):
        raise InputError(f"{where} selects nothing: give op_types, op_names or op_names_re")
    for key in ("op_names_re", "exclude_op_names_re"):
        for pattern in select.get(key, ()):
            _compile(where, key, pattern)
    group_settings: dict[str, Any] = {k: _ratio(where, k, entry[k]) for k in _RATIOS if k in entry}
    if group_settings.get("min_sparse_ratio", 0.0) > group_settings.get("max_sparse_ratio", 1.0):
        raise InputError(f"{where} has min_sparse_ratio above max_sparse_ratio; swap or fix them")
    if "global_group_id" in entry:
        group_settings["global_group_id"] = _group_id(where, "global_group_id", entry["global_group_id"])
    if "budget" in entry:
        if "global_group_id" not in entry or "sparse_ratio" in entry:
            raise InputError(f"{where} has a budget: give it with a global_group_id and without sparse_ratio (the "
                             "global group's units go until the model's cost reaches the budget)")
        group_settings["budget"] = _budget(where, entry["budget"])
    dependency = entry.get("dependency_group_id")
    if dependency is not None:
        dependency = _group_id(where, "dependency_group_id", dependency)
    granularity = entry.get("granularity", "out_channel")
    if granularity not in GRANULARITIES:
        raise InputError(f"{where} has granularity {granularity!r}; supported: {', '.join(GRANULARITIES)}")
    targets = _strings(where, "target_names", entry.get("target_names", ["weight"]))
    for target in targets:
        if not (_ACTIVATION.fullmatch(target) or target.isidentifier()):
            raise InputError(
                f"{where} has target {target!r}; targets are parameter or buffer names (weight, bias, ...) "
                "or _input_, _input_<i>, _output_, _output_<i>"
            )
    if (group_settings or dependency is not None) and all(_ACTIVATION.fullmatch(t) for t in targets):
        raise InputError(
            f"{where} sets ratios or group ids on activation targets only; groups are chosen through "
            "parameters: add 'weight' to target_names"
        )
    return Config(index, select, group_settings, dependency, granularity, targets,
                  "target_names" in entry, _per_target(where, entry, targets))


def _check_key(where: str, key: Any) -> None:
    if key in KEYS:
        return
    if key in _HINTS:
        raise InputError(f"{where} has key {key!r}, which depgraph does not accept: {_HINTS[key]}")
    close = difflib.get_close_matches(str(key), KEYS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f" (known keys: {', '.join(KEYS)})"
    raise InputError(f"{where} has an unknown key {key!r}{hint}")


def _strings(where: str, key: str, value: Any) -> tuple[str, ...]:
    strings = isinstance(value, Sequence) and all(isinstance(v, str) for v in value)
    if isinstance(value, str) or not strings:
        raise InputError(f"{where}[{key!r}] must be a list of strings, e.g. [{value!r}]")
    return tuple(value)


def _compile(where: str, key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InputError(f"{where}[{key!r}] has an invalid regular expression {pattern!r}: {exc}") from exc


def _ratio(where: str, key: str, value: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and (0 < value <= 1 if key == "max_sparse_ratio" else 0 <= value < 1):
        return float(value)
    bounds = "in (0, 1]" if key == "max_sparse_ratio" else "in [0, 1)"
    raise InputError(f"{where}[{key!r}] must be a number {bounds}, got {value!r}")


def _budget(where: str, value: Any) -> tuple[str, float]:
    ok = isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in BUDGETS
    fraction = next(iter(value.values())) if ok else None
    if ok and isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1:
        return next(iter(value)), float(fraction)
    hint = " (a latency budget is not supported in a config list: use solve(target={'latency': f}))" if (
        isinstance(value, Mapping) and "latency" in value) else ""
    raise InputError(f"{where}['budget'] must be {{'macs': f}} or {{'params': f}}, the fraction of the model's "
                     f"MACs or parameters to keep with f in (0, 1], got {value!r}{hint}")


def _group_id(where: str, key: str, value: Any) -> Hashable:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{where}[{key!r}] must be a string or an integer, got {value!r}")
    return value


def _per_target(where: str, entry: Mapping[str, Any], targets: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Each target's ``apply_method`` / ``align``: the entry's top-level value, overridden
    by ``target_settings[target]``."""
    explicit = entry.get("target_settings", {})
    if not isinstance(explicit, Mapping) or not all(isinstance(v, Mapping) for v in explicit.values()):
        raise InputError(f"{where}['target_settings'] must map targets to dicts, "
                         "e.g. {'weight': {'apply_method': 'mul'}}")
    for target, settings in explicit.items():
        if target not in targets:
            raise InputError(f"{where}['target_settings'] names {target!r}, not in target_names "
                             f"{list(targets)}: add it there")
        for key in settings:
            if key not in _PER_TARGET:
                fix = "set it at the top level (a group has one value)" if key in KEYS else "unknown key"
                raise InputError(f"{where}['target_settings'][{target!r}] has key {key!r}: {fix}; "
                                 f"per-target keys are {', '.join(_PER_TARGET)}")
    shorthand = {k: entry[k] for k in _PER_TARGET if k in entry}
    result = {}
    for target in targets:
        settings = {**shorthand, **explicit.get(target, {})}
        if "apply_method" in settings and settings["apply_method"] not in APPLY_METHODS:
            raise InputError(f"{where} has apply_method {settings['apply_method']!r} for {target!r}; "
                             f"supported: {', '.join(APPLY_METHODS)}")
        if "align" in settings:
            settings["align"] = _align(where, settings["align"])
        if settings:
            result[target] = settings
    return result


def _align(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or set(value) != set(_ALIGN_KEYS):
        raise InputError(f"{where} align must be a dict with exactly the keys {', '.join(_ALIGN_KEYS)}, "
                         f"got {value!r}")
    dims = value["dims"]
    names = isinstance(value["module_name"], str) and isinstance(value["target_name"], str)
    ints = isinstance(dims, Sequence) and dims and all(type(d) is int for d in dims)
    if not (names and ints):
        raise InputError(f"{where} align needs module_name and target_name strings and a non-empty list "
                         f"of int dims, got {value!r}")
    return {"module_name": value["module_name"], "target_name": value["target_name"], "dims": tuple(dims)}


# -- resolve --------------------------------------------------------------------------


def resolve(configs: Sequence[Config], analysis: Analysis) -> tuple[list[Block], dict[str, dict[str, Any]]]:
    """Blocks covering every group of ``analysis`` (in order of their first group) and
    the recorded per-target settings (``{"fc.weight": {"apply_method": "mul"}}``).

    Raises :class:`InputError` for a name the model lacks, an entry that selects no
    module (or no prunable axis while it sets a ratio), an ``align`` the analysis does
    not already satisfy, dependency groups of unequal sizes, and contradictions.
    """
    modules = dict(analysis.model.named_modules())
    axes: dict[tuple[str, int], list[int]] = {}
    for g in analysis.groups:
        for m in g.members:
            axes.setdefault((m.name, m.dim), []).append(g.index)
    chosen = [_select_modules(c, modules) for c in configs]
    selections = [_select_groups(c, names, modules, axes, analysis) for c, names in zip(configs, chosen)]
    for config, names in zip(configs, chosen):
        _check_align(config, names, modules, axes)
    classes = _dependencies(configs, selections, analysis)
    return _blocks(configs, selections, classes, analysis), _recorded(configs, chosen, modules)


def _full(module: str, target: str) -> str:
    return f"{module}.{target}" if module else target


def _has(module: nn.Module, target: str) -> bool:
    return not _ACTIVATION.fullmatch(target) and getattr(module, target, None) is not None


def _select_modules(config: Config, modules: dict[str, nn.Module]) -> list[str]:
    sel = config.select
    for key in ("op_names", "exclude_op_names"):
        missing = [n for n in sel.get(key, ()) if n not in modules]
        if missing:
            raise InputError(f"{config.where}[{key!r}] names modules the model does not have: {missing}")
    by_name = "op_names" in sel or "op_names_re" in sel

    def chosen(name: str, module: nn.Module) -> bool:
        kind = type_before_parametrizations(module).__name__
        named = name in sel.get("op_names", ()) or any(re.match(p, name) for p in sel.get("op_names_re", ()))
        excluded = name in sel.get("exclude_op_names", ()) or kind in sel.get("exclude_op_types", ()) or any(
            re.match(p, name) for p in sel.get("exclude_op_names_re", ()))
        return (named or not by_name) and kind in sel.get("op_types", (kind,)) and not excluded

    names = [n for n, m in modules.items() if chosen(n, m)]
    if not names:
        kinds = sorted({type_before_parametrizations(m).__name__ for m in modules.values()})
        raise InputError(f"{config.where} selects no module of the model (its types: {', '.join(kinds)})")
    if config.explicit_targets:
        for target in config.targets:
            if not _ACTIVATION.fullmatch(target) and not any(_has(modules[n], target) for n in names):
                raise InputError(f"{config.where} targets {target!r}, which none of its modules has "
                                 f"(they are {names[:5]})")
    return names


def _axis(module: nn.Module, target: str, granularity: str) -> int:
    dim = GRANULARITIES.index(granularity)
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd) and target == "weight"
    return 1 - dim if transposed else dim


def _select_groups(
    config: Config, names: list[str], modules: dict[str, nn.Module],
    axes: dict[tuple[str, int], list[int]], analysis: Analysis,
) -> tuple[int, ...]:
    looked = [
        (_full(name, t), _axis(modules[name], t, config.granularity))
        for name in names for t in config.targets if _has(modules[name], t)
    ]
    found = sorted({g for axis in looked for g in axes.get(axis, ())})
    if not found and (config.group_settings or config.dependency is not None):
        pins = [f"{n} dim {d}: {p.reason}" for p in analysis.pinned for n, d in p.members if (n, d) in looked]
        why = "; ".join(pins[:3]) if pins else f"{looked[:3]} are in no group: no targets, or axes of size 1"
        raise InputError(
            f"{config.where} sets {', '.join(config.group_settings) or 'dependency_group_id'} but selects no "
            f"prunable {config.granularity} axis ({why}): select other modules or another granularity"
        )
    return tuple(found)


def _check_align(
    config: Config, names: list[str], modules: dict[str, nn.Module], axes: dict[tuple[str, int], list[int]]
) -> None:
    for target, settings in config.target_settings.items():
        align = settings.get("align")
        if align is None:
            continue
        ref_module, ref_target = align["module_name"], align["target_name"]
        known = ref_module in modules and _has(modules[ref_module], ref_target)
        if _ACTIVATION.fullmatch(target) or not known:
            raise InputError(f"{config.where} aligns {target!r} to {ref_module!r}.{ref_target!r}: align is "
                             "supported only between parameters the model has")
        ref, ndim = _full(ref_module, ref_target), getattr(modules[ref_module], ref_target).dim()
        for name in (n for n in names if _has(modules[n], target)):
            full = _full(name, target)
            mine = {g for d in range(getattr(modules[name], target).dim()) for g in axes.get((full, d), ())}
            for dim in align["dims"]:
                if not -ndim <= dim < ndim or not mine & set(axes.get((ref, dim % ndim), ())):
                    raise InputError(
                        f"{config.where} aligns {full} to {ref} dim {dim}, but the analysis does not prune "
                        "them together: align is accepted only where they already share a group (then it "
                        "is already satisfied); to couple groups of equal size, give them one "
                        "dependency_group_id"
                    )


def _dependencies(
    configs: Sequence[Config], selections: list[tuple[int, ...]], analysis: Analysis
) -> UnionFind:
    classes = UnionFind(range(len(analysis.groups)))
    first: dict[Hashable, tuple[int, int]] = {}
    for config, groups in zip(configs, selections):
        if config.dependency is None:
            continue
        for g in groups:
            index, other = first.setdefault(config.dependency, (config.index, g))
            a, b = analysis.groups[other], analysis.groups[g]
            if a.size != b.size:
                raise InputError(
                    f"dependency_group_id {config.dependency!r} couples {describe(a)} ({a.size} units, "
                    f"from config_list[{index}]) and {describe(b)} ({b.size} units, from {config.where}): "
                    "groups pruned at the same positions need equal sizes; give them different "
                    "dependency_group_ids"
                )
            classes.union(other, g)
    return classes


def _blocks(
    configs: Sequence[Config], selections: list[tuple[int, ...]], classes: UnionFind, analysis: Analysis
) -> list[Block]:
    seen: dict[int, dict[str, tuple[Any, int, int]]] = {}  # class root -> key -> (value, entry, group)
    for config, groups in zip(configs, selections):
        for g in groups:
            settings = seen.setdefault(classes[g], {})
            for key, value in config.group_settings.items():
                prev = settings.setdefault(key, (value, config.index, g))
                if prev[0] != value:
                    raise InputError(_contradiction(key, prev, (value, config.index, g), analysis))
    ratios = _global_ratios(seen)
    members: dict[int, list[int]] = {}
    for g in range(len(analysis.groups)):
        members.setdefault(classes[g], []).append(g)
    return [_block(groups, seen.get(root, {}), ratios, analysis) for root, groups in members.items()]


def _contradiction(key: str, a: tuple[Any, int, int], b: tuple[Any, int, int], analysis: Analysis) -> str:
    ga, gb = analysis.groups[a[2]], analysis.groups[b[2]]
    same = f"the same {describe(ga)}" if ga is gb else (
        f"{describe(ga)} and {describe(gb)}, which dependency_group_id prunes together")
    return (
        f"config_list[{a[1]}] and config_list[{b[1]}] give different {key} ({a[0]!r} vs {b[0]!r}) to {same}; "
        f"a group has one {key}: give both entries the same value, or remove the group's modules from one "
        "of them (exclude_op_names)"
    )


def _global_ratios(seen: dict[int, dict[str, tuple[Any, int, int]]]) -> dict[Hashable, tuple[Any, int, int]]:
    """Per global group id, its ``sparse_ratio`` or its ``budget`` (as given, with the entry)."""
    ratios: dict[Hashable, tuple[Any, int, int]] = {}
    ids: dict[Hashable, int] = {}
    for settings in seen.values():
        if "global_group_id" not in settings:
            continue
        gid, index, _ = settings["global_group_id"]
        ids.setdefault(gid, index)
        for key in ("sparse_ratio", "budget"):
            if key not in settings:
                continue
            given = settings[key]
            prev = ratios.setdefault(gid, given)
            if prev[0] != given[0]:
                raise InputError(
                    f"config_list[{prev[1]}] and config_list[{given[1]}] share global_group_id {gid!r} "
                    f"but give {_what(prev[0])} and {_what(given[0])}: a global group has one sparse_ratio "
                    "(the fraction of all its units removed) or one budget; give them the same value"
                )
    for gid, index in ids.items():
        if gid not in ratios:
            raise InputError(f"global_group_id {gid!r} (config_list[{index}]) has no sparse_ratio: give one "
                             "(or a budget such as {'macs': 0.5})")
    budgets = [gid for gid, (value, _, _) in ratios.items() if isinstance(value, tuple)]
    if len(budgets) > 1:
        raise InputError(f"global groups {budgets[0]!r} and {budgets[1]!r} both have a budget; each budget bounds "
                         "the whole model's cost, so a config list has one: merge the two global groups")
    return ratios


def _what(value: Any) -> str:
    return f"budget {{{value[0]!r}: {value[1]}}}" if isinstance(value, tuple) else f"sparse_ratio {value}"


def _block(
    groups: list[int], settings: dict[str, tuple[Any, int, int]],
    ratios: dict[Hashable, tuple[Any, int, int]], analysis: Analysis,
) -> Block:
    gid = settings["global_group_id"][0] if "global_group_id" in settings else None
    ratio = ratios[gid] if gid is not None else settings.get("sparse_ratio", (0.0, None, groups[0]))
    low = settings.get("min_sparse_ratio", (0.0, None, groups[0]))
    high = settings.get("max_sparse_ratio", (1.0, None, groups[0]))
    name = describe(analysis.groups[groups[0]])
    if low[0] > high[0]:
        raise InputError(f"{name} gets min_sparse_ratio {low[0]} (config_list[{low[1]}]) above "
                         f"max_sparse_ratio {high[0]} (config_list[{high[1]}]): lower the min or raise "
                         "the max")
    if gid is None and not low[0] <= ratio[0] <= high[0]:
        origin = f"config_list[{ratio[1]}]" if ratio[1] is not None else "not set"
        given = f"sparse_ratio {ratio[0]} ({origin})"
        bound = low if ratio[0] < low[0] else high
        raise InputError(f"{name} gets {given} outside its bound {bound[0]} (config_list[{bound[1]}]): "
                         "a group without a global_group_id removes exactly its sparse_ratio; "
                         "make them agree")
    keep = max(analysis.groups[g].min_keep for g in groups)
    budget = ratio[0] if isinstance(ratio[0], tuple) else None
    return Block(tuple(groups), analysis.groups[groups[0]].size, 0.0 if budget else ratio[0], low[0], high[0], gid,
                 keep, budget)


def _recorded(
    configs: Sequence[Config], chosen: list[list[str]], modules: dict[str, nn.Module]
) -> dict[str, dict[str, Any]]:
    recorded: dict[str, dict[str, Any]] = {}
    origin: dict[str, int] = {}
    for config, names in zip(configs, chosen):
        for target, settings in config.target_settings.items():
            if "apply_method" not in settings:
                continue
            for name in names:
                if not (_ACTIVATION.fullmatch(target) or _has(modules[name], target)):
                    continue
                full = _full(name, target)
                prev = recorded.setdefault(full, {}).setdefault("apply_method", settings["apply_method"])
                origin.setdefault(full, config.index)
                if prev != settings["apply_method"]:
                    raise InputError(
                        f"config_list[{origin[full]}] and {config.where} give {full} different apply_method "
                        f"({prev!r} vs {settings['apply_method']!r}): give one, or exclude the module "
                        "from one entry"
                    )
    return recorded
