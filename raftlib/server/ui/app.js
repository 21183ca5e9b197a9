// raftdzmq dashboard. Vanilla JS, no build step. Everything comes from the node that served this page:
//   GET /cluster/status?events_since=ID:SEQ,...  once a second (members, counters, histograms, new events)
//   GET /db/?prefix=P, GET /db/KEY, GET /watch?key=K  for the key browser
//   POST /ui/actions/transfer?to=ID, DELETE /ui/actions/members/ID  for the actions (the node passes them to
//   the leader); with a cluster secret they are refused, and the page says so.
// Rates and latency quantiles are computed here from the difference between two answers of each member.
"use strict";

(function () {
  const POLL_MS = 1000;
  const POINTS = 120; // two minutes of history in each chart
  const TIMELINE_MAX = 300;

  const state = {
    eventsSince: {}, // node id -> the newest event seq seen
    previous: {}, // node id -> the last /stats numbers of that member (for differences)
    members: [],
    leader: null,
    guarded: false,
    polls: 0,
    errors: 0,
  };
  // Chart data: x (unix seconds) and one array per series, POINTS long at most.
  const series = {
    x: [], writes: [], reads: [], commitP50: [], commitP99: [], fsyncP50: [], fsyncP99: [], hubP50: [], hubP99: [],
  };
  const charts = {};

  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) node.append(c);
    return node;
  };
  const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

  // ---- numbers -------------------------------------------------------------------------------------------

  function counterSum(values) {
    let sum = 0;
    for (const v of Object.values(values || {})) sum += v;
    return sum;
  }

  // Differences of one member's counters between two answers; a member that restarted counts from zero.
  function delta(now, before) {
    const d = now - (before || 0);
    return d >= 0 ? d : now;
  }

  // The q-quantile of a histogram given as bucket bounds and counts (the last count is above every bound), by
  // linear interpolation inside the bucket, as Prometheus' histogram_quantile. null without observations.
  function quantile(q, bounds, counts) {
    const total = counts.reduce((a, b) => a + b, 0);
    if (!total) return null;
    const rank = q * total;
    let seen = 0;
    for (let i = 0; i < counts.length; i++) {
      if (seen + counts[i] >= rank && counts[i] > 0) {
        if (i >= bounds.length) return bounds[bounds.length - 1];
        const lower = i === 0 ? 0 : bounds[i - 1];
        return lower + (bounds[i] - lower) * ((rank - seen) / counts[i]);
      }
      seen += counts[i];
    }
    return bounds[bounds.length - 1];
  }

  // The cluster's rates and latencies over the last interval, from every member that answered twice.
  function sample(members) {
    let writes = 0, reads = 0, seconds = 0;
    const hist = {};
    for (const m of members) {
      if (!m.up) continue;
      const before = state.previous[m.id];
      state.previous[m.id] = m;
      if (!before || !m.time || m.time <= before.time) continue;
      seconds = Math.max(seconds, m.time - before.time);
      writes += delta((m.writes || {}).committed || 0, (before.writes || {}).committed);
      reads += delta(counterSum(m.reads), counterSum(before.reads));
      for (const [name, h] of Object.entries(m.histograms || {})) {
        const b = (before.histograms || {})[name];
        if (!hist[name]) hist[name] = { bounds: h.bounds, counts: h.counts.map(() => 0) };
        h.counts.forEach((c, i) => { hist[name].counts[i] += delta(c, b && b.counts[i]); });
      }
    }
    if (!seconds) return null;
    const ms = (name, q) => {
      const h = hist[name];
      const v = h ? quantile(q, h.bounds, h.counts) : null;
      return v === null ? null : v * 1000;
    };
    return {
      writes: writes / seconds, reads: reads / seconds,
      commitP50: ms("write_seconds", 0.5), commitP99: ms("write_seconds", 0.99),
      fsyncP50: ms("fsync_seconds", 0.5), fsyncP99: ms("fsync_seconds", 0.99),
      hubP50: ms("hub_lag_seconds", 0.5), hubP99: ms("hub_lag_seconds", 0.99),
    };
  }

  // ---- charts ----------------------------------------------------------------------------------------------

  const CHARTS = [
    { id: "chart-rates", lines: [["writes", "writes/s", "--s1"], ["reads", "reads/s", "--s2"]], unit: "/s" },
    { id: "chart-commit", lines: [["commitP50", "p50", "--s1"], ["commitP99", "p99", "--s2"]], unit: "ms" },
    { id: "chart-fsync", lines: [["fsyncP50", "p50", "--s1"], ["fsyncP99", "p99", "--s2"]], unit: "ms" },
    { id: "chart-hub", lines: [["hubP50", "p50", "--s1"], ["hubP99", "p99", "--s2"]], unit: "ms" },
  ];

  function chartWidth(container) {
    return Math.max(240, Math.floor(container.getBoundingClientRect().width || 320));
  }

  function makeCharts() {
    const axis = { stroke: css("--muted"), grid: { stroke: css("--grid") }, ticks: { stroke: css("--grid") } };
    for (const spec of CHARTS) {
      const container = $(spec.id);
      if (charts[spec.id]) charts[spec.id].destroy();
      container.textContent = "";
      const opts = {
        width: chartWidth(container), height: 170,
        cursor: { drag: { x: false, y: false } },
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max || 0, spec.unit === "ms" ? 1 : 5) * 1.1] } },
        axes: [axis, { ...axis, size: 56, values: (u, vals) => vals.map((v) => +v.toFixed(2)) }],
        series: [{}, ...spec.lines.map(([key, label, color]) => ({
          label, stroke: css(color), width: 2, spanGaps: true,
          value: (u, v) => (v === null || v === undefined ? "—" : `${v.toFixed(spec.unit === "ms" ? 2 : 0)} ${spec.unit}`),
        }))],
      };
      charts[spec.id] = new uPlot(opts, chartData(spec), container);
    }
  }

  function chartData(spec) {
    return [series.x, ...spec.lines.map(([key]) => series[key])];
  }

  function updateCharts(point) {
    series.x.push(Date.now() / 1000);
    for (const key of Object.keys(series)) {
      if (key !== "x") series[key].push(point ? point[key] : null);
      if (series[key].length > POINTS) series[key].shift();
    }
    for (const spec of CHARTS) charts[spec.id].setData(chartData(spec));
  }

  function resizeCharts() {
    for (const spec of CHARTS) {
      const chart = charts[spec.id];
      if (chart) chart.setSize({ width: chartWidth($(spec.id)), height: 170 });
    }
  }

  // ---- members ---------------------------------------------------------------------------------------------

  function renderMembers(status) {
    const tbody = $("members").tBodies[0];
    const rows = [];
    const maxLag = Math.max(10, ...status.members.map((m) => m.lag || 0));
    for (const m of status.members) {
      const isLeader = m.up && m.role === "leader" && m.id === status.leader;
      const name = el("td", {}, isLeader ? "★ " : "", m.id, m.id === status.node_id ? " (this node)" : "");
      const why = m.error || (m.malformed && m.malformed.length ? `malformed fields: ${m.malformed.join(", ")}` : "");
      const stateCell = el("td", {},
        el("span", { class: `badge ${m.up ? "up" : "unreachable"}`, title: why }, m.up ? "up" : "unreachable"));
      if (m.disk_full) stateCell.append(" ", el("span", { class: "badge disk-full" }, "disk full"));
      const lag = m.lag === null || m.lag === undefined ? el("td", {}, "—")
        : el("td", {}, el("span", { class: "lag" },
          el("meter", { min: "0", max: String(maxLag), low: String(maxLag * 0.3), high: String(maxLag * 0.7),
            optimum: "0", value: String(m.lag), "aria-label": `${m.id} lags ${m.lag} entries` }), String(m.lag)));
      const num = (v) => el("td", {}, v === null || v === undefined ? "—" : String(v));
      rows.push(el("tr", {
        class: [isLeader ? "leader" : "", m.up ? "" : "down"].join(" ").trim(),
        "data-id": m.id, "data-role": m.up ? m.role : "unreachable", "data-up": String(m.up),
      }, name, el("td", {}, m.up ? m.role : "—"), stateCell, lag, num(m.term), num(m.commit_index),
      num(m.applied_index), num(m.match_index), el("td", {}, m.voter ? "voter" : "learner"),
      el("td", { class: "addr" }, m.http_address, el("br"), m.raft_address)));
    }
    tbody.replaceChildren(...rows);
    const leader = status.members.find((m) => m.id === status.leader);
    $("leader-name").textContent = leader ? leader.id : "none";
    $("term").textContent = status.term === null || status.term === undefined ? "—" : String(status.term);
    let total = 0;
    for (const m of status.members) if (m.up) total += (m.writes || {}).committed || 0;
    $("writes-total").textContent = String(total);
    renderActionChoices(status);
  }

  function renderActionChoices(status) {
    const fill = (select, members) => {
      const choices = members.map((m) => `${m.id} ${m.http_address}`).join(",");
      if (select.dataset.choices === choices) return; // unchanged: leave it alone (it may be open, or focused)
      select.dataset.choices = choices;
      const chosen = select.value;
      select.replaceChildren(...members.map((m) => el("option", { value: m.id }, `${m.id} (${m.http_address})`)));
      if (members.some((m) => m.id === chosen)) select.value = chosen;
    };
    fill($("transfer-to"), status.members.filter((m) => m.voter && m.id !== status.leader));
    fill($("remove-id"), status.members);
    const guarded = status.admin_guarded;
    $("actions-guarded").hidden = !guarded;
    for (const id of ["transfer-to", "transfer-button", "remove-id", "remove-button"]) $(id).disabled = guarded;
    if (!guarded && !status.leader) $("transfer-button").disabled = true;
  }

  // ---- timeline --------------------------------------------------------------------------------------------

  function describe(e) {
    if (e.truncated) return `${e.kind} (too large to show)`;
    switch (e.kind) {
      case "election_started": return `started an election for term ${e.term}`;
      case "election_won": return `won the election: leader of term ${e.term}`;
      case "leader_changed": return `follows leader ${e.leader} (term ${e.term})`;
      case "stepped_down": return `stepped down (term ${e.term})`;
      case "membership_changed":
        return `configuration at index ${e.index}: voters ${(e.voters || []).join(", ")}` +
          ((e.learners || []).length ? `; learners ${e.learners.join(", ")}` : "");
      case "snapshot_taken": return `took a snapshot at index ${e.index} (${e.bytes} bytes)`;
      case "snapshot_sent": return `sends its snapshot at index ${e.index} to ${e.to}`;
      case "snapshot_installed": return `installed the leader's snapshot at index ${e.index}`;
      case "disk_full": return "disk full: refusing writes";
      case "disk_ok": return "the disk has room again";
      case "removed": return `was removed from the cluster${e.by ? ` by ${e.by}` : ""} (index ${e.index})`;
      default: return e.kind;
    }
  }

  function renderEvents(status) {
    for (const [id, seq] of Object.entries(status.events_last_seq || {})) {
      if (seq !== null && seq !== undefined) state.eventsSince[id] = seq;
    }
    const list = $("timeline");
    for (const e of status.events) {
      const when = new Date(e.time * 1000);
      const stamp = when.toLocaleTimeString([], { hour12: false }) + "." + String(when.getMilliseconds()).padStart(3, "0");
      list.prepend(el("li", { "data-kind": e.kind, "data-node": e.node },
        el("time", { datetime: when.toISOString() }, stamp), el("strong", {}, e.node), " ", describe(e)));
    }
    while (list.children.length > TIMELINE_MAX) list.lastElementChild.remove();
  }

  // ---- polling ---------------------------------------------------------------------------------------------

  async function poll() {
    const started = Date.now();
    const since = Object.entries(state.eventsSince).map(([id, seq]) => `${encodeURIComponent(id)}:${seq}`).join(",");
    try {
      const r = await fetch(`/cluster/status?events_since=${since}`, { cache: "no-store" });
      if (!r.ok) throw new Error(`${r.status} ${(await r.text()).trim()}`);
      const status = await r.json();
      state.members = status.members;
      state.leader = status.leader;
      state.guarded = status.admin_guarded;
      state.polls += 1;
      renderMembers(status);
      renderEvents(status);
      const point = sample(status.members);
      if (point) $("writes-rate").textContent = point.writes.toFixed(0);
      updateCharts(point);
      const conn = $("connection");
      conn.textContent = `updated ${new Date().toLocaleTimeString([], { hour12: false })} from ${status.node_id}`;
      conn.classList.remove("stale");
    } catch (err) {
      state.errors += 1;
      const conn = $("connection");
      conn.textContent = `no answer from this node: ${err.message}`;
      conn.classList.add("stale");
    } finally {
      setTimeout(poll, Math.max(100, POLL_MS - (Date.now() - started))); // one poll a second, start to start
    }
  }

  // ---- actions ---------------------------------------------------------------------------------------------

  function confirmAction(message) {
    const dialog = $("confirm");
    $("confirm-text").textContent = message;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.returnValue = "";
      dialog.showModal();
    });
  }

  async function act(method, url, what) {
    const out = $("action-result");
    out.textContent = `${what}…`;
    try {
      // redirect: manual: a 307 to another node would be a cross-origin request; say it instead.
      // The header tells the node the page itself asks (a page of another site cannot send it: CSRF).
      const r = await fetch(url, { method, redirect: "manual", headers: { "X-Raft-Dashboard": "1" } });
      const body = r.type === "opaqueredirect" ? "the node redirected: the leader changed, try again" : (await r.text()).trim();
      out.textContent = `${what}: ${r.ok ? "done" : "failed"}: ${body}`;
    } catch (err) {
      out.textContent = `${what}: failed: ${err.message}`;
    }
  }

  $("transfer-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const to = $("transfer-to").value;
    if (!to || !(await confirmAction(`Transfer leadership from ${state.leader || "the leader"} to ${to}?`))) return;
    await act("POST", `/ui/actions/transfer?to=${encodeURIComponent(to)}`, `transfer to ${to}`);
  });

  $("remove-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const id = $("remove-id").value;
    if (!id || !(await confirmAction(`Remove ${id} from the cluster? It stops serving; adding it back needs a new data dir and a join.`))) return;
    await act("DELETE", `/ui/actions/members/${encodeURIComponent(id)}`, `remove ${id}`);
  });

  // ---- keys ------------------------------------------------------------------------------------------------

  let watch = null;

  const keyPath = (key) => "/db/" + key.split("/").map(encodeURIComponent).join("/");

  $("keys-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const prefix = $("keys-prefix").value;
    const list = $("keys-list");
    try {
      const r = await fetch(`/db/?prefix=${encodeURIComponent(prefix)}&limit=200`, { cache: "no-store" });
      if (!r.ok) throw new Error(`${r.status} ${(await r.text()).trim()}`);
      const page = await r.json();
      list.replaceChildren(...page.keys.map((k) => el("li", {}, Object.assign(el("button", { type: "button" }, k),
        { onclick: () => showKey(k) }))));
      if (!page.keys.length) list.replaceChildren(el("li", { class: "hint" }, "no keys"));
      if (page.next !== null) list.append(el("li", { class: "hint" }, "… (first 200 shown)"));
    } catch (err) {
      list.replaceChildren(el("li", { class: "hint" }, `could not list: ${err.message}`));
    }
  });

  async function showKey(key) {
    const detail = $("key-detail");
    if (watch) watch.close();
    watch = null;
    try {
      const r = await fetch(keyPath(key), { cache: "no-store" });
      const value = await r.text();
      const dl = el("dl", {},
        el("dt", {}, "create index"), el("dd", {}, r.headers.get("X-Raft-Create-Index") || "—"),
        el("dt", {}, "modify index"), el("dd", {}, r.headers.get("X-Raft-Modify-Index") || "—"));
      const changes = el("ol", { class: "changes", id: "key-changes", "aria-label": "changes" });
      detail.replaceChildren(el("h3", { class: "addr" }, key), dl,
        r.ok ? el("pre", { id: "key-value" }, value) : el("p", {}, value.trim()),
        el("h4", {}, "Changes since opened"), changes);
      watch = new EventSource(`/watch?key=${encodeURIComponent(key)}`);
      const onChange = (ev) => {
        const e = JSON.parse(ev.data);
        const shown = e.value !== undefined ? e.value : e.value_base64 !== undefined ? `(base64) ${e.value_base64}` : "";
        changes.prepend(el("li", {}, `${e.type} at index ${e.index}${shown ? `: ${shown}` : ""}`));
        if (e.type === "put") {
          const pre = $("key-value");
          if (pre) pre.textContent = shown;
          dl.children[3].textContent = String(e.index);
          dl.children[1].textContent = String(e.create_index);
        }
      };
      for (const type of ["put", "delete", "expire"]) watch.addEventListener(type, onChange);
    } catch (err) {
      detail.replaceChildren(el("p", {}, `could not read ${key}: ${err.message}`));
    }
  }

  // ---- start -----------------------------------------------------------------------------------------------

  makeCharts();
  window.addEventListener("resize", resizeCharts);
  window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", makeCharts);
  window.dashboard = { state, series, charts, quantile }; // for tests and the curious (read only)
  poll();
})();
