# ruff: noqa: E501  (the page is one inline HTML/CSS/JS document; its lines are not Python)
"""``GET /dashboard``: one self-contained live page (inline CSS, JS and SVG; no CDN, no external request).

It polls ``GET /v2/monitoring`` every two seconds (an API key, when the server needs one, goes in the URL
fragment: ``/dashboard#key=KEY``, which browsers never send to the server) and draws throughput and latency
over time, drift per feature, realized vs estimated accuracy, per-group metrics, alerts and security events.
The history lives in the page; the server keeps nothing for it.

When the server needs a key, the page itself does too: a request without one gets :data:`KEY_PAGE_HTML`
(401, no data), which takes the key from the fragment (or a form), fetches ``/dashboard`` with it in the
``Authorization`` header, and replaces itself with the answer. Its script keeps to one function scope,
because the dashboard's scripts then run in the same window.
"""

from __future__ import annotations

from slipstream.errors import UnauthorizedError
from slipstream.serve.guard import Guard
from slipstream.serve.replies import Reply


def dashboard_reply(guard: Guard, headers: list[tuple[bytes, bytes]], client: str) -> Reply:
    """The page, to a caller with a key (or to anyone when the server has none); without one, the
    data-free page that asks for the key, since a browser cannot put a header on a navigation."""
    try:
        guard.authenticate(headers, client)
    except UnauthorizedError:
        reply = Reply(KEY_PAGE_HTML, 401)
    else:
        reply = Reply(DASHBOARD_HTML)
    reply.content_type = (b"content-type", b"text/html; charset=utf-8")
    return reply


KEY_PAGE_HTML = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>slipstream dashboard: API key needed</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font:14px/1.4 system-ui,sans-serif;margin:20px">
<p id="need">This server needs an API key for its dashboard. Open it as <code>/dashboard#key=KEY</code>, or enter the key:</p>
<form id="form"><input id="key" type="password" autocomplete="off" placeholder="API key"> <button>Open</button></form>
<script>
"use strict";
(() => {
  const form = document.getElementById("form");
  form.onsubmit = e => {
    e.preventDefault();
    location.hash = "key=" + encodeURIComponent(document.getElementById("key").value);
    location.reload();
  };
  const key = new URLSearchParams(location.hash.slice(1)).get("key");
  if (!key) return;
  fetch("/dashboard", {headers: {Authorization: "Bearer " + key}}).then(async r => {
    if (!r.ok) { document.getElementById("need").textContent = "The server refused that key (" + r.status + "). Enter another:"; return; }
    const page = await r.text();
    document.open(); document.write(page); document.close();
  });
})();
</script></body></html>
"""

DASHBOARD_HTML = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>slipstream dashboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:baseline}
header h1{font-size:18px;margin:0}#status{opacity:.8}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(400px,1fr));gap:14px;padding:14px 20px}
section{background:#fff;border-radius:6px;padding:10px 14px;box-shadow:0 1px 2px #0002;overflow-x:auto}
h2{font-size:14px;margin:0 0 6px;color:#455}h3{font-size:13px;margin:8px 0 4px}
table{border-collapse:collapse;width:100%;font-size:12px}td,th{padding:2px 6px;border-bottom:1px solid #eee;text-align:left}
.firing{color:#b00020;font-weight:600}.pending{color:#b36b00}.ok{color:#11772d}.muted{color:#889}
.big{font-size:22px;font-weight:600;margin-right:18px}svg{display:block;width:100%;height:auto}
</style></head><body>
<header><h1>slipstream</h1><span id="status">connecting&hellip;</span></header>
<main>
<section><h2>Throughput (requests/s)</h2><div id="rps"></div><svg id="rps-chart" viewBox="0 0 400 120"></svg></section>
<section><h2>Latency (ms)</h2><div id="lat"></div><svg id="lat-chart" viewBox="0 0 400 120"></svg></section>
<section><h2>Accuracy: realized vs estimated</h2><div id="acc"></div><svg id="acc-chart" viewBox="0 0 400 120"></svg></section>
<section><h2>Drift per feature (PSI, window vs reference)</h2><div id="drift"></div></section>
<section><h2>Per-group metrics</h2><div id="groups"></div></section>
<section><h2>Alerts</h2><div id="alerts"></div></section>
<section><h2>Security events</h2><div id="security"></div></section>
</main>
<script>
"use strict";
const key = new URLSearchParams(location.hash.slice(1)).get("key");
const hist = {t: [], rps: [], lat: [], p99: [], real: [], est: []};
let prev = null, polls = 0;
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const fmt = (v, d = 3) => v === null || v === undefined ? "&ndash;" : (+v).toFixed(d);
function push(name, v) { hist[name].push(v); if (hist[name].length > 150) hist[name].shift(); }
function chart(id, series, colors, fixedMax) {
  const svg = document.getElementById(id), W = 400, H = 120, P = 24;
  const all = series.flat().filter(v => v !== null && isFinite(v));
  const max = fixedMax || Math.max(1e-9, ...all) * 1.1;
  let out = `<line x1="${P}" y1="${H - 14}" x2="${W}" y2="${H - 14}" stroke="#ccc"/>` +
    `<text x="0" y="10" font-size="9" fill="#889">${max.toFixed(max < 10 ? 2 : 0)}</text>`;
  series.forEach((s, k) => {
    const n = s.length, pts = [];
    s.forEach((v, i) => { if (v !== null && isFinite(v)) pts.push([P + (W - P) * (n < 2 ? 1 : i / (n - 1)),
      (H - 14) - (H - 24) * v / max]); });
    if (!pts.length) return;
    out += `<polyline fill="none" stroke="${colors[k]}" stroke-width="1.6" points="${pts.map(p => p.join(",")).join(" ")}"/>`;
    const last = pts[pts.length - 1];
    out += `<circle cx="${last[0]}" cy="${last[1]}" r="3" fill="${colors[k]}"/>`;
  });
  svg.innerHTML = out;
}
function bars(features) {
  if (!features.length) return '<p class="muted">no drift figures yet</p>';
  const max = Math.max(0.3, ...features.map(f => f.psi)), W = 400, row = 16;
  let svg = `<svg viewBox="0 0 ${W} ${features.length * row + 4}">`;
  features.forEach((f, i) => {
    const w = (W - 150) * f.psi / max;
    svg += `<text x="0" y="${i * row + 12}" font-size="10">${esc(f.feature)}</text>` +
      `<rect x="90" y="${i * row + 3}" width="${w}" height="11" fill="${f.drifted ? "#d33" : "#5a8"}"/>` +
      `<text x="${94 + w}" y="${i * row + 12}" font-size="9">${f.psi.toFixed(3)}</text>`;
  });
  return svg + "</svg>";
}
function table(head, rows) {
  return `<table><tr>${head.map(h => `<th>${h}</th>`).join("")}</tr>` +
    rows.map(r => `<tr>${r.map(c => `<td>${c}</td>`).join("")}</tr>`).join("") + "</table>";
}
function render(doc) {
  const total = Object.values(doc.requests).reduce((a, m) => a + Object.values(m).reduce((x, y) => x + y, 0), 0);
  const lat = Object.values(doc.latency), done = lat.reduce((a, l) => a + l.requests, 0);
  const ms = lat.reduce((a, l) => a + l.mean_ms * l.requests, 0);
  let rps = 0, interval = null;
  if (prev) {
    const dt = doc.at - prev.at;
    rps = dt > 0 ? (total - prev.total) / dt : 0;
    interval = done > prev.done ? (ms - prev.ms) / (done - prev.done) : null;
  }
  prev = {at: doc.at, total, done, ms};
  const m = doc.models[0] || {};
  const q = m.quality || null;
  push("t", doc.at); push("rps", rps); push("lat", interval);
  push("p99", m.latency_ms && m.latency_ms.p99 !== undefined ? m.latency_ms.p99 : null);
  push("real", q && q.realized && q.realized.accuracy !== undefined ? q.realized.accuracy : null);
  push("est", q ? q.estimated_accuracy : null);
  document.getElementById("rps").innerHTML = `<span class="big">${rps.toFixed(1)}</span> ${total} requests in all`;
  document.getElementById("lat").innerHTML = `<span class="big">${interval === null ? "&ndash;" : interval.toFixed(2)}</span>` +
    `mean over the last poll; window p50 ${fmt(m.latency_ms && m.latency_ms.p50, 2)}, p99 ${fmt(m.latency_ms && m.latency_ms.p99, 2)} ` +
    `<span class="muted">(blue: mean, orange: window p99)</span>`;
  chart("rps-chart", [hist.rps], ["#2a6fdb"]);
  chart("lat-chart", [hist.lat, hist.p99], ["#2a6fdb", "#e08a00"]);
  chart("acc-chart", [hist.real, hist.est], ["#11772d", "#8a4fd8"], 1);
  document.getElementById("acc").innerHTML = q ?
    `realized <span class="big">${fmt(q.realized && q.realized.accuracy)}</span> estimated ` +
    `<span class="big">${fmt(q.estimated_accuracy)}</span> build time ${fmt(q.reference && q.reference.accuracy)} ` +
    `<span class="muted">(${q.labeled} of ${q.predictions} labeled; green realized, purple estimated)</span>` +
    (q.accuracy_drop_low === null || q.accuracy_drop_low === undefined ? "" :
      `<br>drop ${fmt(q.accuracy_drop)}, interval ${fmt(q.accuracy_drop_low)} to ${fmt(q.accuracy_drop_high)}`) +
    (q.estimated_drop_low === null || q.estimated_drop_low === undefined ? "" :
      `<br>estimated drop ${fmt(q.estimated_drop)}, interval ${fmt(q.estimated_drop_low)} to ` +
      `${fmt(q.estimated_drop_high)} <span class="muted">${esc(q.interval || "")}</span>`) :
    `<p class="muted">${esc((m.notes || []).join("; ") || "no accuracy yet")}</p>`;
  const shift = (label, r) => `<p>${label}: ` + (!r ? '<span class="muted">off</span>' :
    `<code>${esc(r.method)}</code> p = ${r.p_value.toPrecision(3)}, ` + (!r.judged ? `not judged: ${esc(r.reason)}` :
    r.drifted ? '<span class="firing">drifted</span>' : "ok")) + "</p>";
  const parts = [];
  for (const mm of doc.models) {
    const d = mm.drift;
    parts.push(`<h3>${esc(mm.model)} v${esc(mm.version)}</h3>` + (d ?
      `<p>${d.rows} rows, method <code>${esc(d.method)}</code>, ${d.drifted_features.length} drifted feature(s)` +
      (d.multivariate ? `, multivariate ${d.multivariate.drifted ? '<span class="firing">drifted</span>' : "ok"}` : "") +
      `</p>` + shift("output shift", d.output_shift) + shift("embedding shift", d.embedding_shift) + bars(d.top) :
      `<p class="muted">${esc((mm.notes || []).join("; ") || "no drift figures yet")}</p>`));
  }
  document.getElementById("drift").innerHTML = parts.join("") || '<p class="muted">no monitored model</p>';
  const f = m.fairness;
  document.getElementById("groups").innerHTML = f ? table(["group", "rows", "labeled", "selection rate", "accuracy", "TPR", "FPR"],
    f.groups.map(g => [esc(g.group), g.rows, g.labeled, fmt(g.selection_rate), fmt(g.accuracy), fmt(g.tpr), fmt(g.fpr)])) +
    table(["gap", "value", f.confidence ? `interval (${+(f.confidence * 100).toFixed(2)} % simultaneous)` : "interval", "threshold", "verdict"],
      (f.gaps || []).map(g => [esc(g.metric.replace(/_/g, " ")), fmt(g.value),
        g.low === null ? "&ndash;" : `${fmt(g.low)} to ${g.high === null ? "&infin;" : fmt(g.high)}`,
        `${g.direction === "below" ? "&lt;" : "&gt;"} ${g.threshold}`,
        g.status === "beyond threshold" ? '<span class="firing">beyond threshold</span>' : g.status === "within" ?
        '<span class="ok">within</span>' : `undecided${g.needed_rows ? `, need &asymp;&nbsp;${g.needed_rows.toLocaleString("en")}/group` : ""}`])) +
    `<p class="${f.flagged ? "firing" : f.reasons.length ? "muted" : "ok"}">` +
    (f.flagged ? "bias flagged" : f.reasons.length ? "no gap beyond its threshold; undecided" : "every gap within its threshold") +
    (f.reasons.length ? ": " + esc(f.reasons.join("; ")) : "") + "</p>" : '<p class="muted">no grouped requests yet</p>';
  const alerts = [];
  for (const mm of doc.models) for (const a of mm.alerts || []) alerts.push([esc(mm.model), esc(a.rule),
    `<span class="${a.state}">${a.state}</span>`, fmt(a.value), esc(a.reason)]);
  const firing = alerts.filter(a => a[2].includes(">firing<")).length;
  const shown = alerts.filter(a => !a[2].includes(">inactive<"));
  document.getElementById("alerts").innerHTML = table(["model", "rule", "state", "value", "why"], shown) +
    `<p class="muted">${alerts.length - shown.length} more rule(s) inactive</p>`;
  const sec = [];
  for (const [reason, n] of Object.entries(doc.rejections)) sec.push(["server", "refused", esc(reason), n]);
  for (const mm of doc.models) {
    const c = (mm.security || {}).counters || {};
    for (const ev of ["rejected", "auth_failed"]) for (const [r, n] of Object.entries(c[ev] || {})) sec.push([esc(mm.model), ev, esc(r), n]);
    sec.push([esc(mm.model), "out-of-distribution rows", "", c.ood_rows || 0]);
    for (const k of (mm.security || {}).suspicious_keys || []) sec.push([esc(mm.model), "extraction?", esc(k.key_id), esc(k.reason)]);
    for (const k of (mm.security || {}).probing_keys || []) sec.push([esc(mm.model), "boundary probing?", esc(k.key_id), esc(k.reason)]);
    const integ = (mm.security || {}).integrity;
    if (integ) sec.push([esc(mm.model), "bundle integrity", integ.ok ? '<span class="ok">ok</span>' : '<span class="firing">FAILED</span>', integ.checks]);
  }
  document.getElementById("security").innerHTML = table(["model", "event", "reason", "count"], sec);
  document.title = `slipstream dashboard: ${doc.models.length} model(s), ${firing} alert(s) firing`;
  document.getElementById("status").textContent = `${new Date(doc.at * 1000).toLocaleTimeString()}, ` +
    `${doc.models.length} monitored version(s), ${firing} alert(s) firing`;
  polls += 1;
  if (!document.getElementById("loaded")) {
    const mark = document.createElement("span"); mark.id = "loaded"; mark.textContent = "live";
    document.querySelector("header").appendChild(mark);
  }
  document.getElementById("loaded").dataset.polls = String(polls);
}
async function poll() {
  try {
    const r = await fetch("/v2/monitoring", {headers: key ? {Authorization: "Bearer " + key} : {}});
    if (!r.ok) throw new Error((await r.json()).error || r.status);
    render(await r.json());
  } catch (e) { document.getElementById("status").textContent = "error: " + e.message; }
  setTimeout(poll, 2000);
}
poll();
</script></body></html>
"""
