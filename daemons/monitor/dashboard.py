"""The live dashboard: one static page polling ``/api/status`` every 2 s. No build step, no external
assets (sites often run without internet access); kept in a module so packaging needs no data files.

The page, its script (``/dashboard.js``) and its style (``/dashboard.css``) are served apart, and
nothing is inline (no ``<script>`` body, no ``style=`` attribute): the Content-Security-Policy can
then forbid inline script, so text from the bus that escaped the escaping still could not run.
Everything shown from the status document goes through ``esc`` or ``textContent``.

It shows what ``spool status`` shows, plus throughput over time: an inline SVG chart of the
monitor's own samples (``throughput`` in the document: messages/s on the bus and work done/s per
daemon, one point per poll, the last 30 minutes at the default interval), drawn by the page itself.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Spool monitor</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="dashboard.css">
</head>
<body>
<h1>Spool monitor</h1>
<div id="meta" class="muted">loading...</div>
<div id="missing"></div>
<h2>Throughput</h2><div id="throughput"></div>
<h2>Daemons</h2><div id="daemons"></div>
<div id="stalled"></div>
<h2>Queues</h2><div id="queues"></div>
<h2>Failures by cause</h2><div id="failures"></div>
<h2>Endpoints</h2><div id="endpoints"></div>
<h2>Recent alerts</h2><div id="alerts"></div>
<script src="dashboard.js"></script>
</body>
</html>
"""

STYLE = """  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
  h1 { font-size: 1.3em; margin: 0 0 .2em; }
  h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
  table { border-collapse: collapse; min-width: 40em; }
  th, td { padding: .25em .7em; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }
  td.n { text-align: right; font-variant-numeric: tabular-nums; }
  .alive, .online { color: #17803d; } .late, .paused { color: #b46900; }
  .dead, .down, .bad { color: #c0262d; font-weight: 600; }
  .muted { color: #777; } .err { font-family: monospace; font-size: 12px; white-space: pre-wrap; }
  #missing { color: #b46900; }
  #throughput svg { border: 1px solid #ddd; background: #fcfcfc; }
  .legend { display: inline-block; margin-right: 1.2em; }
  .swatch { display: inline-block; width: .8em; height: .8em; margin-right: .3em; vertical-align: -.05em; }
  .c0 { background: #1f6feb; }
  .c1 { background: #17803d; }
  .c2 { background: #b46900; }
  .c3 { background: #8250df; }
  .c4 { background: #c0262d; }
  .c5 { background: #0a7c86; }
"""

SCRIPT = """"use strict";
const ENT = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"};
const esc = (v) => String(v ?? "").replace(/[&<>"]/g, (c) => ENT[c]);
const num = (v) => (v === null || v === undefined ? "?" : String(v));
function table(head, rows) {
  if (!rows.length) return '<p class="muted">none</p>';
  return "<table><tr>" + head.map((h) => "<th>" + esc(h) + "</th>").join("") + "</tr>" +
    rows.map((r) => "<tr>" + r.join("") + "</tr>").join("") + "</table>";
}
const td = (v, cls) => '<td class="' + (cls || "") + '">' + esc(v) + "</td>";
const tn = (v) => td(num(v), "n");
function holders(hs) {
  if (hs === null) return "?";
  const one = (h) => (h.daemon || h.connection) + "@" + (h.host || "?") + " (" + h.unacked + ")";
  return hs.map(one).join(", ");
}
const COLOURS = ["#1f6feb", "#17803d", "#b46900", "#8250df", "#c0262d", "#0a7c86"];
const rate = (v) => (v >= 100 ? v.toFixed(0) : v.toFixed(1)) + "/s";
function chart(points) {
  if (points === null || points === undefined) return '<p class="muted">unknown without the monitor</p>';
  if (!points.length) return '<p class="muted">no samples yet (one per poll)</p>';
  const series = [["bus messages", points.map((p) => p.messages)]];
  const daemons = [...new Set(points.flatMap((p) => Object.keys(p.processed)))].sort();
  for (const d of daemons) series.push([d + " processed", points.map((p) => p.processed[d] || 0)]);
  const W = 720, H = 160, P = 6, n = points.length;
  const top = Math.max(1, ...series.flatMap(([, v]) => v));
  const x = (i) => (n === 1 ? W - P : P + ((W - 2 * P) * i) / (n - 1));
  const y = (v) => H - P - ((H - 2 * P) * v) / top;
  let svg = '<svg width="' + W + '" height="' + H + '" viewBox="0 0 ' + W + " " + H + '" role="img">' +
    '<text x="' + (W - P) + '" y="14" text-anchor="end" font-size="11" fill="#777">' + esc(rate(top)) +
    "</text>";
  const legend = [];
  series.forEach(([name, values], k) => {
    const colour = COLOURS[k % COLOURS.length];
    const pts = values.map((v, i) => x(i).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
    svg += '<polyline data-series="' + esc(name) + '" fill="none" stroke="' + colour +
      '" stroke-width="1.5" points="' + pts + '"/>';
    legend.push('<span class="legend" data-series="' + esc(name) + '" data-peak="' + Math.max(...values) +
      '"><span class="swatch c' + (k % COLOURS.length) + '"></span>' + esc(name) + ": now " +
      esc(rate(values[values.length - 1])) + ", peak " + esc(rate(Math.max(...values))) + "</span>");
  });
  const span = points.reduce((a, p) => a + p.seconds, 0);
  return svg + "</svg><div>" + legend.join("") + '</div><div class="muted">last ' +
    esc((span / 60).toFixed(1)) + " min, one point per " + esc(points[points.length - 1].seconds.toFixed(0)) +
    " s</div>";
}
function render(s) {
  const m = s.monitor;
  document.getElementById("meta").textContent =
    "as of " + s.time + " - monitor on " + m.host + " (pid " + m.pid + ", " + m.version + ")" +
    (m.role === "standby" ? " - STANDBY, active: " + (m.active_instance || "none") : "");
  document.getElementById("missing").textContent = s.missing.length ? "missing: " + s.missing.join("; ") : "";
  document.getElementById("throughput").innerHTML = chart(s.throughput);
  document.getElementById("daemons").innerHTML = table(
    ["daemon", "state", "host", "pid", "version", "heartbeat (s ago)", "in flight", "processed", "retried",
     "dead"],
    (s.daemons || []).map((d) => [td(d.daemon), td(d.state, d.state), td(d.host), tn(d.pid), td(d.version),
      tn(d.age.toFixed(1)), tn(d.in_flight), tn(d.processed), tn(d.retried), tn(d.dead_lettered)]));
  const q = s.queues ? s.queues.queues : [];
  document.getElementById("queues").innerHTML = table(
    ["daemon", "ready", "in flight", "held by", "retrying", "dead", "consumers"],
    q.map((x) => [td(x.daemon), tn(x.ready), tn(x.in_flight),
      td(holders(x.holders)),
      tn(x.retrying), td(num(x.dead), x.dead ? "bad" : ""), tn(x.consumers)]));
  const stalled = s.stalled || [];
  document.getElementById("stalled").innerHTML = stalled.length === 0 ? "" : "<h2>Stalled</h2>" + table(
    ["kind", "held by", "since", "items", "what"],
    stalled.map((w) => [td(w.kind, "bad"), td(w.holder), td(w.since), tn(w.items), td(w.what, "err")]));
  document.getElementById("failures").innerHTML = table(
    ["count", "daemon", "reason", "endpoint", "first", "last", "example", "error"],
    (s.failures || []).map((f) => [tn(f.count), td(f.daemon), td(f.reason, "bad"), td(f.endpoint || ""),
      td(f.first), td(f.last), td(f.example || ""), td(f.error, "err")]));
  document.getElementById("endpoints").innerHTML = s.endpoints === null ? '<p class="muted">unknown</p>' :
    table(["name", "kind", "state"], s.endpoints.map((e) => [td(e.name), td(e.kind), td(e.state, e.state)]));
  document.getElementById("alerts").innerHTML = table(
    ["time", "kind", "summary"], (s.alerts || []).map((a) => [td(a.time), td(a.kind), td(a.summary, "err")]));
}
async function tick() {
  try {
    const r = await fetch("api/status", {cache: "no-store"});
    render(await r.json());
  } catch (e) {
    document.getElementById("meta").textContent = "monitor not reachable: " + e;
  }
}
tick();
setInterval(tick, 2000);
"""
