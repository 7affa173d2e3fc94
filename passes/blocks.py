"""Removable blocks: residual branches ``y = x + f(x)`` that can be replaced by zero.

Needs: a GraphModule with ``node.meta[VALUE]`` on every node (:mod:`passes.shapes`), from
any frontend (fx, torch.export, record). Adds nothing to the graph: :func:`find_blocks`
returns one :class:`Block` per removable branch, in graph order.

The rule, for every **sum**: an addition of two tensors (``operator.add``/``iadd``,
``torch.add``, ``Tensor.add``/``add_``, ``aten.add.Tensor``), flattened through the additions
whose only reader is the next one (``x + f(x) + g(x)`` is one sum of three **terms**). A term
``b`` is a block's output when

1. another term ``s`` of the sum, the **stream**, is a strict ancestor of ``b`` (the nearest one
   in graph order if several are): the **branch** is every node between them, a descendant of
   ``s`` and an ancestor of ``b``, ``b`` included;
2. nothing outside the branch reads a branch node (``b`` is read by its addition only): nodes
   that nothing reads (export's ``_assert_tensor_metadata`` checks) do not count;
3. the sum without ``b`` has the sum's shape and dtype: replacing ``b`` by zero changes no shape;
4. the branch owns a parameter: one that only the branch (and values only it reads) reads.

A branch may read values that do not descend from the stream (rotary cos/sin, attention masks,
a layer scale): they are inputs, not part of it, unless only the branch reads them. A block
inside a block (a residual within a residual branch) is listed, and so is the outer one; a
post-norm block (``norm(x + f(x))``, BERT) is listed without the norm, which reads the sum.
Two branches of one stream whose sum is added (ResNet's downsample) are not: neither is an
ancestor of the other.

Removing blocks (:func:`drop_blocks`, in place on the graph, for ``prune`` and ``simulate`` alike):
each block's addition gives its other operand, and the branch's nodes are erased. Where a module's
whole forward is erased that way (a ConvNeXt block, a decoder layer whose attention and MLP both go),
:func:`whole_modules` names it and :func:`remove_modules` takes it out of the model itself: deleted
from a ``ModuleList`` (the ``layer_idx`` of later layers and a config's ``num_hidden_layers`` and
``layer_types`` follow), replaced by ``nn.Identity`` elsewhere.
"""

from __future__ import annotations

import heapq
import operator
from dataclasses import dataclass, field
from os.path import commonprefix
from typing import Iterable

import torch
from torch import fx, nn

from .errors import PlanError
from .meta import VALUE, TensorMeta, module_paths

__all__ = ["ADDS", "Block", "find_blocks", "drop_blocks", "delete_unused", "live_paths", "whole_modules",
           "remove_modules"]

ADDS: frozenset[object] = frozenset({
    operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__iadd__",
    torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor,
})
"""The ops (functions, Tensor method names, ATen overloads) that add two tensors."""


@dataclass(frozen=True)
class Block:
    """A residual branch that can be removed: ``add`` reads the branch's ``output`` and the
    ``stream`` it hangs off; replacing ``output`` by zero leaves every shape valid.

    ``nodes`` are the branch's graph nodes, ``modules`` the modules owning its parameters
    (``call_module`` targets, or the owners of parameters it reads), ``params`` the names of
    the parameters nothing else reads; all in graph order.
    """

    add: str
    stream: str
    output: str
    modules: tuple[str, ...]
    params: tuple[str, ...]
    nodes: tuple[str, ...] = field(repr=False, default=())

    @property
    def name(self) -> str:
        """The deepest module holding every module of the block ("" for the root).

        >>> Block("add", "x", "bn2", ("layer1.0.conv1", "layer1.0.bn2"), ()).name
        'layer1.0'
        """
        parts = commonprefix([m.split(".") for m in self.modules])
        return ".".join(parts)

    def __str__(self) -> str:
        cut = len(self.name) + 1 if self.name else 0
        inner = ", ".join(m[cut:] or self._own(m) for m in self.modules)
        return f"{self.name or '<root>'}: {inner} (at {self.add}, stream {self.stream})"

    def _own(self, module: str) -> str:
        """The parameters ``module`` itself holds (a layer scale), relative to it."""
        cut = len(module) + 1 if module else 0
        return ", ".join(p[cut:] for p in self.params if p.rpartition(".")[0] == module) or module


def find_blocks(gm: fx.GraphModule) -> list[Block]:
    """Every removable residual branch of a shape-annotated graph, in graph order.

    Parameters
    ----------
    gm
        A GraphModule whose nodes carry ``meta[VALUE]`` (run :func:`passes.shapes.propagate_shapes`).

    Returns
    -------
    list[Block]
        One per branch that the module docstring's rule finds removable.

    Examples
    --------
    >>> import torch
    >>> from torch import fx, nn
    >>> from passes.shapes import propagate_shapes
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)
    ...     def forward(self, x):
    ...         return x + self.b(torch.relu(self.a(x)))
    >>> gm = fx.symbolic_trace(Net())
    >>> propagate_shapes(gm, (torch.zeros(2, 4),))
    >>> [str(b) for b in find_blocks(gm)]
    ['<root>: a, b (at add, stream x)']
    """
    g = _Graph(gm)
    found = []
    for root in gm.graph.nodes:
        if _is_sum(root) and not _inner(root, g.live):
            terms = _terms(root, g.live)
            for term, add in terms:
                block = _block(term, add, root, [t for t, _ in terms if t is not term], g)
                if block is not None:
                    found.append((g.order[add], g.order[term], block))
    return [block for *_, block in sorted(found, key=lambda f: f[:2])]


class _Graph:
    """What every block needs of the whole graph, computed once: each node's position, the
    nodes the output depends on, and the readers of each parameter."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.order = {node: i for i, node in enumerate(gm.graph.nodes)}
        self.live = _live(gm)
        self.readers: dict[int, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            for _, _, param in _reads(node, gm):
                self.readers.setdefault(id(param), []).append(node)


def _live(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes the graph's output depends on (not checks such as ``_assert`` on a size)."""
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    live, stack = set(outputs), list(outputs)
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in live:
                live.add(parent)
                stack.append(parent)
    return live


def _tensor(node: object) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get(VALUE), TensorMeta)


def _is_sum(node: fx.Node) -> bool:
    """An addition of two tensor nodes."""
    if node.op not in ("call_function", "call_method") or node.target not in ADDS or len(node.args) < 2:
        return False
    return _tensor(node) and _tensor(node.args[0]) and _tensor(node.args[1])


def _read_by(node: fx.Node, live: set[fx.Node]) -> list[fx.Node]:
    """The nodes that read ``node``'s value on the way to the output (checks do not count)."""
    return [u for u in node.users if u in live]


def _inner(node: fx.Node, live: set[fx.Node]) -> bool:
    """An addition whose only reader is another addition: part of that sum."""
    users = _read_by(node, live)
    return len(users) == 1 and _is_sum(users[0])


def _terms(add: fx.Node, live: set[fx.Node]) -> list[tuple[fx.Node, fx.Node]]:
    """(term, the addition reading it) for every term of the sum ending at ``add``."""
    terms = []
    for operand in add.args[:2]:
        assert isinstance(operand, fx.Node)
        if _is_sum(operand) and _inner(operand, live):
            terms.extend(_terms(operand, live))
        else:
            terms.append((operand, add))
    return terms


def _block(out: fx.Node, add: fx.Node, root: fx.Node, others: list[fx.Node], g: _Graph) -> Block | None:
    """The block whose output is term ``out`` of the sum ending at ``root``, or None."""
    if not others or out.op in ("placeholder", "get_attr") or _read_by(out, g.live) != [add]:
        return None
    if not _keeps_shape(root, others) or not _kept_alike(out, add, root):
        return None
    order = g.order
    seen = _ancestors_after(out, min(order[t] for t in others), order)
    streams = [t for t in others if t in seen]
    if not streams:
        return None
    stream = max(streams, key=order.__getitem__)
    branch = _descendants(stream, seen, order)
    if any(u not in branch for n in branch if n is not out for u in _read_by(n, g.live)):
        return None
    params = _owned(_cone(branch, g), g)
    if not params:
        return None
    modules = tuple(dict.fromkeys(owner for owner, _ in params))
    nodes = tuple(n.name for n in sorted(branch, key=order.__getitem__))
    return Block(add.name, stream.name, out.name, modules, tuple(name for _, name in params), nodes)


def _kept_alike(out: fx.Node, add: fx.Node, root: fx.Node) -> bool:
    """Whether ``add``, an addition inside the sum ending at ``root``, keeps its shape and dtype
    when it gives its other operand instead of adding ``out``, or nothing else reads it: in
    ``x + (f(x) + b)`` with a broadcast bias ``b``, the inner sum would become ``b``, and a
    value also reading it (one computed and never used) would get ``b``'s shape."""
    if add is root or len(add.users) == 1:
        return True
    other = next((a for a in add.args[:2] if a is not out), None)
    if not isinstance(other, fx.Node):
        return False
    kept, whole = other.meta[VALUE], add.meta[VALUE]
    return tuple(kept.shape) == tuple(whole.shape) and kept.dtype == whole.dtype


def _keeps_shape(root: fx.Node, others: list[fx.Node]) -> bool:
    """Whether the sum of ``others`` alone has the shape and dtype of the whole sum."""
    metas = [t.meta[VALUE] for t in others]
    total = root.meta[VALUE]
    try:
        shape = torch.broadcast_shapes(*(m.shape for m in metas))
    except RuntimeError:
        return False
    dtype = metas[0].dtype
    for m in metas[1:]:
        dtype = torch.promote_types(dtype, m.dtype)
    return tuple(shape) == tuple(total.shape) and dtype == total.dtype


def _ancestors_after(node: fx.Node, bound: int, order: dict[fx.Node, int]) -> set[fx.Node]:
    """``node`` and its ancestors that come at or after position ``bound`` of the graph."""
    seen, stack = {node}, [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen and order[parent] >= bound:
                seen.add(parent)
                stack.append(parent)
    return seen


def _descendants(stream: fx.Node, among: set[fx.Node], order: dict[fx.Node, int]) -> set[fx.Node]:
    """The nodes of ``among`` that descend from ``stream`` (``stream`` excluded)."""
    found: set[fx.Node] = set()
    for node in sorted(among, key=order.__getitem__):
        if node is not stream and any(p is stream or p in found for p in node.all_input_nodes):
            found.add(node)
    return found


def _cone(branch: set[fx.Node], g: _Graph) -> list[fx.Node]:
    """The branch and every value only it reads (its weights, a layer scale), in graph order."""
    order, cone = g.order, set(branch)
    heap = [(-order[p], p) for n in branch for p in n.all_input_nodes if p not in cone]
    heapq.heapify(heap)
    while heap:
        _, node = heapq.heappop(heap)
        if node in cone or node.op == "placeholder" or not all(u in cone for u in _read_by(node, g.live)):
            continue
        cone.add(node)
        for parent in node.all_input_nodes:
            if parent not in cone:
                heapq.heappush(heap, (-order[parent], parent))
    return sorted(cone, key=order.__getitem__)


def _reads(node: fx.Node, gm: fx.GraphModule) -> list[tuple[str, str, nn.Parameter]]:
    """(owning module, name, parameter) of every parameter ``node`` reads directly."""
    target = str(node.target)
    if node.op == "call_module":
        module = gm.get_submodule(target)
        return [(target, f"{target}.{name}", p) for name, p in module.named_parameters()]
    if node.op != "get_attr":
        return []
    owner, _, attribute = target.rpartition(".")
    try:
        value = getattr(gm.get_submodule(owner), attribute)
    except AttributeError:
        return []
    return [(owner or target, target, value)] if isinstance(value, nn.Parameter) else []


def _owned(cone: list[fx.Node], g: _Graph) -> list[tuple[str, str]]:
    """(owning module, name) of the parameters that only nodes of ``cone`` read (tied
    parameters are read by each of their names)."""
    inside = set(cone)
    owned = []
    for node in cone:
        for owner, name, param in _reads(node, g.gm):
            if all(r in inside for r in g.readers[id(param)]):
                owned.append((owner, name))
    return list(dict.fromkeys(owned))


def drop_blocks(gm: fx.GraphModule, blocks: list[Block]) -> dict[str, fx.Node]:
    """Remove ``blocks`` from ``gm`` in place: each addition gives its other operand and the
    branch is erased (with the checks that read it and the attributes only it read). Returns
    the erased nodes by name, additions included. A block inside another one dropped too is
    erased with it. The modules and parameters stay (:func:`delete_unused` deletes them)."""
    if not blocks:
        return {}
    by_name = {n.name: n for n in gm.graph.nodes}
    live = _live(gm)
    erased: dict[str, fx.Node] = {}
    for block in blocks:
        if block.add in erased:
            continue
        add, out = by_name[block.add], by_name[block.output]
        other = add.args[1] if add.args[0] is out else add.args[0]
        add.replace_all_uses_with(other)  # y = x + 0 is x
        doomed = [add, *(by_name[n] for n in block.nodes if n not in erased)]
        erased.update(_erase(gm, doomed, live))
    gm.graph.lint()
    gm.recompile()
    return erased


def _erase(gm: fx.GraphModule, doomed: list[fx.Node], live: set[fx.Node]) -> dict[str, fx.Node]:
    """Erase ``doomed``, the nodes that read them on no way to the output (checks, values
    computed and never used: not in ``live``), and then what only erased nodes read; the nodes
    erased, by name."""
    inside = set(doomed)
    stack = list(doomed)
    while stack:
        for user in list(stack.pop().users):
            if user not in inside:
                if user in live:
                    raise PlanError(f"{user.name} reads the branch of a removed block: a depgraph defect, "
                                    "please report it")
                inside.add(user)
                stack.append(user)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    # then what only the branch read: its weights, rotary cos/sin reshaped for it, a mask's slice
    read = [p for n in inside for p in n.all_input_nodes if p not in inside]
    names = {}
    for node in sorted(inside, key=order.__getitem__, reverse=True):
        names[node.name] = node
        gm.graph.erase_node(node)
    while read:
        node = read.pop()
        if node.users or node.op in ("placeholder", "output") or node.name in names or node.is_impure():
            continue
        names[node.name] = node
        read.extend(node.all_input_nodes)
        gm.graph.erase_node(node)
    return names


def delete_unused(gm: fx.GraphModule, erased: dict[str, fx.Node]) -> None:
    """Delete from ``gm`` the modules and attributes that only ``erased`` nodes called or read.
    An attribute of a module the graph calls is left alone: fx shares that module with the
    model it traced."""
    remaining = {str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    called = {str(n.target) for n in (*gm.graph.nodes, *erased.values()) if n.op == "call_module"}
    for node in erased.values():
        target = str(node.target)
        owner = target.rpartition(".")[0]
        used = any(r == target or r.startswith(f"{target}.") or target.startswith(f"{r}.") for r in remaining)
        if node.op in ("call_module", "get_attr") and not used and (node.op == "call_module" or owner not in called):
            parent = gm.get_submodule(owner) if owner else gm
            if hasattr(parent, target.rpartition(".")[2]):
                delattr(parent, target.rpartition(".")[2])


def live_paths(gm: fx.GraphModule) -> dict[str, list[str]]:
    """The module paths of every node the output depends on, by name: not checks, nor casts to
    the dtype a tensor has (a norm's ``x.to(float32)`` of a float32 stream, which export keeps
    as the stream itself), which compute nothing a removed module would take with it."""
    live = _live(gm)
    return {n.name: module_paths(n) for n in gm.graph.nodes if n in live and not _same_cast(n)}


CASTS: frozenset[object] = frozenset({
    "to", "type_as", "contiguous", torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout,
    torch.ops.aten._to_copy.default, torch.ops.aten.contiguous.default, torch.ops.aten.alias.default,
})
"""Ops that give their first operand back unchanged when its dtype and shape already match."""


def _same_cast(node: fx.Node) -> bool:
    source = node.args[0] if node.args else None
    return (node.target in CASTS and isinstance(source, fx.Node) and _tensor(node) and _tensor(source)
            and node.meta[VALUE] == source.meta[VALUE])


def whole_modules(paths: dict[str, list[str]], erased: Iterable[str]) -> list[str]:
    """The outermost modules every node of which was erased, given the module paths
    (:func:`passes.meta.module_paths`, read before erasing) of the nodes that count (the ones
    the output depends on) and the erased node names."""
    erased = set(erased)
    nodes: dict[str, list[str]] = {}
    for node, stack in paths.items():
        for module in stack:
            nodes.setdefault(module, []).append(node)
    whole = [m for m, names in nodes.items() if m and all(n in erased for n in names)]
    return [m for m in whole if not any(m.startswith(f"{o}.") for o in whole)]


def remove_modules(root: nn.Module, names: list[str]) -> None:
    """Take the modules ``names`` (whose forward computes the identity once their blocks are
    gone) out of ``root``: deleted from a ``ModuleList`` (later layers' ``layer_idx`` and the
    config's ``num_hidden_layers`` / ``layer_types`` follow), replaced by ``nn.Identity``
    elsewhere."""
    lists: dict[str, list[int]] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name)
        if isinstance(parent, nn.ModuleList) and child.isdigit():
            lists.setdefault(parent_name, []).append(int(child))
        else:
            setattr(parent, child, nn.Identity())
    for parent_name, gone in lists.items():
        _shorten(root, parent_name, set(gone))


def _shorten(root: nn.Module, name: str, gone: set[int]) -> None:
    """Delete entries ``gone`` of the ModuleList ``name`` and renumber what counts layers."""
    parent_name, _, attribute = name.rpartition(".")
    old = root.get_submodule(name)
    assert isinstance(old, nn.ModuleList)
    kept = [m for i, m in enumerate(old) if i not in gone]
    setattr(root.get_submodule(parent_name), attribute, nn.ModuleList(kept))
    for position, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", position)  # the index a KV cache keys the layer by
    config = getattr(root, "config", None)
    if config is not None and getattr(config, "num_hidden_layers", None) == len(old):
        config.num_hidden_layers = len(kept)
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == len(old):
            config.layer_types = [t for i, t in enumerate(types) if i not in gone]
