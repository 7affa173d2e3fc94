"""Express: the graph literals shrink rewrote, set instead on the module attributes they came from.

Needs: the fx graph's calls before :func:`passes.shrink.shrink` (:func:`calls`), the
rewritten graph, and the model it was traced from (``root``, already sliced). Reads
:func:`passes.meta.module_paths` (fx's record of the modules whose forward made a node).
Does, in place on ``root``: for each argument shrink changed (``768`` → ``538`` in
``x.reshape(n, 768, -1)``, ``(96,)`` → ``(68,)`` in ``F.layer_norm(x, (96,), ...)``), finds
the attribute holding the old value on the innermost module whose forward made the call
(``self.hidden_dim``, ``self.normalized_shape``), then on the modules around it, and sets the
new value there; an attribute set from the same literal by an earlier call counts as holding
it. Where several attributes of one module hold the old value, all are set and the choice is
recorded: :func:`choose` then finds, with the caller's check, the one that was the literal (a
ViT whose image side equals its width keeps ``image_size``). A ``scale`` added to
``scaled_dot_product_attention`` (the unpruned head width's, which the call no longer derives)
is expressed by a module that holds that ``scale`` and can run its attention unfused (timm's
``fused_attn``). Returns what no attribute could express: the model's forward then computes
something else than the graph, so ``prune`` returns the graph and says which literal forced it.
Attributes are matched by value only: the caller checks that the class computes what the graph
computes before keeping it (:func:`passes.verify.class_mismatch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import fx, nn

from .meta import module_paths

__all__ = ["Choice", "calls", "choose", "express"]

Call = tuple[Any, tuple[Any, ...], dict[str, Any]]


def calls(gm: fx.GraphModule) -> dict[str, Call]:
    """Target, arguments and keyword arguments of every call in ``gm``, by node name."""
    return {n.name: (n.target, n.args, dict(n.kwargs)) for n in gm.graph.nodes
            if n.op in ("call_function", "call_method")}


@dataclass
class Choice:
    """Attributes of one module that all held a changed literal ``was``, now all ``now``."""

    module: nn.Module
    names: tuple[str, ...]
    was: Any
    now: Any


def express(root: nn.Module, gm: fx.GraphModule, before: dict[str, Call]) -> tuple[list[str], list[Choice]]:
    """Set the changed literals of ``gm`` (relative to ``before``) on ``root``'s attributes.

    Returns a description of each change no attribute holds (none: the class can run as the
    graph), and the choices made where several attributes of a module held one literal."""
    setter, unexpressed = _Setter(), []
    for node in gm.graph.nodes:
        old = before.get(node.name)
        if old is None or old == (node.target, node.args, dict(node.kwargs)):
            continue
        owners = _owners(root, node)
        changes = _changes(old, node)
        if changes is None:
            expressed = _unfused(owners, old, node)
        else:
            expressed = all(setter.set(owners, was, now) for was, now in changes)
        if not expressed:
            unexpressed.append(_describe(node, old, owners))
    return unexpressed, setter.choices


def choose(choices: list[Choice], works: Callable[[], bool]) -> bool:
    """Whether ``works()`` once each module class's ambiguous attributes are narrowed to one name:
    the same name for every module of that class, the first (in attribute order) that works."""
    if works():
        return True
    kinds: dict[tuple[type, tuple[str, ...]], list[Choice]] = {}
    for c in choices:
        kinds.setdefault((type(c.module), c.names), []).append(c)
    for (_, names), same in kinds.items():
        for name in names:
            _narrow(same, name)
            if works():
                return True
        _narrow(same, None)  # none alone: all of them, as express left it
    return False


def _narrow(choices: list[Choice], name: str | None) -> None:
    """Give only attribute ``name`` of each choice its new value (every one, for None)."""
    for c in choices:
        for other in c.names:
            _assign(c.module, other, c.now if name in (None, other) else c.was)


def _changes(old: Call, node: fx.Node) -> list[tuple[Any, Any]] | None:
    """(old, new) of each argument that changed; None where the call changed otherwise (another
    function, arguments added or removed)."""
    target, args, kwargs = old
    if target != node.target or len(args) != len(node.args) or set(kwargs) != set(node.kwargs):
        return None
    pairs = [*zip(args, node.args), *((kwargs[k], node.kwargs[k]) for k in kwargs)]
    return [(was, now) for was, now in pairs if was != now]


def _owners(root: nn.Module, node: fx.Node) -> list[nn.Module]:
    """The modules whose forward made ``node``, innermost first, ending with ``root``."""
    owners = []
    for path in reversed(module_paths(node)):
        try:
            owners.append(root.get_submodule(path))
        except AttributeError:
            continue
    return [*owners, root]


class _Setter:
    """Sets literals on attributes, remembering what each attribute held before it was set."""

    def __init__(self) -> None:
        self.held: dict[tuple[int, str], Any] = {}
        self.choices: list[Choice] = []

    def set(self, owners: list[nn.Module], was: Any, now: Any) -> bool:
        """Set ``now`` on the attributes of the innermost owner that hold ``was``; a sequence no
        attribute holds whole is set entry by entry. Whether some attribute took each."""
        for module in owners:
            names = tuple(k for k, v in vars(module).items()
                          if not k.startswith("_") and _equal(self.held.get((id(module), k), v), was))
            for name in names:
                self.held.setdefault((id(module), name), getattr(module, name))
                _assign(module, name, now)
            if len(names) > 1:
                self.choices.append(Choice(module, names, was, now))
            if names:
                return True
        if isinstance(was, (tuple, list)) and isinstance(now, (tuple, list)) and len(was) == len(now):
            return all(self.set(owners, a, b) for a, b in zip(was, now) if a != b)
        return False


def _assign(module: nn.Module, name: str, value: Any) -> None:
    """Set ``value`` as the attribute's own type (a tuple stays a tuple)."""
    old = getattr(module, name)
    setattr(module, name, type(old)(value) if isinstance(old, (tuple, list)) else value)


def _unfused(owners: list[nn.Module], old: Call, node: fx.Node) -> bool:
    """Whether the one change is a ``scale`` added to attention, expressed by running unfused
    the innermost owner that holds that scale and a ``fused_attn`` switch (then switched)."""
    target, args, kwargs = old
    added = set(node.kwargs) - set(kwargs)
    if target != node.target or args != node.args or added != {"scale"}:
        return False
    if any(node.kwargs[k] != v for k, v in kwargs.items()):
        return False
    scale = node.kwargs["scale"]
    for module in owners:
        if getattr(module, "fused_attn", None) is True and _close(getattr(module, "scale", None), scale):
            module.fused_attn = False
            return True
    return False


def _close(value: Any, scale: float) -> bool:
    return isinstance(value, float) and abs(value - scale) <= 1e-6 * abs(scale)


def _equal(value: Any, was: Any) -> bool:
    """Whether an attribute's value is the literal: an int (not a bool) or a sequence of ints."""
    if isinstance(value, bool) or isinstance(was, bool):
        return False
    if isinstance(value, int) and isinstance(was, int):
        return value == was
    if isinstance(value, (tuple, list)) and isinstance(was, (tuple, list)):
        return len(value) == len(was) and all(_equal(a, b) for a, b in zip(value, was))
    return False


def _describe(node: fx.Node, old: Call, owners: list[nn.Module]) -> str:
    """``reshape(getitem, 768, mul) -> reshape(getitem, 538, mul) in encoder (VisionTransformer)``."""
    where = (module_paths(node) or [""])[-1]
    before, after = _call(*old), _call(node.target, node.args, node.kwargs)
    return f"{before} -> {after} in {where or 'the forward'} ({type(owners[0]).__name__})"


def _call(target: Any, args: Any, kwargs: Any) -> str:
    """A call as code, fx nodes by name."""
    named = fx.node.map_arg((args, kwargs), lambda n: _Name(n.name))
    shown = [repr(a) for a in named[0]] + [f"{k}={v!r}" for k, v in named[1].items()]
    return f"{getattr(target, '__name__', target)}({', '.join(shown)})"


class _Name(str):
    def __repr__(self) -> str:
        return str(self)
