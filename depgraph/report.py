"""An HTML report of an analysis and, optionally, a plan: one self-contained file that needs
no network when it is viewed.

The page draws the model's graph (the traced graph's tensor-valued nodes) with Cytoscape.js,
laid out in layers by dagre, the layered layout Netron and TensorBoard's graph view use. Each
node is coloured by a group its output belongs to; clicking a group shows its members, size,
the units a plan keeps and what one unit costs; pinned atoms are listed with their reasons,
unsupported ops are drawn with a red border. A bar per layer shows the channels a plan keeps
and removes (all of them where the layer goes with a removed block), and a table the parameters
and MACs before and after the plan; the blocks a plan removes are listed and their nodes drawn
grey with a dotted border.

Repeated layers are drawn once: consecutive instances of a module list (``layer1.1``,
``layer1.2``; ``model.layers.0`` ... ``model.layers.79``) whose nodes match op for op and shape
for shape become one box labelled ``×N``, and a group of a later instance is shown on the
first one's nodes. Graphs still larger than :data:`DAGRE_LIMIT` nodes are placed in rows by
``networkx.topological_generations`` instead of dagre, which keeps 2,000 nodes drawing in
under 2 s (``benchmarks/report_render.py``).

>>> import tempfile, torch, depgraph
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> a = depgraph.analyze(net, torch.zeros(1, 4))
>>> data = report_data(a, depgraph.Plan.from_keep(a, {0: [0, 1, 2]}))
>>> [(g["index"], g["size"], g["kept"]) for g in data["groups"]], [n["op"] for n in data["nodes"]]
([(0, 8, 3)], ['input', 'Linear', 'relu', 'Linear', 'output'])
>>> path = report(a, tempfile.mkdtemp() + "/report.html")
>>> path.name, "cytoscape" in path.read_text()
('report.html', True)
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import networkx as nx
from torch import fx

from passes.meta import module_paths

from .costs import CostModel
from .groups import Analysis
from .plan import Plan

__all__ = ["report", "report_data", "DAGRE_LIMIT"]

DAGRE_LIMIT = 200
"""The most drawn nodes dagre lays out in the browser; larger graphs are placed in rows in Python
(dagre took 2 s for 300 nodes of a Llama graph in headless Chromium on two busy cores)."""

_LIBRARIES = ("cytoscape.min.js", "cytoscape-dagre.min.js")


def report(analysis: Analysis, path: str | Path, plan: Plan | None = None, *, title: str | None = None,
           collapse: bool = True) -> Path:
    """Write the HTML report of ``analysis`` (and of ``plan``, made for it) to ``path``.

    Parameters
    ----------
    analysis : Analysis
        What :func:`depgraph.analyze` returned.
    path : str or Path
        Where the file goes (overwritten).
    plan : Plan, optional
        A plan for this analysis: the page then shows the units each group keeps, the kept and
        removed channels per layer and the cost after pruning. A plan made for another
        analysis raises :class:`depgraph.PlanError`.
    title : str, optional
        The page's heading; the model's class name by default.
    collapse : bool
        Draw consecutive identical instances of a module list once, labelled ``×N``.

    Returns
    -------
    Path
        ``path``.

    Examples
    --------
    >>> import tempfile, torch, depgraph
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    >>> a = depgraph.analyze(net, torch.zeros(1, 3, 8, 8))
    >>> depgraph.report(a, tempfile.mkdtemp() + "/net.html").stat().st_size > 400_000  # the library is inside
    True
    """
    page = _page(report_data(analysis, plan, title=title, collapse=collapse))
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def report_data(analysis: Analysis, plan: Plan | None = None, *, title: str | None = None,
                collapse: bool = True) -> dict[str, Any]:
    """The data the report's page draws, as JSON-ready values (see :func:`report`)."""
    if plan is not None:
        plan.check(analysis)
    view = _view(analysis, collapse)
    costs = CostModel(analysis)
    before, after = costs.of(), costs.of(plan) if plan is not None else None
    return {
        "title": title or type(analysis.model).__name__,
        "tracer": analysis.tracer,
        "layout": "dagre" if len(view.nodes) <= DAGRE_LIMIT else "rows",
        "traced_nodes": view.traced,
        "nodes": view.nodes,
        "edges": view.edges,
        "blocks": view.blocks,
        "groups": _groups(analysis, plan, view, costs),
        "pinned": _pinned(analysis, view),
        "unsupported": [{"op": str(u.op), "node": u.node, "reason": u.reason, "shown": view.shown.get(u.node)}
                        for u in analysis.unsupported],
        "layers": _layers(analysis, plan),
        "removed_blocks": _removed_blocks(analysis, plan, view),
        "cost": {"before": {"params": before.params, "macs": before.macs},
                 "after": None if after is None else {"params": after.params, "macs": after.macs}},
        "notes": list(analysis.notes),
    }


# -- the drawn graph --------------------------------------------------------------


@dataclass
class _View:
    """The nodes drawn, their edges and boxes, and for every traced node the drawn node that
    stands for it (itself, or its counterpart in the first instance of a collapsed run)."""

    nodes: list[dict[str, Any]] = field(default_factory=list)
    edges: list[list[int]] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    shown: dict[str, int] = field(default_factory=dict)
    instance: dict[str, str] = field(default_factory=dict)
    """For a traced node drawn by its counterpart: the instance it belongs to (``model.layers.7``)."""
    readers: dict[str, list[str]] = field(default_factory=dict)
    """Per parameter, the traced nodes that read it."""
    touches: dict[int, set[str]] = field(default_factory=dict)
    """Per group index, the traced nodes whose output or parameters it prunes."""
    traced: int = 0


def _view(analysis: Analysis, collapse: bool) -> _View:
    nodes = list(analysis.graph.graph.nodes)
    weights = {n.name for n in nodes if n.op == "get_attr" and str(n.target) in analysis.params}
    drawn = [n for n in nodes if n.op == "output" or (analysis.nodes.get(n.name) is not None and n.name not in weights)]
    feeds = _feeds(nodes, {n.name for n in drawn}, weights)
    instances = _instances(drawn)
    view = _View(traced=len(drawn), readers=_readers(analysis, nodes, weights))
    counterpart, box = _collapse(view, _runs(instances, analysis, feeds) if collapse else [], instances)
    groups = _node_groups(analysis, view.readers)
    for name, found in groups.items():
        for index in found:
            view.touches.setdefault(index, set()).add(name)
    reads: dict[str, list[str]] = defaultdict(list)
    for param, readers in view.readers.items():
        for reader in readers:
            reads[reader].append(param)
    for n in drawn:
        if n.name not in counterpart:
            view.shown[n.name] = len(view.nodes)
            view.nodes.append(_node(n, analysis, groups.get(n.name, {}), box.get(n.name), reads.get(n.name, [])))
    for name, first in counterpart.items():
        view.shown[name] = view.shown[first]
    view.edges = _edges(drawn, feeds, view)
    if len(view.nodes) > DAGRE_LIMIT:
        _place_in_rows(view)
    return view


def _collapse(view: _View, runs: list[list[str]],
              instances: dict[str, list[fx.Node]]) -> tuple[dict[str, str], dict[str, int]]:
    """Record each run as a box; return, for every node of a later instance, its counterpart in
    the first instance, and for every node of a first instance, its box."""
    counterpart: dict[str, str] = {}
    box: dict[str, int] = {}
    for j, run in enumerate(runs):
        first = instances[run[0]]
        view.blocks.append({"id": j, "label": f"{_span(run)} ×{len(run)}", "count": len(run), "instances": run})
        box.update((n.name, j) for n in first)
        for name in run[1:]:
            for node, twin in zip(instances[name], first):
                counterpart[node.name] = twin.name
                view.instance[node.name] = name
    return counterpart, box


def _feeds(nodes: list[fx.Node], drawn: set[str], weights: set[str]) -> dict[str, set[str]]:
    """Per node, the drawn nodes its inputs come from, looking through nodes that are not drawn
    (sizes, tuples) and leaving out parameters (they belong to the node that reads them)."""
    feeds: dict[str, set[str]] = {}
    for n in nodes:
        found: set[str] = set()
        for source in n.all_input_nodes:
            if source.name in drawn:
                found.add(source.name)
            elif source.name not in weights:
                found |= feeds.get(source.name, set())
        feeds[n.name] = found
    return feeds


def _module_of(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    return (module_paths(node) or [""])[-1]


def _instance_of(module: str) -> str | None:
    """The outermost ``prefix.INDEX`` of a module path (an item of a Sequential or ModuleList)."""
    parts = module.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return None if index is None else ".".join(parts[: index + 1])


def _instances(drawn: list[fx.Node]) -> dict[str, list[fx.Node]]:
    instances: dict[str, list[fx.Node]] = defaultdict(list)
    for n in drawn:
        name = _instance_of(_module_of(n))
        if name is not None:
            instances[name].append(n)
    return instances


def _runs(instances: dict[str, list[fx.Node]], analysis: Analysis, feeds: dict[str, set[str]]) -> list[list[str]]:
    """Runs of two or more consecutive instances of one module list that match node for node."""
    by_list: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for name in instances:
        prefix, _, position = name.rpartition(".")
        by_list[prefix].append((int(position), name))
    runs = []
    for items in by_list.values():
        run: list[str] = []
        last: tuple[int, Any] = (-2, None)
        for index, name in sorted(items):
            signature = _signature(name, instances[name], analysis, feeds)
            if index == last[0] + 1 and signature == last[1]:
                run.append(name)
            else:
                runs.append(run)
                run = [name]
            last = (index, signature)
        runs.append(run)
    return [run for run in runs if len(run) > 1]


def _signature(name: str, members: list[fx.Node], analysis: Analysis, feeds: dict[str, set[str]]) -> tuple[Any, ...]:
    """What two instances must share to be drawn as one: per node in order, its op, module path
    inside the instance, output sizes, and which earlier node of the instance feeds it."""
    local = {n.name: i for i, n in enumerate(members)}
    return tuple(
        (_op(n, analysis), _module_of(n)[len(name):], _sizes(n, analysis),
         tuple(sorted(local.get(s, -1) for s in feeds[n.name])))
        for n in members
    )


def _span(run: list[str]) -> str:
    prefix = run[0].rpartition(".")[0]
    return f"{prefix}.{run[0].rpartition('.')[2]}–{run[-1].rpartition('.')[2]}".lstrip(".")


def _sizes(node: fx.Node, analysis: Analysis) -> Any:
    """The sizes of a node's output (a list per tensor of a tuple output); None for other values."""

    def sizes(axes: Any) -> Any:
        if isinstance(axes, (tuple, list)) and all(hasattr(e, "size") for e in axes):
            return [int(e.size) for e in axes]
        return [sizes(a) for a in axes] if isinstance(axes, (tuple, list)) else None

    return sizes(analysis.nodes.get(node.name))


def _op(node: fx.Node, analysis: Analysis) -> str:
    if node.op in ("placeholder", "output"):
        return "input" if node.op == "placeholder" else "output"
    if node.op == "call_module":
        return type(analysis.graph.get_submodule(str(node.target))).__name__
    target = node.target
    name = str(target) if node.op == "call_method" else getattr(target, "__name__", str(target))
    return re.sub(r"^aten\.|\.(default|Tensor|Scalar|int|dim)$", "", str(name))


def _node(node: fx.Node, analysis: Analysis, groups: dict[int, int], box: int | None,
          params: list[str]) -> dict[str, Any]:
    colour = min(groups.items(), key=lambda item: (item[1], item[0]))[0] if groups else None
    unsupported = next((u.reason for u in analysis.unsupported if u.node == node.name), None)
    return {"name": node.name, "op": _op(node, analysis), "module": _module_of(node), "shape": _sizes(node, analysis),
            "groups": sorted(groups), "colour": colour, "block": box, "unsupported": unsupported, "params": params}


def _readers(analysis: Analysis, nodes: list[fx.Node], weights: set[str]) -> dict[str, list[str]]:
    """Per parameter or buffer, the nodes that read it: its module's call, or the users of its
    ``get_attr``."""
    readers: dict[str, list[str]] = defaultdict(list)
    for n in nodes:
        if n.op == "call_module":
            module = analysis.graph.get_submodule(str(n.target))
            for name, _ in [*module.named_parameters(str(n.target)), *module.named_buffers(str(n.target))]:
                readers[name].append(n.name)
        for source in n.all_input_nodes:
            if source.name in weights:
                readers[str(source.target)].append(n.name)
    return readers


def _node_groups(analysis: Analysis, readers: dict[str, list[str]]) -> dict[str, dict[int, int]]:
    """Per traced node, the groups its output or its parameters belong to, each with a rank for
    choosing the node's colour (the output's axis, lowest first; parameters after)."""
    found: dict[str, dict[int, int]] = defaultdict(dict)
    for g in analysis.groups:
        for a in g.activations:
            found[a.node][g.index] = min(found[a.node].get(g.index, a.dim), a.dim)
        for m in g.members:
            for reader in readers.get(m.name, ()):
                found[reader].setdefault(g.index, 100 + m.dim)
    return found


def _edges(drawn: list[fx.Node], feeds: dict[str, set[str]], view: _View) -> list[list[int]]:
    """Edges between drawn nodes; an edge from one instance of a collapsed run to the next is
    left out (the box stands for the chain)."""
    edges: dict[tuple[int, int], None] = {}
    for n in drawn:
        for source in feeds[n.name]:
            a, b = view.shown[source], view.shown[n.name]
            inside = view.nodes[a]["block"] is not None and view.nodes[a]["block"] == view.nodes[b]["block"]
            if a != b and not (inside and view.instance.get(source) != view.instance.get(n.name)):
                edges[(a, b)] = None
    return [list(e) for e in edges]


def _place_in_rows(view: _View) -> None:
    """Rows for graphs too large for dagre: each node as late as its consumers allow (the
    ``networkx.topological_generations`` of the reversed graph, condensed should it have a
    cycle), so a value computed once and used deep down sits above its first use; each row
    in graph order."""
    graph = nx.DiGraph()
    graph.add_nodes_from(range(len(view.nodes)))
    graph.add_edges_from(map(tuple, view.edges))
    condensed = nx.condensation(graph)
    generations = list(nx.topological_generations(condensed.reverse(copy=False)))
    for depth, generation in enumerate(generations):
        members = sorted(m for c in generation for m in condensed.nodes[c]["members"])
        for column, i in enumerate(members):
            view.nodes[i].update(row=len(generations) - 1 - depth, column=column, width=len(members))


# -- groups, pinned atoms, layers ----------------------------------------------------


def _groups(analysis: Analysis, plan: Plan | None, view: _View, costs: CostModel) -> list[dict[str, Any]]:
    per_unit = costs.per_unit(plan)
    kept = costs.counts(plan) if plan is not None else {}
    gone = _gone(analysis, plan)
    rows = []
    for g in analysis.groups:
        touched = [n for n in view.touches.get(g.index, ()) if n in view.shown]
        instances = {view.instance.get(n) for n in touched}  # None: drawn as itself
        shown = {view.shown[n] for n in touched}
        rows.append({
            "index": g.index, "size": g.size, "kept": kept.get(g.index), "min_keep": g.min_keep,
            "members": [[m.name, m.dim] for m in g.members], "layers": g.layers, "nodes": sorted(shown),
            "instance": instances.pop() if len(instances) == 1 else None,
            "with_block": bool(gone) and all(m.name in gone for m in g.members),
            "per_unit": {"params": per_unit[g.index].params, "macs": per_unit[g.index].macs},
        })
    return rows


def _pinned(analysis: Analysis, view: _View) -> list[dict[str, Any]]:
    return [{"size": p.size, "reason": p.reason, "members": [list(m) for m in p.members],
             "nodes": sorted({view.shown[n] for name, _ in p.members for n in view.readers.get(name, ())
                              if n in view.shown})}
            for p in analysis.pinned]


def _layers(analysis: Analysis, plan: Plan | None) -> list[dict[str, Any]]:
    """One bar per module whose parameters a group prunes: its first such parameter, along the
    lowest axis a group prunes (a linear's output features, an embedding's width)."""
    axes: dict[str, set[int]] = defaultdict(set)
    for g in analysis.groups:
        for m in g.members:
            axes[m.name].add(m.dim)
    removed = plan.removed_entries(analysis) if plan is not None else {}
    gone = _gone(analysis, plan)
    layers: dict[str, dict[str, Any]] = {}
    for name in analysis.params:
        module = name.rpartition(".")[0]
        if name not in axes or module in layers:
            continue
        dim = min(axes[name])
        mask = removed.get((name, dim))
        total = int(analysis.params[name][dim].size)
        layers[module] = {"name": module or name, "param": name, "dim": dim, "total": total,
                          "removed": total if name in gone else 0 if mask is None else int(mask.sum()),
                          "with_block": name in gone}
    return list(layers.values())


def _gone(analysis: Analysis, plan: Plan | None) -> set[str]:
    """The parameters that go with the blocks ``plan`` removes."""
    return {p for b in plan.blocks(analysis) for p in b.params} if plan is not None else set()


def _removed_blocks(analysis: Analysis, plan: Plan | None, view: _View) -> list[dict[str, Any]]:
    """The blocks ``plan`` removes: each one's description and its drawn nodes (a block in a run
    of repeated layers drawn once is listed, not drawn: its nodes stand for every instance)."""
    blocks = plan.blocks(analysis) if plan is not None else []
    alone = {n: i for n, i in view.shown.items() if view.nodes[i]["block"] is None}
    return [{"name": str(b), "modules": list(b.modules), "nodes": sorted({alone[n] for n in b.nodes if n in alone})}
            for b in blocks]


# -- the page -------------------------------------------------------------------------


def _page(data: dict[str, Any]) -> str:
    static = resources.files("depgraph") / "_static"
    libraries = "\n".join(f"<script>{(static / name).read_text(encoding='utf-8')}</script>" for name in _LIBRARIES)
    payload = json.dumps(data, separators=(",", ":"))
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")  # inert in <script>
    template = (static / "report.html").read_text(encoding="utf-8")
    parts = {"TITLE": _escape(str(data["title"])), "STYLE": (static / "report.css").read_text(encoding="utf-8"),
             "LIBRARIES": libraries, "DATA": payload, "APP": (static / "report.js").read_text(encoding="utf-8")}
    return re.sub(r"/\*@(\w+)@\*/", lambda m: parts[m.group(1)], template)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
