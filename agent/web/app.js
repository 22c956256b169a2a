// The status page: one WebSocket to /api/v1/ws, every table kept from its events; reconnects by itself.
"use strict";

const state = { equipment: new Map(), alerts: new Map(), quality: new Map(), health: null };
const CHANNELS = ["equipment", "quality", "alerts", "system"];
let socket = null;
let retryMs = 500;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function age(ts) {
  const s = (Date.now() - Date.parse(ts)) / 1000;
  if (!isFinite(s)) return "";
  if (s < 60) return Math.max(0, Math.round(s)) + " s";
  if (s < 3600) return Math.round(s / 60) + " min";
  return Math.round(s / 3600) + " h";
}

function badge(text, cls) {
  const span = el("span", text, cls);
  const td = el("td");
  td.appendChild(span);
  return td;
}

function fill(id, rows) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...rows);
}

function renderEquipment() {
  const rows = [];
  for (const [eid, eq] of [...state.equipment.entries()].sort()) {
    const tr = el("tr");
    tr.dataset.eid = eid;
    tr.appendChild(el("td", eid));
    const status = badge(eq.status || "unknown", "status-" + (eq.status || "unknown"));
    status.className = "status";
    tr.appendChild(status);
    tr.appendChild(el("td", eq.current_operation || ""));
    tr.appendChild(el("td", eq.progress === null || eq.progress === undefined ? "" : Math.round(eq.progress * 100) + " %"));
    tr.appendChild(el("td", eq.process_id || ""));
    const values = el("td", null, "values");
    for (const [tag, v] of Object.entries(eq.values || {}).sort()) {
      const line = el("div", `${tag} = ${JSON.stringify(v.value)}${v.unit ? " " + v.unit : ""} · ${v.quality} · ${age(v.ts)}`);
      line.className = "q-" + v.quality;
      line.dataset.tag = tag;
      values.appendChild(line);
    }
    tr.appendChild(values);
    rows.push(tr);
  }
  fill("equipment", rows);
}

function renderAlerts() {
  const rows = [];
  for (const a of [...state.alerts.values()].sort((x, y) => String(x.since).localeCompare(String(y.since)))) {
    const tr = el("tr");
    tr.dataset.alertId = a.alert_id;
    tr.dataset.eid = a.equipment_id;
    tr.appendChild(el("td", a.equipment_id));
    tr.appendChild(el("td", a.tag));
    const sev = badge(a.severity, "sev-" + a.severity);
    sev.className = "severity";
    tr.appendChild(sev);
    tr.appendChild(el("td", JSON.stringify(a.value)));
    tr.appendChild(el("td", a.message || ""));
    tr.appendChild(el("td", a.since ? age(a.since) + " ago" : ""));
    rows.push(tr);
  }
  fill("alerts", rows);
  document.getElementById("no-alerts").hidden = rows.length > 0;
}

function renderQuality() {
  const rows = [...state.quality.values()].reverse().map((q) => {
    const tr = el("tr");
    tr.appendChild(el("td", q.process_id));
    tr.appendChild(el("td", q.equipment_id));
    tr.appendChild(el("td", q.overall_score));
    tr.appendChild(el("td", q.mpm_delivery));
    tr.appendChild(el("td", q.timestamp || ""));
    return tr;
  });
  fill("quality", rows);
}

function linkRow(name, status, link) {
  const tr = el("tr");
  tr.dataset.link = name;
  tr.appendChild(el("td", name));
  tr.appendChild(badge(status, status === "up" ? "badge" : "badge down"));
  link = link || {};
  const d = link.duration_s || {};
  tr.appendChild(el("td", link.uptime_ratio === undefined ? "" : (link.uptime_ratio * 100).toFixed(1) + " %"));
  tr.appendChild(el("td", d.mean === null || d.mean === undefined ? "" : (d.mean * 1000).toFixed(1) + " ms"));
  tr.appendChild(el("td", link.errors_per_min === undefined ? "" : Number(link.errors_per_min).toFixed(2)));
  tr.appendChild(el("td", link.last_error ? `${link.last_error} (${age(link.last_error_at)} ago)` : ""));
  return tr;
}

function renderHealth() {
  const report = state.health;
  if (!report) return;
  const h = document.getElementById("health");
  h.textContent = report.status;
  h.className = "badge" + (report.status === "ok" ? "" : report.healthy ? " degraded" : " down");
  const c = report.components || {};
  const rows = [];
  if (c.mqtt) rows.push(linkRow("broker", c.mqtt.status, c.mqtt.link));
  if (c.outbox) rows.push(linkRow("MPM", c.outbox.status, c.outbox.link));
  if (c.sparkplug) rows.push(linkRow("Sparkplug", c.sparkplug.status, null));
  if (c.store) rows.push(linkRow("store", c.store.status, null));
  for (const [eid, d] of Object.entries(c.drivers || {}).sort()) rows.push(linkRow(eid, d.status, d.link));
  fill("links", rows);
}

function onEvent(msg) {
  const data = msg.data;
  switch (msg.event) {
    case "welcome":
      document.getElementById("login").hidden = true;
      socket.send(JSON.stringify({ type: "subscribe", channels: CHANNELS }));
      return;
    case "equipmentStatus": {
      const old = state.equipment.get(data.equipment_id) || { values: {} };
      state.equipment.set(data.equipment_id, { ...old, ...data, values: data.values || old.values });
      renderEquipment();
      return;
    }
    case "telemetry": {
      const eq = state.equipment.get(data.equipment_id) || { equipment_id: data.equipment_id, values: {} };
      for (const v of data.values) eq.values[v.tag] = v;
      state.equipment.set(data.equipment_id, eq);
      renderEquipment();
      return;
    }
    case "qualityAlert":
      if (data.state === "active") state.alerts.set(data.alert_id, { since: data.timestamp, ...data });
      else state.alerts.delete(data.alert_id);
      renderAlerts();
      return;
    case "qualityResult":
      state.quality.set(data.idempotency_key || data.process_id, data);
      while (state.quality.size > 50) state.quality.delete(state.quality.keys().next().value);
      renderQuality();
      return;
    case "systemHealth":
      state.health = data;
      renderHealth();
      return;
  }
}

function setConn(text, up) {
  const c = document.getElementById("conn");
  c.textContent = text;
  c.className = up ? "badge" : "badge down";
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  socket = new WebSocket(`${scheme}//${location.host}/api/v1/ws`);
  socket.onopen = () => {
    retryMs = 500;
    setConn("live", true);
    // With keys configured the first message authenticates; without, the server has already let us in.
    const key = sessionStorage.getItem("edge-agent-key");
    socket.send(JSON.stringify({ type: "auth", key: key || "-" }));
    state.alerts.clear(); // the subscription sends what is active now
  };
  socket.onmessage = (ev) => onEvent(JSON.parse(ev.data));
  socket.onclose = (ev) => {
    setConn("reconnecting", false);
    if (ev.code === 4401) {
      document.getElementById("login").hidden = false;
      document.getElementById("login-error").textContent = ev.reason;
      setConn("key needed", false);
      return;
    }
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 5000);
  };
}

document.getElementById("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("edge-agent-key", document.getElementById("key").value);
  connect();
});
setInterval(renderEquipment, 5000); // ages move on between events
connect();
