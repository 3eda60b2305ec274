// iot-dashboard's page. The server sends JSON arrays of events over one WebSocket, a snapshot
// of everything first; this file keeps a copy and draws it. Every text that came over MQTT is
// put in with textContent, never as HTML. When the socket closes the page says so and tries
// again with a growing delay, asking /ping first: a 401 there means log in again.
"use strict";
(() => {
  const HISTORY = 120, TRAFFIC = 200, ALARMS = 50, SENT = 30;
  const $ = (sel, root = document) => root.querySelector(sel);

  function el(tag, props = {}, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("data-")) e.setAttribute(k, v);
      else e[k] = v;
    }
    e.append(...kids);
    return e;
  }
  const clock = (ts) => new Date(ts * 1000).toLocaleTimeString([], { hour12: false });
  const num = (v) => (v === null || v === undefined ? "–" : Math.abs(v) >= 1000 ? v.toFixed(0) : v.toFixed(2));
  function size(n) {
    if (n === null || n === undefined) return "–";
    for (const u of ["B", "kB", "MB", "GB"]) {
      if (n < 1000 || u === "GB") return u === "B" ? `${n} B` : `${n.toFixed(1)} ${u}`;
      n /= 1000;
    }
  }

  // --- state ---------------------------------------------------------------------------------
  let devices = {}; // name -> {status, state, sensors: {name: {u, v, t: [], vals: []}}}
  let traffic = [];
  let dropped = 0; // messages the server left out, being too far behind the broker
  let sys = {};
  let node = null;
  let broker = false;
  const cards = {}; // name -> DOM parts of the device's card
  const dirtyCharts = new Set();
  let frameAsked = false;

  // --- connection ------------------------------------------------------------------------------
  let ws = null;
  let attempt = 0;

  function setConn() {
    const c = $("#conn");
    let state, text;
    if (!ws || ws.readyState !== WebSocket.OPEN) [state, text] = attempt ? ["reconnecting", "reconnecting…"] : ["connecting", "connecting…"];
    else if (!broker) [state, text] = ["broker-down", "broker disconnected"];
    else [state, text] = ["live", "live"];
    c.dataset.state = state;
    c.textContent = text;
    document.body.classList.toggle("stale", state === "reconnecting" || state === "connecting");
  }

  function connect() {
    const sock = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
    ws = sock;
    sock.onmessage = (e) => {
      for (const ev of JSON.parse(e.data)) handle(ev);
      askFrame();
    };
    sock.onclose = () => {
      if (ws !== sock) return;
      ws = null;
      attempt++;
      setConn();
      retry();
    };
  }

  function retry() {
    const delay = Math.min(5000, 250 * 2 ** Math.min(attempt, 5)) * (0.5 + Math.random() / 2);
    setTimeout(async () => {
      try {
        const r = await fetch("/ping", { cache: "no-store" });
        if (r.status === 401) {
          location.href = "/login";
          return;
        }
      } catch (e) {
        attempt++;
        retry(); // the server is not there (yet)
        return;
      }
      connect();
    }, delay);
  }

  // --- events ----------------------------------------------------------------------------------
  function handle(ev) {
    switch (ev.t) {
      case "snapshot": return snapshot(ev);
      case "value": return value(ev);
      case "status": devices[ev.d] = devices[ev.d] || newDevice(); devices[ev.d].status = ev.status; return drawDevice(ev.d);
      case "state": devices[ev.d] = devices[ev.d] || newDevice(); devices[ev.d].state = ev.state; return drawDevice(ev.d);
      case "alarm": return addAlarm(ev);
      case "traffic": return addTraffic(ev);
      case "sys": sys[ev.k] = ev.v; nodeDirty = true; return;
      case "node": node = ev; nodeDirty = true; return;
      case "broker": broker = ev.connected; return setConn();
      case "ack": return acked(ev);
      case "dropped": dropped = ev.n; return countTraffic();
    }
  }

  const newDevice = () => ({ status: null, state: null, sensors: {} });

  function snapshot(ev) {
    attempt = 0;
    broker = ev.broker;
    devices = {};
    for (const [name, d] of Object.entries(ev.devices)) {
      const sensors = {};
      for (const [s, x] of Object.entries(d.sensors)) sensors[s] = { u: x.u, v: x.v, t: x.pts[0], vals: x.pts[1] };
      devices[name] = { status: d.status, state: d.state, sensors };
    }
    for (const [name, c] of Object.entries(cards)) {
      for (const part of Object.values(c.sensors)) {
        charts.unobserve(part.chart);
        if (part.plot) part.plot.destroy();
      }
      c.root.remove();
      delete cards[name];
    }
    dirtyCharts.clear();
    for (const name of Object.keys(devices)) drawDevice(name);
    $("#alarm-list").replaceChildren();
    for (const a of ev.alarms) addAlarm(a);
    traffic = [];
    $("#traffic tbody").replaceChildren();
    for (const m of ev.traffic) addTraffic(m);
    sys = ev.sys;
    node = ev.node;
    dropped = ev.dropped;
    nodeDirty = true;
    $("#logout").hidden = !ev.auth;
    fillDeviceSelect();
    setConn();
  }

  function value(ev) {
    devices[ev.d] = devices[ev.d] || newDevice();
    const sensors = devices[ev.d].sensors;
    const s = sensors[ev.s] || (sensors[ev.s] = { u: ev.u, v: null, t: [], vals: [] });
    s.u = ev.u;
    s.v = ev.v;
    s.t.push(ev.ts);
    s.vals.push(ev.v);
    if (s.t.length > HISTORY) {
      s.t.shift();
      s.vals.shift();
    }
    const c = cards[ev.d];
    if (!c || !c.sensors[ev.s]) return drawDevice(ev.d);
    c.sensors[ev.s].value.replaceChildren(num(ev.v), " ", el("small", { text: s.u }));
    dirtyCharts.add(c.sensors[ev.s]);
  }

  // --- devices -------------------------------------------------------------------------------
  const partOf = new WeakMap(); // chart element -> its sensor's parts
  const charts = new ResizeObserver((entries) => {
    for (const e of entries) {
      const part = partOf.get(e.target);
      const w = Math.floor(e.contentRect.width);
      if (w <= 0) continue; // hidden view: drawn once it shows
      if (!part.plot) makePlot(part, w);
      else part.plot.setSize({ width: w, height: 64 });
    }
  });

  function makePlot(part, width) {
    part.plot = new uPlot({
      width, height: 64,
      legend: { show: false }, cursor: { show: false }, select: { show: false },
      scales: { x: { time: true } },
      axes: [{ show: false }, { size: 44, font: "10px system-ui", stroke: "#6b7280", ticks: { show: false },
        grid: { stroke: "#eef0f3" } }],
      series: [{}, { stroke: "#2563eb", width: 1.5, points: { show: false } },
        { stroke: "#9aa1ab", width: 1, dash: [4, 4], points: { show: false } }],
    }, chartData(part), part.chart);
  }

  function chartData(part) {
    const d = devices[part.device];
    const s = d.sensors[part.sensor];
    const sp = d.state && d.state.setpoints ? d.state.setpoints[part.sensor] : undefined;
    return [s.t, s.vals, s.t.map(() => (sp === undefined ? null : sp))];
  }

  function drawDevice(name) {
    const d = devices[name];
    let c = cards[name];
    if (!c) {
      const root = el("article", { class: "device", "data-device": name });
      const status = el("span", { class: "badge status" });
      const state = el("span", { class: "badge state" });
      const alarms = el("div", { class: "alarms-up" });
      const box = el("div", { class: "sensors" });
      const actions = el("footer", { class: "actions" });
      for (const cmd of ["start", "stop", "reset"]) {
        actions.append(el("button", { type: "button", class: cmd === "stop" ? "danger" : "", "data-cmd": cmd,
          text: cmd[0].toUpperCase() + cmd.slice(1), onclick: () => send({ device: name, command: cmd }) }));
      }
      root.append(el("header", {}, el("h3", { text: name }), status, state), alarms, box, actions);
      $("#devices").append(root);
      c = cards[name] = { root, status, state, alarms, box, sensors: {} };
      fillDeviceSelect();
    }
    for (const [sname, s] of Object.entries(d.sensors)) {
      if (c.sensors[sname]) continue;
      const value = el("span", { class: "value" }, num(s.v), " ", el("small", { text: s.u }));
      const chart = el("div", { class: "chart" });
      const part = { device: name, sensor: sname, value, chart, plot: null };
      partOf.set(chart, part);
      c.box.append(el("div", { class: "sensor", "data-sensor": sname }, el("span", { class: "label", text: sname }), value, chart));
      c.sensors[sname] = part;
      charts.observe(chart);
    }
    const status = d.status || "unknown";
    c.status.textContent = status;
    c.status.className = `badge status ${status}`;
    const state = d.state ? d.state.state : "unknown";
    c.state.textContent = state;
    c.state.className = `badge state ${state}`;
    c.root.classList.toggle("offline", status !== "online");
    const up = d.state && d.state.alarms.length ? `alarm: ${d.state.alarms.join(", ")}` : "";
    c.alarms.textContent = up;
    for (const part of Object.values(c.sensors)) dirtyCharts.add(part); // the setpoint line may have moved
    if ($("#cmd-device").value === name) fillSensorSelect();
  }

  // --- commands ------------------------------------------------------------------------------
  let nextId = 1;
  const sent = {};

  function fillDeviceSelect() {
    const sel = $("#cmd-device");
    const keep = sel.value;
    sel.replaceChildren(...Object.keys(devices).map((n) => el("option", { value: n, text: n })));
    if (keep in devices) sel.value = keep;
    fillSensorSelect();
  }

  function fillSensorSelect() {
    const sel = $("#cmd-sensor");
    const keep = sel.value;
    const d = devices[$("#cmd-device").value];
    const names = d ? Object.keys(d.sensors) : [];
    sel.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
    if (names.includes(keep)) sel.value = keep;
  }

  function send(cmd) {
    const reason = $("#cmd-reason").value.trim();
    const msg = { t: "command", id: nextId++, ...cmd, ...(reason ? { reason } : {}) };
    const what = `${cmd.device} ${cmd.command}` + (cmd.command === "setpoint" ? ` ${cmd.sensor}=${cmd.value}` : "");
    const result = el("span", { text: "sending…" });
    const li = el("li", { class: "pending" }, el("time", { text: clock(Date.now() / 1000) }), `${what}: `, result);
    const list = $("#sent");
    list.prepend(li);
    while (list.children.length > SENT) list.lastChild.remove();
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      li.className = "failed";
      result.textContent = "not sent: no connection to the dashboard";
      return;
    }
    sent[msg.id] = { li, result };
    ws.send(JSON.stringify(msg));
  }

  function acked(ev) {
    const s = sent[ev.id];
    if (!s) return;
    delete sent[ev.id];
    s.li.className = ev.ok ? "done" : "failed";
    s.result.textContent = ev.ok ? "sent (the broker has it)" : ev.error;
  }

  // --- alarms and traffic ---------------------------------------------------------------------
  function addAlarm(a) {
    const list = $("#alarm-list");
    const unit = a.u ? ` ${a.u}` : "";
    const text = `${a.d}/${a.s} ${a.alarm} (${a.level}): ${num(a.v)}${unit}, threshold ${num(a.threshold)}${unit}`;
    list.prepend(el("li", { class: a.alarm }, el("time", { text: clock(a.ts) }), text));
    while (list.children.length > ALARMS) list.lastChild.remove();
  }

  function matches(filter, topic) {
    const f = (filter.trim() || "#").split("/");
    const t = topic.split("/");
    for (let i = 0; i < f.length; i++) {
      if (f[i] === "#") return true;
      if (i >= t.length || (f[i] !== "+" && f[i] !== t[i])) return false;
    }
    return f.length === t.length;
  }

  function trafficRow(m) {
    return el("tr", {}, el("td", { text: clock(m.ts) }), el("td", { text: m.topic }), el("td", { text: String(m.q) }),
      el("td", { text: m.r ? "yes" : "" }), el("td", { text: String(m.n) }), el("td", { text: m.s }));
  }

  function addTraffic(m) {
    traffic.push(m);
    if (traffic.length > TRAFFIC) traffic.shift();
    if ($("#pause").checked || !matches($("#filter").value, m.topic)) return countTraffic();
    const body = $("#traffic tbody");
    body.prepend(trafficRow(m));
    while (body.children.length > TRAFFIC) body.lastChild.remove();
    countTraffic();
  }

  function redrawTraffic() {
    const f = $("#filter").value;
    $("#traffic tbody").replaceChildren(...traffic.filter((m) => matches(f, m.topic)).reverse().map(trafficRow));
    countTraffic();
  }

  function countTraffic() {
    $("#traffic-count").textContent = `${$("#traffic tbody").children.length} of the last ${traffic.length} messages`
      + (dropped ? `; ${dropped} left out (the dashboard fell behind)` : "");
  }

  // --- node ------------------------------------------------------------------------------------
  let nodeDirty = false;
  const SYS = [
    ["version", "version"], ["uptime", "uptime"], ["clients connected", "clients/connected"],
    ["messages received", "messages/received"], ["messages sent", "messages/sent"],
    ["publish dropped", "publish/messages/dropped"], ["retained messages", "retained messages/count"],
    ["subscriptions", "subscriptions/count"], ["stored messages", "store/messages/count"],
    ["bytes received", "bytes/received"], ["bytes sent", "bytes/sent"],
    ["logins refused", "access/logins/refused"], ["publish denied", "access/publish/denied"],
  ];

  const kv = (rows) => el("dl", { class: "kv" }, ...rows.flatMap(([k, v, cls]) => [el("dt", { text: k }), el("dd", { text: v, class: cls || "" })]));
  const table = (head, rows) => el("table", { class: "table" }, el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { text: h })))),
    el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((c) => (c instanceof Node ? el("td", {}, c) : el("td", { text: String(c) })))))));
  const box = (id, ...kids) => $(`#${id} .body`).replaceChildren(...kids);
  const failed = (part) => part && part.error ? el("p", { class: "bad", text: part.error }) : null;

  function drawNode() {
    nodeDirty = false;
    drawBroker();
    if (!node) return;
    const d = node.daemons;
    if (failed(d)) box("daemons", failed(d));
    else {
      const up = d.rows.filter((r) => r.ok).length;
      box("daemons", el("p", { class: up === d.rows.length ? "ok" : "bad", text: `${up} of ${d.rows.length} running` }),
        table(["daemon", "state", ""], d.rows.map((r) => [r.name, el("span", { class: r.ok ? "ok" : "bad", text: r.state }), r.detail])));
    }
    drawTransfers(node.transfers);
    drawIngest(node.ingest);
  }

  function drawBroker() {
    const body = $("#broker .body");
    const keys = Object.keys(sys).sort();
    if (!keys.length) return;
    let parts = body.parts;
    if (!parts) {
      const summary = el("div");
      const all = el("tbody");
      const details = el("details", {}, el("summary", { text: "all $SYS values" }), el("table", { class: "table" }, all));
      body.replaceChildren(summary, details);
      parts = body.parts = { summary, all, details };
    }
    parts.summary.replaceChildren(kv(SYS.filter(([, k]) => `$SYS/broker/${k}` in sys).map(([label, k]) => [label, sys[`$SYS/broker/${k}`]])));
    // [[broker.bridge]]: $SYS/broker/bridge/<name>/<figure>, one row per bridge
    const bridges = {};
    for (const k of keys) {
      const m = /^\$SYS\/broker\/bridge\/([^/]+)\/([a-z]+)$/.exec(k);
      if (m) (bridges[m[1]] ||= {})[m[2]] = sys[k];
    }
    const names = Object.keys(bridges);
    if (names.length) {
      parts.summary.append(el("h3", { text: `Bridges (${names.length})` }), el("div", { class: "bridges" }, table(["bridge", "state", "queued", "sent", "received", "dropped"],
        names.map((n) => { const b = bridges[n]; const up = b.connected === "1";
          return [n, el("span", { class: up ? "ok" : "bad", text: up ? "connected" : "not connected" }), b.queued ?? "", b.sent ?? "", b.received ?? "", b.dropped ?? ""]; }))));
    }
    parts.details.firstChild.textContent = `all $SYS values (${keys.length})`;
    parts.all.replaceChildren(...keys.map((k) => el("tr", {}, el("td", { class: "mono", text: k }), el("td", { text: sys[k] }))));
  }

  function bar(done, total) {
    const pct = total ? Math.min(100, (100 * done) / total) : 100;
    const b = el("div", { class: "bar", title: `${pct.toFixed(0)}%` }, el("span"));
    b.firstChild.style.width = `${pct}%`;
    return b;
  }

  function drawTransfers(t) {
    if (failed(t)) return box("transfers", failed(t));
    const rows = [];
    for (const s of t.sending) rows.push(["sending", s.name, size(s.size), s.confirmed === null || s.confirmed === undefined ? "?" : bar(s.confirmed, s.size)]);
    for (const name of t.waiting) rows.push(["waiting", name, "", ""]);
    for (const r of t.receiving) rows.push(["receiving", r.name, size(r.size), bar(r.received, r.size)]);
    const done = t.done.slice().reverse().map((x) => [x.dir, x.name, size(x.size), (x.t ? clock(x.t) : "") + (x.reason ? ` ${x.reason}` : "")]);
    box("transfers",
      el("h3", { text: `In flight (${rows.length})` }), rows.length ? table(["", "file", "size", "progress"], rows) : el("p", { class: "muted", text: "none" }),
      el("h3", { text: "Done (last 10)" }), done.length ? table(["", "file", "size", "when"], done) : el("p", { class: "muted", text: "none yet" }));
  }

  function drawIngest(i) {
    if (failed(i)) return box("ingest", failed(i));
    const rows = [];
    rows.push(["worker", i.running ? (i.connected ? "running, connected" : "running, broker not connected") : "not running (no fresh status file)", i.running && i.connected ? "ok" : "bad"]);
    if (i.running) {
      rows.push(["rate", i.rate === null || i.rate === undefined ? "measuring…" : `${i.rate.toFixed(1)} msg/s`]);
      rows.push(["stored (this run)", String(i.landed)], ["to the DLQ (this run)", String(i.rejected)], ["waiting", String(i.queue)]);
      if (i.outage) rows.push(["outage", i.outage, "bad"]);
    }
    rows.push(["DLQ", `${i.dlq_entries} entries, ${size(i.dlq_bytes)}`, i.dlq_entries ? "bad" : ""]);
    box("ingest", kv(rows));
  }

  // --- drawing, views, start ------------------------------------------------------------------
  function askFrame() {
    if (frameAsked) return;
    frameAsked = true;
    requestAnimationFrame(() => {
      frameAsked = false;
      for (const part of dirtyCharts) if (part.plot) part.plot.setData(chartData(part));
      dirtyCharts.clear();
      if (nodeDirty && !$("#view-node").hidden) drawNode();
    });
  }

  function show() {
    const name = ["factory", "traffic", "node"].includes(location.hash.slice(1)) ? location.hash.slice(1) : "factory";
    for (const v of ["factory", "traffic", "node"]) $(`#view-${v}`).hidden = v !== name;
    for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === name);
    if (name === "node") drawNode();
  }

  $("#cmd-device").addEventListener("change", fillSensorSelect);
  for (const b of document.querySelectorAll("#command-form .buttons button")) {
    b.addEventListener("click", () => $("#cmd-device").value && send({ device: $("#cmd-device").value, command: b.dataset.cmd }));
  }
  $("#command-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = parseFloat($("#cmd-value").value);
    send({ device: $("#cmd-device").value, command: "setpoint", sensor: $("#cmd-sensor").value, value });
  });
  $("#filter").addEventListener("input", redrawTraffic);
  $("#pause").addEventListener("change", () => $("#pause").checked || redrawTraffic());
  window.addEventListener("hashchange", show);
  show();
  setConn();
  connect();
})();
