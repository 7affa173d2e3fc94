// depgraph's report page: reads the JSON that depgraph.report embedded and draws it.
// Every text from the data goes through textContent, never through HTML.
(function () {
  "use strict";
  var body = document.body;
  window.addEventListener("error", function (event) {
    body.dataset.error = String(event.message);
    var timing = document.getElementById("timing");
    timing.className = "error";
    timing.textContent = "error: " + event.message;
  });
  var data = JSON.parse(document.getElementById("depgraph-data").textContent);
  var cy = null;
  var ROW_X = 140, ROW_Y = 56;  // spacing of the rows layout

  function el(tag, text, className) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }
  function number(n) { return Number(n).toLocaleString("en-US"); }
  function percent(part, whole) { return whole ? (100 * part / whole).toFixed(1) + "%" : "-"; }
  function colour(index) {
    return index === null || index === undefined ? "#dcdcdc" : "hsl(" + ((index * 137.508) % 360).toFixed(1) + ",62%,64%)";
  }
  function swatch(index) {
    var s = el("span", null, "swatch");
    s.style.background = colour(index);
    return s;
  }
  function short(path) {
    var parts = path.split(".");
    return parts.length > 3 ? "…" + parts.slice(-3).join(".") : path;
  }
  function link(text, action) {
    var a = el("a", text, "link");
    a.addEventListener("click", action);
    return a;
  }

  // -- header: summary and cost ------------------------------------------------------

  function summary() {
    var drawn = data.nodes.length, blocks = data.blocks.length;
    document.getElementById("summary").textContent =
      data.groups.length + " groups, " + data.pinned.length + " pinned axes, " + data.unsupported.length +
      " unsupported ops; tracer " + data.tracer + "; " + drawn + " nodes drawn of " + data.traced_nodes +
      (blocks ? " (" + blocks + " runs of repeated layers drawn once)" : "") +
      (data.removed_blocks.length ? "; the plan removes " + data.removed_blocks.length + " blocks" : "") +
      (data.layout === "rows" ? "; placed in rows (graph too large for dagre)" : "");
  }

  function costTable() {
    var table = document.getElementById("cost"), before = data.cost.before, after = data.cost.after;
    var head = el("tr");
    ["", "model", after ? "after plan" : "", after ? "kept" : ""].forEach(function (t) { head.appendChild(el("th", t)); });
    table.appendChild(head);
    ["params", "macs"].forEach(function (key) {
      var row = el("tr");
      row.appendChild(el("th", key === "macs" ? "MACs" : "params"));
      row.appendChild(el("td", number(before[key])));
      row.appendChild(el("td", after ? number(after[key]) : ""));
      var cell = el("td", null, "ratio");
      if (after) {
        var bar = el("span", null, "bar"), kept = el("span", null, "kept");
        kept.style.width = percent(after[key], before[key]);
        bar.appendChild(kept);
        cell.appendChild(el("span", percent(after[key], before[key])));
        cell.appendChild(bar);
      }
      row.appendChild(cell);
      table.appendChild(row);
    });
  }

  // -- selection ---------------------------------------------------------------------

  // Fade everything but the nodes ``indices``, drawn in ``paint`` (a group's colour) or their own.
  function mark(indices, paint) {
    if (!cy) return;
    cy.batch(function () {
      cy.elements().addClass("faded").removeClass("picked");
      indices.forEach(function (i) {
        var node = cy.getElementById("n" + i);
        node.data("pick", paint || node.data("colour"));
        node.removeClass("faded").addClass("picked");
        node.ancestors().removeClass("faded");
      });
    });
  }

  function clearMarks() {
    if (cy) cy.elements().removeClass("faded picked");
    document.querySelectorAll("li.active").forEach(function (li) { li.classList.remove("active"); });
  }

  function activate(id) {
    document.querySelectorAll("li.active").forEach(function (li) { li.classList.remove("active"); });
    var li = document.getElementById(id);
    if (li) li.classList.add("active");
  }

  function details(title, index) {
    var box = document.getElementById("details");
    box.textContent = "";
    var h = el("h3");
    if (index !== undefined) h.appendChild(swatch(index));
    h.appendChild(document.createTextNode(title));
    box.appendChild(h);
    return box;
  }

  function rows(box, pairs) {
    var table = el("table");
    pairs.forEach(function (pair) {
      var tr = el("tr");
      tr.appendChild(el("td", pair[0], "muted"));
      var td = el("td");
      if (pair[1] instanceof Node) td.appendChild(pair[1]); else td.textContent = String(pair[1]);
      tr.appendChild(td);
      table.appendChild(tr);
    });
    box.appendChild(table);
  }

  function blockOf(instance) {
    for (var j = 0; j < data.blocks.length; j++) {
      if (data.blocks[j].instances.indexOf(instance) >= 0) return data.blocks[j];
    }
    return null;
  }

  function show(indices) {
    if (!cy || !indices.length) return;
    var nodes = cy.collection(indices.map(function (i) { return cy.getElementById("n" + i); }));
    cy.fit(nodes, 60);
    if (cy.zoom() > 1.2) cy.zoom({ level: 1.2, position: centre(nodes.boundingBox()) });
  }
  function centre(box) { return { x: (box.x1 + box.x2) / 2, y: (box.y1 + box.y2) / 2 }; }

  function pickGroup(index, focus) {
    var g = data.groups[index];
    activate("group-" + index);
    mark(g.nodes, colour(g.index));
    if (focus) show(g.nodes);
    var box = details("group " + g.index, g.index);
    var kept = g.kept === null ? "every unit (no plan)" : g.kept + " of " + g.size + " (removes " + (g.size - g.kept) + ")";
    var pairs = [["units", g.size], ["kept", kept], ["at least", g.min_keep],
      ["one unit", number(g.per_unit.params) + " params, " + number(g.per_unit.macs) + " MACs"]];
    if (g.instance) {
      var block = blockOf(g.instance);
      pairs.push(["drawn", "in " + g.instance + ", drawn on " + block.instances[0] + " (" + block.label + ")"]);
    }
    rows(box, pairs);
    box.appendChild(el("p", "members (" + g.members.length + "):", "muted"));
    var table = el("table");
    g.members.forEach(function (m) {
      var tr = el("tr");
      tr.appendChild(el("td", m[0]));
      tr.appendChild(el("td", "dim " + m[1], "muted"));
      table.appendChild(tr);
    });
    box.appendChild(table);
  }

  var pinnedByParam = {};
  data.pinned.forEach(function (p) {
    p.members.forEach(function (m) { (pinnedByParam[m[0]] = pinnedByParam[m[0]] || []).push([m[1], p.reason]); });
  });

  function pickNode(i) {
    var n = data.nodes[i];
    mark([i]);
    var box = details(n.op + ": " + n.name, n.colour);
    var groups = el("span");
    n.groups.forEach(function (g) { groups.appendChild(link("group " + g, function () { pickGroup(g); })); });
    var pairs = [["module", n.module || "(model)"], ["shape", n.shape ? "[" + n.shape.join(", ") + "]" : "-"],
      ["groups", n.groups.length ? groups : "none"]];
    if (n.block !== null) pairs.push(["repeated", data.blocks[n.block].label]);
    if (n.unsupported) pairs.push(["unsupported", n.unsupported]);
    rows(box, pairs);
    n.params.forEach(function (name) {
      (pinnedByParam[name] || []).forEach(function (pin) {
        box.appendChild(el("p", name + " dim " + pin[0] + " pinned: " + pin[1], "muted"));
      });
    });
  }

  function pickBlock(j) {
    var b = data.blocks[j];
    mark(data.nodes.map(function (n, i) { return n.block === j ? i : -1; }).filter(function (i) { return i >= 0; }));
    var box = details(b.label + ": " + b.count + " instances alike, drawn once");
    var byInstance = {}, first = b.instances[0];
    data.groups.forEach(function (g) {  // groups inside one instance; the first's are drawn as themselves
      var inFirst = g.layers.every(function (layer) { return layer.indexOf(first + ".") === 0; });
      var where = g.instance || (inFirst ? first : null);
      if (where && b.instances.indexOf(where) >= 0) (byInstance[where] = byInstance[where] || []).push(g.index);
    });
    b.instances.forEach(function (name) {
      var p = el("p");
      p.appendChild(el("span", name + ": ", "muted"));
      (byInstance[name] || []).forEach(function (g) { p.appendChild(link("group " + g, function () { pickGroup(g); })); });
      box.appendChild(p);
    });
  }

  // -- lists -------------------------------------------------------------------------

  function groupList() {
    var list = document.getElementById("groups");
    document.getElementById("group-count").textContent = "(" + data.groups.length + ")";
    data.groups.forEach(function (g) {
      var li = el("li");
      li.id = "group-" + g.index;
      li.dataset.group = g.index;
      li.dataset.search = (g.layers.join(" ") + " " + (g.instance || "")).toLowerCase();
      li.title = g.layers.join(", ");
      li.appendChild(swatch(g.index));
      li.appendChild(el("b", "group " + g.index));
      li.appendChild(el("span", " " + (g.with_block ? "removed with its block"
        : (g.kept === null ? g.size : g.kept + "/" + g.size) + " units") + " · "));
      li.appendChild(el("span", g.layers.slice(0, 3).join(", ") + (g.layers.length > 3 ? ", …" : ""), "muted"));
      li.addEventListener("click", function () { pickGroup(g.index, true); });
      list.appendChild(li);
    });
    document.getElementById("filter").addEventListener("input", function (event) {
      var words = event.target.value.toLowerCase().split(/\s+/).filter(Boolean);
      list.querySelectorAll("li").forEach(function (li) {
        var hit = words.every(function (w) { return li.dataset.search.indexOf(w) >= 0 || ("group " + li.dataset.group) === w; });
        li.classList.toggle("hidden", !hit);
      });
    });
  }

  function pinnedList() {
    var box = document.getElementById("pinned");
    document.getElementById("pinned-count").textContent = "(" + data.pinned.length + ")";
    var reasons = {}, order = [];
    data.pinned.forEach(function (p, k) {
      if (!(p.reason in reasons)) { reasons[p.reason] = []; order.push(p.reason); }
      reasons[p.reason].push(k);
    });
    order.forEach(function (reason) {
      var d = el("details"), s = el("summary", reason + " (" + reasons[reason].length + ")"), ul = el("ul");
      d.appendChild(s);
      reasons[reason].forEach(function (k) {
        var p = data.pinned[k], li = el("li");
        li.id = "pinned-" + k;
        li.textContent = p.size + " units: " + p.members.map(function (m) { return m[0] + " dim " + m[1]; }).join(", ");
        li.title = li.textContent;
        li.addEventListener("click", function () {
          activate(li.id);
          mark(p.nodes);
          var info = details("pinned: " + p.size + " units");
          rows(info, [["reason", p.reason], ["axes", p.members.map(function (m) { return m[0] + " dim " + m[1]; }).join("; ")]]);
        });
        ul.appendChild(li);
      });
      d.appendChild(ul);
      box.appendChild(d);
    });
  }

  function unsupportedList() {
    var list = document.getElementById("unsupported");
    document.getElementById("unsupported-count").textContent = "(" + data.unsupported.length + ")";
    if (!data.unsupported.length) list.appendChild(el("li", "none", "muted"));
    data.unsupported.forEach(function (u, k) {
      var li = el("li", u.op + " at " + u.node + ": " + u.reason);
      li.id = "unsupported-" + k;
      li.addEventListener("click", function () {
        activate(li.id);
        if (u.shown !== null) pickNode(u.shown);
      });
      list.appendChild(li);
    });
  }

  function notes() {
    var list = document.getElementById("notes");
    if (!data.notes.length) list.appendChild(el("li", "none", "muted"));
    data.notes.forEach(function (n) { list.appendChild(el("li", n)); });
  }

  function layerBars() {
    var box = document.getElementById("layers"), removed = 0, total = 0;
    data.removed_blocks.forEach(function (b) { box.appendChild(el("p", "removed block " + b.name, "removed-block")); });
    data.layers.forEach(function (layer) {
      var row = el("div", null, "bar-row"), bar = el("span", null, "bar");
      var kept = el("span", null, "kept"), gone = el("span", null, "removed");
      var left = layer.total - layer.removed;
      row.title = layer.param + " dim " + layer.dim;
      row.appendChild(el("span", layer.name, "bar-name"));
      kept.style.width = percent(left, layer.total);
      gone.style.width = percent(layer.removed, layer.total);
      bar.appendChild(kept);
      bar.appendChild(gone);
      row.appendChild(bar);
      row.appendChild(el("span", layer.with_block ? "removed with its block"
        : number(left) + " / " + number(layer.total) + (layer.removed ? " (−" + number(layer.removed) + ")" : ""), "bar-count"));
      box.appendChild(row);
      removed += layer.removed;
      total += layer.total;
    });
    document.getElementById("layers-caption").textContent = data.cost.after
      ? "(green kept, red removed by the plan: " + number(removed) + " of " + number(total) + " channels)"
      : "(no plan: every channel kept)";
  }

  // -- the graph ---------------------------------------------------------------------

  // Large graphs (placed in rows) get their labels as their nodes come into view: measuring
  // every label before the first frame costs a quarter of its time at 2,000 nodes.
  var lazy = data.layout === "rows";
  function label(n) { return n.op + "\n" + short(n.module || n.name); }

  function labelInView() {
    if (cy.zoom() < 0.3) return;
    var box = cy.extent(), pad = 2 * ROW_X;
    cy.batch(function () {
      cy.nodes().forEach(function (node) {
        var p = node.position();
        if (node.data("label") || p.x < box.x1 - pad || p.x > box.x2 + pad || p.y < box.y1 - pad || p.y > box.y2 + pad) return;
        node.data("label", label(data.nodes[Number(node.id().slice(1))]));
      });
    });
  }

  function elements() {
    var out = [], rows = data.layout === "rows", dropped = {};
    data.removed_blocks.forEach(function (b) { b.nodes.forEach(function (i) { dropped[i] = true; }); });
    data.blocks.forEach(function (b) { out.push({ group: "nodes", data: { id: "b" + b.id, label: b.label }, classes: "block" }); });
    data.nodes.forEach(function (n, i) {
      var e = { group: "nodes", data: { id: "n" + i, label: lazy ? "" : label(n), colour: colour(n.colour) } };
      if (n.block !== null) e.data.parent = "b" + n.block;
      if (n.unsupported) e.classes = "unsupported";
      if (dropped[i]) e.classes = (e.classes ? e.classes + " " : "") + "dropped";
      if (rows) e.position = { x: (n.column - (n.width - 1) / 2) * ROW_X, y: n.row * ROW_Y };
      out.push(e);
    });
    data.edges.forEach(function (e, k) { out.push({ group: "edges", data: { id: "e" + k, source: "n" + e[0], target: "n" + e[1] } }); });
    return out;
  }

  function style(large) {
    return [
      { selector: "node", style: { shape: "round-rectangle", width: 124, height: 32, label: "data(label)",
        "font-size": 11, "text-wrap": "wrap", "text-max-width": 120, "text-valign": "center", "text-halign": "center",
        "background-color": "data(colour)", "border-width": 1, "border-color": "#666", "min-zoomed-font-size": 6 } },
      { selector: "node.block", style: { "background-color": "#efeaff", "background-opacity": 0.55, "border-style": "dashed",
        "border-color": "#6a5acd", "border-width": 2, "text-valign": "top", "font-size": 14, "font-weight": "bold",
        color: "#4b3ca8", padding: 14 } },
      { selector: "node.unsupported", style: { "border-color": "#d00000", "border-width": 5 } },
      { selector: "node.dropped", style: { "background-color": "#d9d9d9", "border-style": "dotted", "border-width": 3,
        color: "#777" } },
      { selector: "edge", style: { width: 1.2, "line-color": "#999", "target-arrow-color": "#999",
        "target-arrow-shape": large ? "none" : "triangle", "arrow-scale": 0.7, "curve-style": large ? "haystack" : "bezier" } },
      { selector: ".faded", style: { opacity: 0.13 } },
      { selector: "node.picked", style: { "border-width": 4, "border-color": "#111", "background-color": "data(pick)" } },
      { selector: "node.unsupported.picked", style: { "border-color": "#d00000" } }
    ];
  }

  // A deep graph fitted whole is too small to read: start at the inputs, zoomed to read.
  function readable() {
    if (cy.zoom() >= 0.35) return;
    var box = cy.elements().boundingBox();
    cy.zoom(0.7);
    cy.pan({ x: cy.width() / 2 - 0.7 * (box.x1 + box.x2) / 2, y: 20 - 0.7 * box.y1 });
  }

  // The same for rows, from the data: fitting would measure every node and label first.
  function readableRows() {
    var rows = 0, widest = 1;
    data.nodes.forEach(function (n) { rows = Math.max(rows, n.row + 1); widest = Math.max(widest, n.width); });
    if (Math.min(cy.width() / (widest * ROW_X), cy.height() / (rows * ROW_Y)) >= 0.35) {
      cy.fit(undefined, 20);
      return;
    }
    cy.zoom(0.7);
    cy.pan({ x: cy.width() / 2, y: 20 + 0.7 * ROW_Y / 2 });
  }

  // report.html#group=3 opens with group 3 picked.
  function fromAddress() {
    var match = /group=(\d+)/.exec(window.location.hash);
    if (match && data.groups[Number(match[1])]) pickGroup(Number(match[1]), true);
  }

  function drawGraph() {
    var large = data.nodes.length > 1000;
    var layout = data.layout === "rows" ? { name: "preset", fit: false }
      : { name: "dagre", rankDir: "TB", nodeSep: 14, rankSep: 26, edgeSep: 6, fit: true, padding: 20, animate: false };
    var start = performance.now();
    cy = cytoscape({
      container: document.getElementById("graph"), elements: elements(), style: style(large), layout: layout,
      minZoom: 0.02, maxZoom: 3, pixelRatio: 1, hideEdgesOnViewport: large, textureOnViewport: large
    });
    var laidOut = performance.now();
    body.dataset.layoutMs = (laidOut - start).toFixed(0);
    cy.one("render", function () {
      var done = performance.now();
      body.dataset.renderMs = done.toFixed(0);
      document.getElementById("timing").textContent = data.nodes.length + " nodes, " + data.edges.length + " edges: " +
        "layout " + (laidOut - start).toFixed(0) + " ms, drawn " + done.toFixed(0) + " ms after the page started loading";
    });
    if (data.layout === "rows") readableRows(); else readable();
    if (lazy) {
      labelInView();
      var pending = null;
      cy.on("viewport", function () {
        clearTimeout(pending);
        pending = setTimeout(labelInView, 100);
      });
    }
    cy.on("tap", "node", function (event) {
      var id = event.target.id();
      if (id.charAt(0) === "b") pickBlock(Number(id.slice(1))); else pickNode(Number(id.slice(1)));
    });
    cy.on("tap", function (event) { if (event.target === cy) clearMarks(); });
    document.getElementById("fit").addEventListener("click", function () { cy.fit(undefined, 20); });
    document.getElementById("clear").addEventListener("click", clearMarks);
    document.getElementById("legend").textContent = "colour: a group of the node's output · red border: " +
      "unsupported op" + (data.blocks.length ? " · dashed box: repeated layers, drawn once (click it)" : "") +
      (data.removed_blocks.length ? " · grey, dotted: removed with a block" : "");
  }

  summary();
  costTable();
  groupList();
  pinnedList();
  unsupportedList();
  notes();
  layerBars();
  drawGraph();
  fromAddress();
  body.dataset.ready = "true";
})();
