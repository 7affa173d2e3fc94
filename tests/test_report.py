"""The HTML report: the data it embeds (groups, pinned reasons, kept units, costs, repeated layers
drawn once), a file that needs no network, and the page as headless Chromium runs it."""

from __future__ import annotations

import functools
import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from zoo import ZOO, tiny_llama

import depgraph
from depgraph.report import report_data

REPORT: Any = importlib.import_module("depgraph.report")  # the module; depgraph.report is the function


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(width, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.bn(self.conv1(x))))


class _Stack(nn.Module):
    """A stem, three identical residual blocks and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(_Block(8), _Block(8), _Block(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _stack() -> tuple[depgraph.Analysis, depgraph.Plan]:
    torch.manual_seed(0)
    a = depgraph.analyze(_Stack().eval(), torch.zeros(1, 3, 8, 8))
    return a, depgraph.solve(a, 0.5)


@functools.cache
def _llama() -> depgraph.Analysis:  # analyzing takes seconds: shared, the report does not change it
    return depgraph.analyze(tiny_llama(2), {"input_ids": torch.zeros(1, 8, dtype=torch.long), "use_cache": False})


def _embedded(html: str) -> dict[str, Any]:
    found = re.search(r'<script type="application/json" id="depgraph-data">(.*?)</script>', html, re.S)
    assert found is not None
    return json.loads(found.group(1))


def test_the_embedded_data_holds_every_group_pinned_reason_kept_count_and_cost(tmp_path: Path) -> None:
    a, plan = _stack()
    data = _embedded(depgraph.report(a, tmp_path / "r.html", plan).read_text())
    assert [g["index"] for g in data["groups"]] == [g.index for g in a.groups]
    assert [g["kept"] for g in data["groups"]] == [len(plan.keep[g.index]) for g in a.groups]
    assert [g["members"] for g in data["groups"]] == [[[m.name, m.dim] for m in g.members] for g in a.groups]
    assert [(p["reason"], p["size"]) for p in data["pinned"]] == [(p.reason, p.size) for p in a.pinned]
    after = depgraph.cost(a, plan)
    assert data["cost"]["after"] == {"params": after.params, "macs": after.macs}
    per_unit = depgraph.CostModel(a).per_unit(plan)
    assert [g["per_unit"]["macs"] for g in data["groups"]] == [per_unit[g.index].macs for g in a.groups]
    stem = next(layer for layer in data["layers"] if layer["name"] == "stem")
    group = a.lookup("stem.weight", 0)[0].group
    assert group is not None and (stem["total"], stem["removed"]) == (8, 8 - len(plan.keep[group.index]))


def test_without_a_plan_every_unit_is_kept() -> None:
    a, _ = _stack()
    data = report_data(a)
    assert {g["kept"] for g in data["groups"]} == {None} and data["cost"]["after"] is None
    assert {layer["removed"] for layer in data["layers"]} == {0}


class _Residuals(nn.Module):
    """Three removable branches on one stream, under names that are not repeated layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.first, self.second, self.third = (nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 8))
                                               for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for branch in (self.first, self.second, self.third):
            h = h + branch(h)
        return h


def test_a_plan_s_removed_blocks_are_listed_drawn_and_their_layers_emptied(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a = depgraph.analyze(_Residuals(), torch.zeros(1, 4))
    second = next(i for i, b in enumerate(a.blocks) if b.name == "second")
    plan = depgraph.Plan.from_keep(a, {}, drop_blocks=[second])
    data = report_data(a, plan)
    block = a.blocks[second]
    assert [b["name"] for b in data["removed_blocks"]] == [str(block)] and "second" in str(block)
    drawn = {n["name"]: i for i, n in enumerate(data["nodes"])}
    assert data["removed_blocks"][0]["nodes"] == sorted(drawn[n] for n in block.nodes if n in drawn)
    assert len(data["removed_blocks"][0]["nodes"]) >= 2  # both linear layers at least
    rows = {layer["name"]: (layer["removed"], layer["total"], layer["with_block"]) for layer in data["layers"]}
    assert rows["second.0"] == (6, 6, True) and rows["first.0"] == (0, 6, False)
    assert data["cost"]["after"]["params"] == depgraph.cost(a, plan).params < depgraph.cost(a).params
    inside = [all(m.name.startswith("second.") for m in g.members) for g in a.groups]
    assert [g["with_block"] for g in data["groups"]] == inside and any(inside)
    assert report_data(a)["removed_blocks"] == []
    llama = _llama()  # its two decoder layers are drawn once: a removed layer is listed, not greyed
    data = report_data(llama, depgraph.Plan.from_keep(llama, {}, drop_blocks=[2, 3]))
    assert [b["name"].split(":")[0] for b in data["removed_blocks"]] == ["model.layers.1"] * 2
    assert [b["nodes"] for b in data["removed_blocks"]] == [[], []] and data["blocks"]
    if CHROMIUM is not None:
        page = depgraph.report(a, tmp_path / "r.html", plan)
        dom = browse(page, tmp_path / "profile", "--dump-dom")
        assert 'data-ready="true"' in dom and dom.count('class="removed-block"') == 1
        assert dom.count('class="bar-count">removed with its block<') == 2 and "the plan removes 1 blocks" in dom


def test_the_file_loads_nothing_from_the_network(tmp_path: Path) -> None:
    a, plan = _stack()
    html = depgraph.report(a, tmp_path / "r.html", plan).read_text()
    code = re.sub(r"/\*[\s\S]*?\*/", "", html)  # the libraries' licence comments name their home pages
    assert not re.search(r"https?://|<link\b|<script[^>]*\bsrc\b|<img\b|<iframe\b|@import|url\(", code)
    assert "cytoscape" in html and "dagre" in html


def test_text_from_the_model_cannot_end_the_page_s_script_or_add_markup(tmp_path: Path) -> None:
    a, _ = _stack()
    html = depgraph.report(a, tmp_path / "r.html", title="</script><b>x</b>").read_text()
    assert "<b>x</b>" not in html and _embedded(html)["title"] == "</script><b>x</b>"


def test_repeated_blocks_are_drawn_once_and_their_groups_shown_on_the_first() -> None:
    a, _ = _stack()
    data = report_data(a)
    assert [(b["label"], b["instances"]) for b in data["blocks"]] == [
        ("blocks.0–2 ×3", ["blocks.0", "blocks.1", "blocks.2"])]
    drawn = {n["module"] for n in data["nodes"]}
    assert "blocks.0.conv1" in drawn and "blocks.1.conv1" not in drawn
    assert len(data["nodes"]) < data["traced_nodes"]
    (g,) = [g for g in data["groups"] if g["layers"] == ["blocks.2.conv1", "blocks.2.bn", "blocks.2.conv2"]]
    assert g["instance"] == "blocks.2"
    assert {data["nodes"][i]["module"] for i in g["nodes"]} >= {"blocks.0.conv1", "blocks.0.bn"}
    full = report_data(a, collapse=False)
    assert full["blocks"] == [] and len(full["nodes"]) == full["traced_nodes"]


def test_a_llama_collapses_its_decoder_layers() -> None:
    a = _llama()
    data = report_data(a)
    assert [b["label"] for b in data["blocks"]] == ["model.layers.0–1 ×2"]
    assert [g["instance"] for g in data["groups"]].count("model.layers.1") == 4  # heads, head_dim, value width, MLP
    assert data["layout"] == "dagre" and len(data["nodes"]) <= REPORT.DAGRE_LIMIT
    n = len(data["nodes"])
    assert all(0 <= s < n and 0 <= t < n and s != t for s, t in data["edges"])


def test_unsupported_ops_are_marked_on_their_node() -> None:
    case = ZOO["no_rule"]
    a = depgraph.analyze(case.factory(), case.example_inputs())
    data = report_data(a)
    (u,) = data["unsupported"]
    assert data["nodes"][u["shown"]]["unsupported"] == a.unsupported[0].reason


def test_large_graphs_are_placed_in_rows_that_edges_descend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(REPORT, "DAGRE_LIMIT", 3)
    data = report_data(_stack()[0])
    assert data["layout"] == "rows"
    assert all(data["nodes"][s]["row"] < data["nodes"][t]["row"] for s, t in data["edges"])


def test_a_plan_for_another_model_is_refused(tmp_path: Path) -> None:
    _, plan = _stack()
    with pytest.raises(depgraph.PlanError, match="different analysis"):
        depgraph.report(_llama(), tmp_path / "r.html", plan)


# -- in a browser ----------------------------------------------------------------------

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary (chromium, chromium-browser or google-chrome) on PATH: "
                             "apt-get install chromium (.ci/run installs it where apt-get works)")


def browse(page: Path, profile: Path, *args: str, fragment: str = "") -> str:
    """Run headless Chromium on ``page`` (with ``#fragment``) and ``args``; its standard output."""
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--window-size=1280,800", "--virtual-time-budget=15000", *args,
               page.resolve().as_uri() + (f"#{fragment}" if fragment else "")]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


@needs_chromium
@pytest.mark.parametrize("model", ["stack", "stack-in-rows", "llama"])
def test_chromium_runs_the_page_lists_every_group_and_takes_a_screenshot(
        model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if model == "stack-in-rows":  # the layout of large graphs, and their labels set as they come into view
        monkeypatch.setattr(REPORT, "DAGRE_LIMIT", 3)
    a, plan = (_llama(), None) if model == "llama" else _stack()
    page = depgraph.report(a, tmp_path / f"{model}.html", plan)
    assert ('"layout":"rows"' in page.read_text()) == (model == "stack-in-rows")
    last = a.groups[-1]  # in the last instance of the repeated layers: drawn on the first one's nodes
    dom = browse(page, tmp_path / "profile", "--dump-dom", fragment=f"group={last.index}")
    body = re.search(r"<body([^>]*)>", dom)
    assert body is not None and 'data-ready="true"' in body.group(1), dom[:2000]
    assert "data-error" not in body.group(1) and "data-render-ms" in body.group(1)
    assert {int(i) for i in re.findall(r'<li id="group-(\d+)"', dom)} == {g.index for g in a.groups}
    assert dom.count('class="bar-row"') == len(report_data(a)["layers"])
    details = re.search(r'<section id="details">(.*?)</section>', dom, re.S)
    assert details is not None and f"group {last.index}</h3>" in details.group(1)
    assert last.members[0].name in details.group(1) and "drawn on" in details.group(1)
    shot = tmp_path / f"{model}.png"
    browse(page, tmp_path / "profile", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
