// floodgate dashboard: bans, the allowlist, the audit log and live
// decisions, all read and changed through this node's admin API.
//
// Every value that comes from the API reaches the page through textContent
// or a canvas, never through HTML: a ban reason is text a client can
// influence. The token is kept in sessionStorage (this tab only) and sent
// only in the Authorization header, never in a URL.
"use strict";

(function () {
  const TOKEN_KEY = "floodgate.admin-token";
  const DECISIONS = ["allowed", "limited", "shadow_limited", "banned", "allowlisted", "unavailable"];
  const COLORS = {
    allowed: "#2e7d32",
    limited: "#ef6c00",
    shadow_limited: "#8e24aa",
    banned: "#c62828",
    allowlisted: "#1565c0",
    unavailable: "#6d4c41",
  };
  const HISTORY = 120; // samples kept for the chart, one a second
  const STATS_EVERY_MS = 1000;
  const LISTS_EVERY = 5; // refresh the lists every fifth stats tick

  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let timer = null;
  let ticks = 0;
  let previous = null; // {at, decisions} of the last stats answer
  let series = []; // [{at, rates: {decision: per second}}]

  const $ = (id) => document.getElementById(id);

  // An element with text content and optional class; children appended.
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function say(id, text, isError) {
    const p = $(id);
    p.textContent = text || "";
    p.classList.toggle("error", Boolean(isError));
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const init = { method, headers: { Authorization: "Bearer " + token }, cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let r;
    try {
      r = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, "the admin API did not answer (" + e.message + ")");
    }
    const text = await r.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (e) {
      data = null;
    }
    if (r.status === 401) {
      logout("The token was refused (401): enter the token this node was started with.");
      throw new ApiError(401, "unauthorized");
    }
    if (!r.ok) {
      const why = (data && (data.message || data.error)) || text || r.statusText;
      throw new ApiError(r.status, why + " (" + r.status + ")");
    }
    return data;
  }

  function seg(s) {
    return encodeURIComponent(s);
  }

  function duration(seconds) {
    let s = Math.max(0, Math.round(seconds));
    const parts = [];
    for (const [unit, n] of [["d", 86400], ["h", 3600], ["m", 60]]) {
      if (s >= n) {
        parts.push(Math.floor(s / n) + unit);
        s %= n;
      }
    }
    if (s || !parts.length) parts.push(s + "s");
    return parts.slice(0, 2).join(" ");
  }

  function utc(rfc3339) {
    return String(rfc3339 || "").replace("T", " ").replace("Z", "");
  }

  // ------------------------------------------------------------ login

  function showBoard(on) {
    $("login").hidden = on;
    $("board").hidden = !on;
    $("logout").hidden = !on;
    $("health").hidden = !on;
  }

  function logout(message) {
    token = "";
    sessionStorage.removeItem(TOKEN_KEY);
    if (timer) clearInterval(timer);
    timer = null;
    previous = null;
    series = [];
    showBoard(false);
    $("node").textContent = "";
    say("login-error", message || "", true);
    $("token").value = "";
    $("token").focus();
  }

  async function login(candidate) {
    token = candidate;
    try {
      await api("GET", "admin/stats");
    } catch (e) {
      if (e.status !== 401) logout("Cannot open the dashboard: " + e.message);
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    say("login-error", "");
    showBoard(true);
    ticks = 0;
    await tick();
    timer = setInterval(tick, STATS_EVERY_MS);
  }

  async function tick() {
    const lists = ticks % LISTS_EVERY === 0;
    ticks += 1;
    await refreshStats();
    if (lists) await Promise.all([refreshBans(), refreshAllow(), refreshAudit()]);
  }

  // ------------------------------------------------------------ stats and chart

  async function refreshStats() {
    let s;
    try {
      s = await api("GET", "admin/stats");
    } catch (e) {
      if (e.status !== 401) say("stats-error", "Stats unavailable: " + e.message, true);
      return;
    }
    say("stats-error", "");
    $("node").textContent = (s.node || "") + (s.version ? "  ·  floodgate " + s.version : "");
    const health = $("health");
    health.classList.remove("ok", "bad", "local");
    if (s.degraded) {
      health.textContent = "DEGRADED: Redis unavailable, on_failure applies";
      health.classList.add("bad");
    } else if (s.store === "local") {
      health.textContent = "in-process store (no Redis)";
      health.classList.add("local");
    } else {
      health.textContent = "Redis OK";
      health.classList.add("ok");
    }
    const now = performance.now();
    const counts = s.decisions || {};
    if (previous) {
      const dt = (now - previous.at) / 1000;
      const rates = {};
      for (const d of DECISIONS) {
        const delta = (counts[d] || 0) - (previous.decisions[d] || 0);
        rates[d] = dt > 0 && delta > 0 ? delta / dt : 0; // a restart resets counters
      }
      series.push({ at: now, rates });
      if (series.length > HISTORY) series.shift();
    }
    previous = { at: now, decisions: counts };
    drawLegend(counts);
    drawChart();
  }

  function drawLegend(counts) {
    const ul = $("legend");
    ul.replaceChildren();
    const last = series.length ? series[series.length - 1].rates : {};
    for (const d of DECISIONS) {
      const li = el("li", null, "d-" + d);
      li.dataset.decision = d;
      li.append(el("span", null, "swatch"), el("span", d, "name"));
      li.append(el("span", (last[d] || 0).toFixed(1) + "/s", "rate"));
      li.append(el("span", "total " + (counts[d] || 0), "total"));
      ul.append(li);
    }
  }

  // The smallest 1, 2 or 5 times a power of ten that is at least v.
  function niceCeiling(v) {
    if (v <= 0.25) return 0.25;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function drawChart() {
    const canvas = $("chart");
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || canvas.width;
    const h = canvas.clientHeight || canvas.height;
    if (canvas.width !== Math.round(w * ratio)) {
      canvas.width = Math.round(w * ratio);
      canvas.height = Math.round(h * ratio);
    }
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, w, h);
    const left = 48, right = 12, top = 10, bottom = 24;
    const pw = w - left - right, ph = h - top - bottom;
    let max = 0;
    for (const p of series) for (const d of DECISIONS) max = Math.max(max, p.rates[d]);
    const gridStep = niceCeiling(max / 4);
    max = gridStep * 4;
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = "#6b7280";
    g.strokeStyle = "#e5e7eb";
    g.lineWidth = 1;
    g.textAlign = "right";
    g.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = top + ph - (ph * i) / 4;
      g.beginPath();
      g.moveTo(left, Math.round(y) + 0.5);
      g.lineTo(left + pw, Math.round(y) + 0.5);
      g.stroke();
      const label = gridStep * i;
      g.fillText(gridStep >= 1 ? label.toFixed(0) : label.toFixed(2).replace(/0$/, ""), left - 6, y);
    }
    g.textAlign = "center";
    g.textBaseline = "top";
    for (let s = 0; s <= HISTORY; s += 30) {
      const x = left + pw - (pw * s) / HISTORY;
      g.fillText(s === 0 ? "now" : "-" + s + "s", x, top + ph + 6);
    }
    const step = pw / (HISTORY - 1);
    const offset = HISTORY - series.length;
    g.lineWidth = 2;
    g.lineJoin = "round";
    for (const d of DECISIONS) {
      if (!series.some((p) => p.rates[d] > 0)) continue;
      g.strokeStyle = COLORS[d];
      g.beginPath();
      series.forEach((p, i) => {
        const x = left + (offset + i) * step;
        const y = top + ph - (ph * p.rates[d]) / max;
        if (i === 0) g.moveTo(x, y);
        else g.lineTo(x, y);
      });
      g.stroke();
    }
  }

  // ------------------------------------------------------------ bans

  async function refreshBans() {
    let list;
    try {
      list = await api("GET", "admin/bans");
    } catch (e) {
      if (e.status !== 401) say("bans-msg", "Cannot list bans: " + e.message, true);
      return;
    }
    const rows = $("ban-rows");
    rows.replaceChildren();
    for (const b of list || []) {
      const tr = el("tr");
      tr.dataset.subject = b.subject;
      tr.append(
        el("td", b.subject, "subject mono"),
        el("td", duration(b.remaining), "num"),
        el("td", utc(b.until), "mono"),
        el("td", b.strikes, "num"),
        el("td", b.source),
        el("td", b.reason, "reason")
      );
      const td = el("td", null, "actions");
      const button = el("button", "Unban", "unban quiet");
      button.type = "button";
      button.addEventListener("click", () => unban(b.subject, button));
      td.append(button);
      tr.append(td);
      rows.append(tr);
    }
    const n = (list || []).length;
    $("ban-count").textContent = n ? "(" + n + ")" : "";
    $("bans-empty").hidden = n > 0;
    $("ban-table").hidden = n === 0;
  }

  async function unban(subject, button) {
    button.disabled = true;
    try {
      await api("DELETE", "admin/bans/" + seg(subject));
      say("bans-msg", "Lifted the ban on " + subject + ".");
    } catch (e) {
      if (e.status !== 401) say("bans-msg", "Cannot unban " + subject + ": " + e.message, true);
    }
    await Promise.all([refreshBans(), refreshAudit()]);
  }

  async function ban(event) {
    event.preventDefault();
    const body = {
      subject: $("ban-subject").value.trim(),
      duration: $("ban-duration").value.trim(),
    };
    const reason = $("ban-reason").value;
    if (reason.trim()) body.reason = reason;
    $("ban-button").disabled = true;
    try {
      const b = await api("POST", "admin/bans", body);
      say("bans-msg", "Banned " + b.subject + " until " + utc(b.until) + " UTC.");
      $("ban-subject").value = "";
      $("ban-reason").value = "";
    } catch (e) {
      if (e.status !== 401) say("bans-msg", "Not banned: " + e.message, true);
    } finally {
      $("ban-button").disabled = false;
    }
    await Promise.all([refreshBans(), refreshAudit()]);
  }

  // ------------------------------------------------------------ allowlist

  async function refreshAllow() {
    let a;
    try {
      a = await api("GET", "admin/allowlist");
    } catch (e) {
      if (e.status !== 401) say("allow-msg", "Cannot read the allowlist: " + e.message, true);
      return;
    }
    const rows = $("allow-rows");
    rows.replaceChildren();
    const entries = [];
    for (const net of (a && a.config) || []) entries.push([net, "config"]);
    for (const net of (a && a.runtime) || []) entries.push([net, "runtime"]);
    for (const [net, from] of entries) {
      const tr = el("tr");
      tr.dataset.network = net;
      tr.append(el("td", net, "mono"), el("td", from));
      const td = el("td", null, "actions");
      if (from === "runtime") {
        const button = el("button", "Remove", "quiet");
        button.type = "button";
        button.addEventListener("click", () => unallow(net, button));
        td.append(button);
      }
      tr.append(td);
      rows.append(tr);
    }
    $("allow-empty").hidden = entries.length > 0;
    $("allow-table").hidden = entries.length === 0;
  }

  async function allow(event) {
    event.preventDefault();
    const cidr = $("allow-cidr").value.trim();
    $("allow-button").disabled = true;
    try {
      const r = await api("POST", "admin/allowlist", { cidr });
      const lifted = (r.lifted || []).length ? "; lifted " + r.lifted.join(", ") : "";
      say("allow-msg", "Added " + r.cidr + lifted + ".");
      $("allow-cidr").value = "";
    } catch (e) {
      if (e.status !== 401) say("allow-msg", "Not added: " + e.message, true);
    } finally {
      $("allow-button").disabled = false;
    }
    await Promise.all([refreshAllow(), refreshBans(), refreshAudit()]);
  }

  async function unallow(net, button) {
    button.disabled = true;
    try {
      await api("DELETE", "admin/allowlist/" + seg(net));
      say("allow-msg", "Removed " + net + ".");
    } catch (e) {
      if (e.status !== 401) say("allow-msg", "Cannot remove " + net + ": " + e.message, true);
    }
    await Promise.all([refreshAllow(), refreshAudit()]);
  }

  // ------------------------------------------------------------ audit

  async function refreshAudit() {
    let events;
    try {
      events = await api("GET", "admin/audit?count=50");
    } catch (e) {
      if (e.status !== 401) say("audit-msg", "Cannot read the audit log: " + e.message, true);
      return;
    }
    say("audit-msg", "");
    const rows = $("audit-rows");
    rows.replaceChildren();
    for (const ev of events || []) {
      const tr = el("tr", null, "ev-" + String(ev.event).replace(/[^a-z]/g, ""));
      tr.append(
        el("td", utc(ev.time), "mono time"),
        el("td", ev.event, "event"),
        el("td", ev.subject, "mono"),
        el("td", ev.reason, "reason"),
        el("td", ev.source),
        el("td", ev.node, "node-id")
      );
      rows.append(tr);
    }
    const n = (events || []).length;
    $("audit-empty").hidden = n > 0;
    $("audit-table").hidden = n === 0;
  }

  // ------------------------------------------------------------ start

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (e) => {
      e.preventDefault();
      login($("token").value.trim());
    });
    $("logout").addEventListener("click", () => logout(""));
    $("ban-form").addEventListener("submit", ban);
    $("allow-form").addEventListener("submit", allow);
    window.addEventListener("resize", drawChart);
    if (token) login(token);
    else showBoard(false);
  });
})();
