// walsync dashboard: a small script with no dependencies. It polls the JSON API of the
// server that sent it (every poll_seconds, one request at a time) and redraws the view in
// place; nothing is loaded from anywhere else.
"use strict";

const state = {
  meta: null,
  route: null,
  timer: null,
  generation: 0,
  lastOk: 0,
  openSteps: new Set(),
  fullOutputs: new Map(),
  lag: [],            // [{t, seconds, entries}] sampled while the page is open
  syncConfigured: null,
  lastRun: null,
  cache: new Map(),   // GET path -> {etag, doc}: polls of an unchanged store answer 304
  changed: false,     // a poll brought a new document (else the view need not be redrawn)
  renderedAt: 0,
};
const POLL_MS = 2000;
const LAG_SAMPLES = 180;

// -- small helpers ------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const svg = tag.startsWith("svg:");
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.setAttribute("class", v);
    else if (k === "text") el.textContent = v;
    else if (k === "style") Object.assign(el.style, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const ICONS = {
  chevron: "M9 6l6 6-6 6",
  alert: "M12 9v4m0 4h.01M10.3 3.9 1.8 18a2 2 0 0 0 1.7 3h17a2 2 0 0 0 1.7-3L13.7 3.9a2 2 0 0 0-3.4 0z",
  bolt: "M13 2 3 14h9l-1 8 10-12h-9z",
  x: "M18 6 6 18M6 6l12 12",
  info: "M12 16v-4m0-4h.01M22 12a10 10 0 1 1-20 0 10 10 0 0 1 20 0z",
  check: "M20 6 9 17l-5-5",
};

function icon(name, size = 16) {
  return h("svg:svg", { viewBox: "0 0 24 24", width: size, height: size, fill: "none",
                        stroke: "currentColor", "stroke-width": 2, "stroke-linecap": "round",
                        "stroke-linejoin": "round", "aria-hidden": "true", class: "icon" },
           h("svg:path", { d: ICONS[name] }));
}

function pill(status) {
  return h("span", { class: `pill s-${status}`, "data-status": status }, status.replace("_", " "));
}

function ms(iso) { return iso ? Date.parse(iso) : null; }

function pad(n) { return String(n).padStart(2, "0"); }

function fmtTime(value) {
  if (value === null || value === undefined) return "—";
  const d = typeof value === "number" ? new Date(value) : new Date(Date.parse(value));
  if (Number.isNaN(d.getTime())) return "—";
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
         `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function fmtClock(t) {
  const d = new Date(t);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function fmtDuration(msec) {
  if (msec === null || msec === undefined || Number.isNaN(msec)) return "—";
  msec = Math.max(0, msec);
  if (msec < 1000) return `${Math.round(msec)} ms`;
  const s = msec / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s - m * 60)} s`;
  const hr = Math.floor(m / 60);
  if (hr < 48) return `${hr} h ${m - hr * 60} min`;
  return `${Math.floor(hr / 24)} d ${hr % 24} h`;
}

function ago(value) {
  if (value === null || value === undefined) return "—";
  const t = typeof value === "number" ? value : Date.parse(value);
  const d = Date.now() - t;
  if (d < 0) return "just now";
  if (d < 5000) return "just now";
  return `${fmtDuration(d).replace(/\.\d+ s$/, " s")} ago`;
}

function timeCell(iso) {
  if (!iso) return h("span", { class: "faint" }, "—");
  return h("span", { title: fmtTime(iso), class: "nowrap" }, ago(iso));
}

function fmtUsd(usd) {
  if (!usd) return "$0";
  if (usd < 1) return `$${usd.toFixed(4)}`;
  return `$${usd.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 })}`;
}

function fmtInt(n) { return Number(n || 0).toLocaleString("en-US"); }

function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(n < 10 ? 1 : 0) : n} ${units[i]}`;
}

function costLine(cost) {
  const parts = [];
  if (cost.tokens_in || cost.tokens_out) {
    parts.push(`${fmtInt(cost.tokens_in)} in · ${fmtInt(cost.tokens_out)} out tokens`);
  }
  for (const [name, value] of Object.entries(cost.counters || {})) parts.push(`${name} ${fmtInt(value)}`);
  return parts.join(" · ");
}

function hasCost(cost) {
  return Boolean(cost && (cost.usd || cost.tokens_in || cost.tokens_out ||
                          Object.keys(cost.counters || {}).length));
}

function toast(message) {
  const el = document.getElementById("toast");
  el.textContent = message;
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, 3500);
}

// -- the API ----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, doc) {
    super(doc && doc.error ? doc.error : `HTTP ${status}`);
    this.status = status;
    this.hint = doc && doc.hint;
  }
}

async function api(path, body) {
  const init = { headers: { Accept: "application/json" }, cache: "no-store" };
  const cached = body === undefined ? state.cache.get(path) : undefined;
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.headers["X-Walsync-Token"] = state.meta ? state.meta.token : "";
    init.body = JSON.stringify(body);
  } else if (cached) {
    init.headers["If-None-Match"] = cached.etag;
  }
  const res = await fetch(path, init);
  if (res.status === 304 && cached) return cached.doc;
  let doc = null;
  try { doc = await res.json(); } catch (e) { doc = null; }
  if (!res.ok) throw new ApiError(res.status, doc);
  state.changed = true;
  const etag = res.headers.get("ETag");
  if (etag && body === undefined) {
    if (state.cache.size > 50) state.cache.clear();
    state.cache.set(path, { etag, doc });
  }
  return doc;
}

function setLive(ok, message) {
  const el = document.getElementById("live");
  el.dataset.state = ok ? "live" : "error";
  el.lastElementChild.textContent = ok ? "live" : message;
  el.title = ok ? `refreshed every ${POLL_MS / 1000} s` : message;
}

// -- routing and polling ------------------------------------------------------------------

function parseRoute() {
  const raw = location.hash.replace(/^#/, "") || "/runs";
  const [path, qs] = raw.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(qs || "");
  if (parts[0] === "runs" && parts[1]) return { view: "run", runId: parts[1], params };
  if (parts[0] === "replication") return { view: "replication", params };
  if (parts[0] === "store") return { view: "store", params };
  return { view: "runs", params };
}

function navigate() {
  const route = parseRoute();
  const same = state.route && state.route.view === route.view && state.route.runId === route.runId;
  state.route = route;
  for (const a of document.querySelectorAll(".tabs a")) {
    const tab = a.dataset.tab;
    a.classList.toggle("active", tab === route.view || (tab === "runs" && route.view === "run"));
  }
  if (!same) {
    state.openSteps.clear();
    document.getElementById("view").replaceChildren(h("p", { class: "muted pad" }, "Loading…"));
    window.scrollTo(0, 0);
  }
  refresh();
}

async function refresh() {
  clearTimeout(state.timer);
  const generation = ++state.generation;
  const route = state.route;
  const redraw = state.changed || Date.now() - state.renderedAt > 10000;
  state.changed = false;
  try {
    let node;
    if (route.view === "runs") node = await viewRuns(route);
    else if (route.view === "run") node = await viewRun(route);
    else if (route.view === "replication") node = await viewReplication();
    else node = await viewStore();
    if (generation !== state.generation) return;  // a newer refresh has started
    const view = document.getElementById("view");
    // Nothing changed in the store (every document answered 304): keep the page as drawn,
    // with what the reader expanded; relative times are redrawn every 10 s all the same.
    const unchanged = !redraw && !state.changed && view.dataset.route === routeKey(route);
    if (!unchanged) {
      const focused = document.activeElement && document.activeElement.id;
      const caret = focused === "search" ? document.activeElement.selectionStart : null;
      view.replaceChildren(node);
      view.dataset.route = routeKey(route);
      state.renderedAt = Date.now();
      if (focused === "search") {
        const s = document.getElementById("search");
        s.focus();
        s.setSelectionRange(caret, caret);
      }
    }
    setLive(true);
    if (route.view !== "replication" && state.syncConfigured) sampleLag();
  } catch (err) {
    if (generation !== state.generation) return;
    const view = document.getElementById("view");
    if (err instanceof ApiError && err.status === 404) {
      view.replaceChildren(notFound(err));
      view.dataset.route = "";
      setLive(true);
    } else {
      const message = err instanceof ApiError ? err.message : "dashboard server unreachable";
      setLive(false, message);
      if (view.dataset.route !== routeKey(route)) {
        // nothing drawn for this view yet: say why (a page already drawn stays as it was)
        view.replaceChildren(h("div", { class: "banner bad", id: "load-error" },
          h("span", { class: "icon" }, icon("x", 18)),
          h("div", { class: "body" }, h("strong", {}, "The dashboard cannot read the store"),
            h("p", {}, message), err.hint ? h("p", { class: "faint" }, err.hint) : null,
            h("p", { class: "faint" }, `Trying again every ${POLL_MS / 1000} s.`))));
      }
    }
  }
  if (generation === state.generation) state.timer = setTimeout(refresh, POLL_MS);
}

function routeKey(route) {
  return `${route.view}/${route.runId || ""}?${route.params}`;
}

function notFound(err) {
  return h("div", { class: "card" }, h("div", { class: "empty" },
    h("p", {}, err.message), err.hint ? h("p", { class: "muted" }, err.hint) : null,
    h("a", { href: "#/runs" }, "Back to runs")));
}

// -- runs list ----------------------------------------------------------------------------

const STATUS_ORDER = ["running", "paused", "failed", "pending", "completed", "cancelled"];

function runsHash(statuses, q) {
  const params = new URLSearchParams();
  if (statuses.length) params.set("status", statuses.join(","));
  if (q) params.set("q", q);
  const qs = params.toString();
  return `#/runs${qs ? `?${qs}` : ""}`;
}

async function viewRuns(route) {
  const statuses = (route.params.get("status") || "").split(",").filter(Boolean);
  const q = route.params.get("q") || "";
  const query = new URLSearchParams();
  if (statuses.length) query.set("status", statuses.join(","));
  if (q) query.set("q", q);
  const doc = await api(`/api/runs?${query}`);
  const totalUsd = doc.runs.reduce((sum, r) => sum + (r.cost.usd || 0), 0);

  const chips = h("div", { class: "chips", role: "group", "aria-label": "filter by status" },
    h("button", { class: `chip${statuses.length ? "" : " on"}`, type: "button",
                  onclick: () => { location.hash = runsHash([], q); } },
      "All", h("span", { class: "count" }, fmtInt(doc.total))),
    STATUS_ORDER.map((s) => {
      const on = statuses.includes(s);
      return h("button", {
        class: `chip${on ? " on" : ""}`, type: "button", "data-status": s,
        onclick: () => {
          const next = on ? statuses.filter((x) => x !== s) : [...statuses, s];
          location.hash = runsHash(next, q);
        },
      }, h("span", { class: `dot s-${s}` }), s, h("span", { class: "count" }, fmtInt(doc.counts[s] || 0)));
    }));
  const search = h("input", {
    id: "search", class: "search", type: "search", value: q, autocomplete: "off",
    placeholder: "Search run id or workflow", "aria-label": "search runs",
  });
  search.addEventListener("input", () => {
    clearTimeout(search.timer);
    search.timer = setTimeout(() => {
      history.replaceState(null, "", runsHash(statuses, search.value.trim()));
      state.route = parseRoute();
      refresh();
    }, 250);
  });

  let body;
  if (!doc.runs.length) {
    body = h("div", { class: "empty" }, doc.total ? "No run matches these filters." :
      "No runs in this store yet.");
  } else {
    body = h("table", { class: "runs" },
      h("thead", {}, h("tr", {},
        h("th", {}, "Status"), h("th", {}, "Run"), h("th", {}, "Workflow"), h("th", {}, "Progress"),
        h("th", {}, "Started"), h("th", {}, "Updated"), h("th", { class: "r" }, "Cost"))),
      h("tbody", {}, doc.runs.map(runRow)));
  }
  const more = doc.matched > doc.runs.length
    ? h("div", { class: "empty" }, `Showing the ${doc.runs.length} most recently updated of ${fmtInt(doc.matched)} runs; narrow the search to see others.`)
    : null;
  return h("div", {},
    h("div", { class: "page-head" },
      h("div", {}, h("h1", {}, "Runs"),
        h("div", { class: "sub" },
          `${fmtInt(doc.matched)} of ${fmtInt(doc.total)} runs · ${fmtUsd(totalUsd)} spent by the runs shown`))),
    h("div", { class: "card" }, h("div", { class: "toolbar" }, chips, search),
      h("div", { class: "card-body flush" }, body), more));
}

function runRow(r) {
  const total = r.total_steps || null;
  const pct = Math.max(0, Math.min(100, r.progress || 0));
  const href = `#/runs/${encodeURIComponent(r.run_id)}`;
  const note = r.status === "paused" && r.paused_reason ? "waiting for a decision"
    : r.status === "failed" && r.error ? `${r.error.type}: ${r.error.message}`
      : r.current_step && r.status === "running" ? `in ${r.current_step}` : null;
  return h("tr", { class: "link", "data-run": r.run_id, onclick: () => { location.hash = href; } },
    h("td", {}, pill(r.status)),
    h("td", {}, h("a", { class: "run-id", href }, r.run_id),
      note ? h("div", { class: "sub-line", title: note }, note.length > 70 ? `${note.slice(0, 70)}…` : note) : null),
    h("td", {}, h("span", {}, r.workflow), h("span", { class: "faint" }, ` v${r.workflow_version}`)),
    h("td", {}, h("div", { class: `progress s-${r.status}` },
      h("div", { class: "bar" }, h("span", { style: { width: `${pct}%` } })),
      h("span", { class: "muted num nowrap" }, total ? `${r.steps_done}/${total}` : `${r.steps_done}`))),
    h("td", {}, timeCell(r.started_at || r.created_at)),
    h("td", {}, timeCell(r.updated_at)),
    h("td", { class: "r num" }, h("div", { class: "cost" }, fmtUsd(r.cost.usd)),
      r.cost.tokens_in || r.cost.tokens_out
        ? h("div", { class: "sub-line" }, `${fmtInt(r.cost.tokens_in + r.cost.tokens_out)} tokens`) : null));
}

// -- one run --------------------------------------------------------------------------------

async function viewRun(route) {
  const id = route.runId;
  const doc = await api(`/api/runs/${encodeURIComponent(id)}`);
  state.lastRun = doc;
  const r = doc.run;
  const now = Date.now();
  const start = ms(r.started_at) || ms(r.created_at);
  const end = r.completed_at ? ms(r.completed_at) : (r.status === "running" ? now : ms(r.updated_at));
  const attempts = doc.steps.reduce((n, s) => n + s.attempts, 0);
  const crashed = doc.steps.filter((s) => s.interrupted_at);

  const stats = h("div", { class: "stats" },
    stat("Progress", `${Math.round(r.progress)}%`,
      `${r.steps_done} of ${r.total_steps || doc.steps.length} steps succeeded`),
    stat("Cost", fmtUsd(r.cost.usd), costLine(r.cost) || "no usage reported", "run-cost"),
    stat("Duration", start ? fmtDuration(end - start) : "—",
      r.completed_at ? `finished ${ago(r.completed_at)}` : `updated ${ago(r.updated_at)}`),
    stat("Attempts", fmtInt(attempts),
      crashed.length ? `${crashed.length} step${crashed.length > 1 ? "s" : ""} interrupted by a crash`
        : "no step interrupted", crashed.length ? "warn" : null),
    (r.restoration_count || r.rollbacks) ? stat("Restorations", `${r.restoration_count} / ${r.rollbacks}`,
      "restorations / rollbacks") : null);

  const banners = [];
  for (const sid of doc.needs_attention) {
    const s = doc.steps.find((x) => x.step_id === sid);
    banners.push(h("div", { class: "banner warn", "data-attention": sid },
      h("span", { class: "icon" }, icon("alert", 18)),
      h("div", { class: "body" },
        h("strong", {}, `Step ${sid} needs attention`),
        h("p", {}, "It was interrupted while running and is not idempotent, so walsync will not run it again " +
          "until someone decides: check whether its side effect happened, then retry, skip, or mark it succeeded."),
        state.meta.actions ? h("div", { class: "btn-row" },
          h("button", { class: "btn small", type: "button", onclick: () => confirmResolve(r.run_id, s, "retry") }, "Retry"),
          h("button", { class: "btn small", type: "button", onclick: () => confirmResolve(r.run_id, s, "skip") }, "Skip"),
          h("button", { class: "btn small", type: "button", onclick: () => confirmResolve(r.run_id, s, "succeed") }, "Mark succeeded…"))
          : h("p", { class: "faint" }, "Read-only dashboard: start it with ", h("code", {}, "walsync ui --allow-actions"), " to decide here."))));
  }
  if (r.error) {
    banners.push(h("div", { class: "banner bad" }, h("span", { class: "icon" }, icon("x", 18)),
      h("div", { class: "body" }, h("strong", {}, `${r.error.type}`), h("p", {}, r.error.message))));
  }
  if (r.status === "paused" && r.paused_reason && !doc.needs_attention.length) {
    banners.push(h("div", { class: "banner info" }, h("span", { class: "icon" }, icon("info", 18)),
      h("div", { class: "body" }, h("strong", {}, "Paused"), h("p", {}, r.paused_reason))));
  }

  const subtitle = [
    h("span", {}, h("span", { class: "muted" }, "workflow "), r.workflow, h("span", { class: "faint" }, ` v${r.workflow_version}`)),
    h("span", { class: "muted" }, ` · created ${fmtTime(r.created_at)}`),
    r.owner_node ? h("span", { class: "muted" }, ` · lease ${r.owner_node} #${r.lease_token}`) : null,
    r.rolled_back_to ? h("span", { class: "muted" }, ` · rolled back to ${r.rolled_back_to}`) : null,
  ];

  return h("div", {},
    h("div", { class: "crumbs" }, h("a", { href: "#/runs" }, "Runs"), " / ", h("span", { class: "mono" }, r.run_id)),
    h("div", { class: "page-head" }, h("div", {},
      h("div", { class: "title-line" }, h("h1", { id: "run-title" }, r.run_id), pill(r.status)),
      h("div", { class: "sub" }, subtitle))),
    banners, stats,
    timelineCard(doc, now),
    stepsCard(doc),
    checkpointsCard(doc),
    rollbacksCard(doc),
    inputsCard(doc));
}

function stat(label, value, detail, extra) {
  return h("div", { class: `stat${extra === "warn" || extra === "bad" ? ` ${extra}` : ""}`,
                    "data-stat": extra && extra !== "warn" && extra !== "bad" ? extra : label.toLowerCase() },
    h("div", { class: "label" }, label),
    h("div", { class: `value${String(value).length > 14 ? " small" : ""}` }, value),
    detail ? h("div", { class: "detail", title: detail }, detail) : null);
}

function stepWindow(s, runEnd, now, running) {
  const first = ms(s.created_at);
  const start = ms(s.started_at) || first;
  let end;
  if (s.status === "success") end = ms(s.completed_at) || ms(s.updated_at);
  else if (s.status === "running" && running) end = now;
  else end = ms(s.updated_at) || start;
  return { first, start, end: Math.max(end || start, start) };
}

function ticks(t0, span, count) {
  const step = niceStep(span / count);
  const out = [];
  for (let v = 0; v <= span + 1e-9; v += step) out.push(v);
  return out;
}

function niceStep(raw) {
  const steps = [1, 2, 5, 10, 20, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000, 15000, 30000,
    60000, 120000, 300000, 600000, 900000, 1800000, 3600000, 7200000, 21600000, 43200000, 86400000];
  for (const s of steps) if (s >= raw) return s;
  return Math.ceil(raw / 86400000) * 86400000;
}

function fmtOffset(v, step) {
  if (step < 1000) return `+${Math.round(v)} ms`;
  if (step < 60000) return `+${(v / 1000).toFixed(step % 1000 ? 1 : 0)} s`;
  if (step < 3600000) return `+${Math.round(v / 60000)} min`;
  return `+${(v / 3600000).toFixed(step % 3600000 ? 1 : 0)} h`;
}

function timelineCard(doc, now) {
  const r = doc.run;
  const running = r.status === "running";
  const steps = doc.steps;
  if (!steps.length) {
    return h("div", { class: "card" }, h("header", {}, h("h2", {}, "Timeline")),
      h("div", { class: "empty" }, "No steps recorded yet."));
  }
  const windows = steps.map((s) => stepWindow(s, null, now, running));
  let t0 = Math.min(...windows.map((w) => w.first || w.start).filter(Boolean));
  let t1 = Math.max(...windows.map((w) => w.end).filter(Boolean), ms(doc.span.end) || 0);
  for (const s of steps) if (s.interrupted_at) t1 = Math.max(t1, ms(s.interrupted_at));
  for (const c of doc.checkpoints) { t0 = Math.min(t0, ms(c.created_at)); t1 = Math.max(t1, ms(c.created_at)); }
  if (running) t1 = Math.max(t1, now);
  const span = Math.max(t1 - t0, 1);
  const pos = (t) => `${(100 * (t - t0)) / span}%`;
  const width = (a, b) => `${Math.max((100 * (b - a)) / span, 0.35)}%`;
  const step = niceStep(span / 6);
  const tickValues = ticks(t0, span, 6);

  const gridLines = () => tickValues.map((v) => h("span", { class: "grid", style: { left: pos(t0 + v) } }));
  const flags = () => doc.checkpoints.map((c) => h("span", { class: "flag", style: { left: pos(ms(c.created_at)) } }));

  const axis = h("div", { class: "tl-axis" }, h("span"),
    h("div", { class: "track" },
      tickValues.map((v, i) => h("span", {
        class: `tl-tick${i === 0 ? " first" : ""}${v >= span - step / 2 && i === tickValues.length - 1 ? " last" : ""}`,
        style: { left: pos(t0 + v) } }, i === 0 ? fmtClock(t0) : fmtOffset(v, step))),
      doc.checkpoints.map((c) => h("span", { class: "flag-label", style: { left: pos(ms(c.created_at)) },
        title: `checkpoint ${c.name}: ${c.description || ""}` }, c.name))),
    h("div", { class: "tl-meta muted" }, h("span", {}, "tries"), h("span", {}, "time"), h("span", {}, "cost")));

  const rows = steps.map((s, i) => {
    const w = windows[i];
    const segs = [];
    const earlier = s.attempts > 1 || s.interrupted_at;
    if (earlier && w.first !== null && w.first < w.start) {
      segs.push(h("span", { class: "seg earlier", style: { left: pos(w.first), width: width(w.first, w.start) },
        title: `earlier attempt${s.attempts > 2 ? "s" : ""} (${s.attempts - 1}) from ${fmtTime(s.created_at)}` }));
    }
    if (s.status !== "pending" && w.start) {
      const cls = `seg s-${s.status}${s.status === "running" ? " running" : ""}`;
      const seg = h("span", { class: cls, style: { left: pos(w.start), width: width(w.start, w.end) },
        title: `${s.step_id}: ${s.status}, attempt ${s.attempts}, ${fmtDuration(w.end - w.start)}` });
      if (s.status === "running" && s.fraction) {
        seg.append(h("span", { class: "progress-fill", style: { width: `${Math.round(s.fraction * 100)}%` } }));
      }
      segs.push(seg);
    }
    if (s.interrupted_at) {
      segs.push(h("span", { class: "mark", style: { left: pos(ms(s.interrupted_at)) },
        title: `found interrupted by a crash at ${fmtTime(s.interrupted_at)}` }));
    }
    const tags = [];
    if (s.interrupted_at) {
      tags.push(h("span", { class: "tag crash", title: `interrupted by a crash; found at ${fmtTime(s.interrupted_at)}` },
        s.status === "success" ? "resumed after crash" : "crashed"));
    }
    if (s.status === "needs_attention") tags.push(h("span", { class: "tag attn" }, "needs attention"));
    if (s.status === "failure") tags.push(h("span", { class: "tag fail" }, "failed"));
    return h("div", { class: "tl-row", "data-step": s.step_id, "data-status": s.status },
      h("div", { class: "tl-label" }, h("span", { class: "seq" }, s.seq + 1),
        h("span", { class: `dot s-${s.status}` }),
        h("span", { class: "name", title: s.step_id }, s.step_id), h("span", { class: "tl-flags" }, tags)),
      h("div", { class: "track" }, gridLines(), flags(), segs),
      h("div", { class: "tl-meta" },
        h("span", { class: `att${s.attempts > 1 ? " many" : ""}`, title: `${s.attempts} attempt(s)` },
          s.attempts ? `×${s.attempts}` : "—"),
        h("span", {}, s.status === "pending" ? "—" : fmtDuration(w.end - w.start)),
        h("span", { class: "step-cost" }, hasCost(s.cost) ? fmtUsd(s.cost.usd) : "—")));
  });

  const stepUsd = steps.reduce((n, s) => n + (s.cost.usd || 0), 0);
  const foot = h("div", { class: "tl-foot" }, h("span", { class: "tl-label muted" }, "Run total"),
    h("span", { class: "muted" }, `${fmtDuration(span)} from first step to last change`),
    h("div", { class: "tl-meta" }, h("span", {}, `×${steps.reduce((n, s) => n + s.attempts, 0)}`),
      h("span", {}, ""), h("span", { id: "run-total-cost", title: stepUsd.toFixed(6) }, fmtUsd(r.cost.usd))));

  const legend = h("div", { class: "legend" },
    h("span", {}, h("i", { class: "s-success" }), "success"),
    h("span", {}, h("i", { class: "s-running" }), "running"),
    h("span", {}, h("i", { class: "s-needs_attention" }), "needs attention"),
    h("span", {}, h("i", { class: "s-failure" }), "failure"),
    h("span", {}, h("i", { class: "lg-earlier" }), "earlier attempts"),
    h("span", {}, h("i", { class: "lg-mark" }), "crash found"),
    doc.checkpoints.length ? h("span", {}, h("i", { class: "lg-flag" }), "checkpoint") : null);
  return h("div", { class: "card", id: "timeline" },
    h("header", {}, h("h2", {}, "Timeline"), legend),
    h("div", { class: "timeline" }, axis, rows, foot));
}

function stepsCard(doc) {
  const runId = doc.run.run_id;
  const list = h("div", { class: "steps" }, doc.steps.map((s) => stepItem(runId, s)));
  return h("div", { class: "card" },
    h("header", {}, h("h2", {}, "Steps"), h("span", { class: "muted" }, "outputs, errors and cost per step; click a step for details")),
    h("div", { class: "card-body flush" }, doc.steps.length ? list : h("div", { class: "empty" }, "No steps.")));
}

function stepItem(runId, s) {
  const key = `${runId}/${s.step_id}`;
  const open = state.openSteps.has(key);
  const item = h("div", { class: `step${open ? " open" : ""}`, "data-step": s.step_id });
  const head = h("div", { class: "step-head", role: "button", tabindex: 0, "aria-expanded": String(open) },
    h("span", { class: "chev" }, icon("chevron", 14)),
    h("span", { class: "mono" }, s.step_id),
    h("span", {}, pill(s.status)),
    h("span", { class: "num muted" }, `${s.attempts} attempt${s.attempts === 1 ? "" : "s"}`),
    h("span", { class: "num" }, hasCost(s.cost) ? fmtUsd(s.cost.usd) : h("span", { class: "faint" }, "—")),
    h("span", {}, s.idempotent ? "" : h("span", { class: "tag plain", title: "not idempotent: after a crash it waits for a decision" }, "not idempotent")),
    h("span", { class: "preview", title: s.output ? s.output.text : "" },
      s.error ? `${s.error.type}: ${s.error.message}` : s.output ? s.output.text : ""));
  const toggle = () => {
    if (state.openSteps.has(key)) state.openSteps.delete(key); else state.openSteps.add(key);
    item.classList.toggle("open");
    head.setAttribute("aria-expanded", String(item.classList.contains("open")));
  };
  head.addEventListener("click", toggle);
  head.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); toggle(); } });

  const kv = h("dl", { class: "kv" },
    h("dt", {}, "created"), h("dd", {}, fmtTime(s.created_at)),
    h("dt", {}, "last attempt began"), h("dd", {}, fmtTime(s.started_at)),
    h("dt", {}, s.completed_at ? "completed" : "last change"), h("dd", {}, fmtTime(s.completed_at || s.updated_at)),
    s.interrupted_at ? [h("dt", {}, "crash found"), h("dd", {}, `${fmtTime(s.interrupted_at)} — the process died while this step ran; ` +
      (s.idempotent ? "it resumed from its cursor" : "not idempotent, so it waited for a decision"))] : null,
    s.fraction && s.status !== "success" ? [h("dt", {}, "progress"), h("dd", {}, `${Math.round(s.fraction * 100)}%`)] : null,
    s.cursor ? [h("dt", {}, "cursor"), h("dd", { class: "mono" }, s.cursor.text + (s.cursor.truncated ? "…" : ""))] : null,
    hasCost(s.cost) ? [h("dt", {}, "cost"), h("dd", {}, [fmtUsd(s.cost.usd), costLine(s.cost) ? ` · ${costLine(s.cost)}` : ""].join(""))] : null);
  const body = h("div", { class: "step-body" }, kv);
  if (s.error) {
    body.append(h("div", { class: "section-label" }, "error"),
      h("pre", { class: "value error" }, `${s.error.type}: ${s.error.message}\n\n${s.error.traceback}`.trim()));
  }
  if (s.output) body.append(outputBlock(runId, s));
  item.append(head, body);
  return item;
}

function outputBlock(runId, s) {
  const key = `${runId}/${s.step_id}/${s.attempts}/${s.updated_at}`;
  const full = state.fullOutputs.get(key);
  const label = h("div", { class: "section-label" }, "output",
    s.output.stored_apart ? h("span", { class: "faint" }, " · stored under its own key") : null);
  if (full) {
    return h("div", { class: "output" }, label, h("pre", { class: "value" }, full.text),
      full.truncated ? h("div", { class: "faint" }, `cut at ${fmtInt(full.text.length)} of ${fmtInt(full.chars)} characters`) : null);
  }
  const pre = h("pre", { class: "value" }, s.output.text + (s.output.truncated ? " …" : ""));
  const more = s.output.truncated ? h("button", {
    class: "linkish", type: "button",
    onclick: async (e) => {
      e.target.disabled = true;
      try {
        const doc = await api(`/api/runs/${encodeURIComponent(runId)}/steps/${encodeURIComponent(s.step_id)}/output`);
        state.fullOutputs.set(key, doc);
        pre.textContent = doc.text;
        e.target.replaceWith(h("span", { class: "faint" }, doc.truncated ? `cut at ${fmtInt(doc.text.length)} of ${fmtInt(doc.chars)} characters` : ""));
      } catch (err) { toast(err.message); e.target.disabled = false; }
    },
  }, `Show all (${fmtInt(s.output.chars)} characters)`) : null;
  return h("div", { class: "output" }, label, pre, more);
}

function checkpointsCard(doc) {
  const runId = doc.run.run_id;
  if (!doc.checkpoints.length) return null;
  const rows = doc.checkpoints.map((c) => h("tr", { "data-checkpoint": c.name },
    h("td", {}, h("span", { class: "mono" }, c.name), c.name === doc.run.rolled_back_to ? h("span", { class: "tag plain" }, " current base") : null),
    h("td", {}, timeCell(c.created_at)),
    h("td", {}, c.description || h("span", { class: "faint" }, "—"),
      c.tags.length ? h("div", { class: "sub-line" }, c.tags.map((t) => `#${t}`).join(" ")) : null),
    h("td", { class: "r num" }, c.steps),
    h("td", {}, pill(c.status)),
    state.meta.actions ? h("td", { class: "r" }, h("button", { class: "btn small", type: "button",
      onclick: () => confirmRollback(runId, c) }, "Roll back…")) : null));
  return h("div", { class: "card", id: "checkpoints" },
    h("header", {}, h("h2", {}, "Checkpoints"), h("span", { class: "muted" }, "named states this run can roll back to")),
    h("div", { class: "card-body flush" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Created"), h("th", {}, "Description"),
        h("th", { class: "r" }, "Steps"), h("th", {}, "Run status then"), state.meta.actions ? h("th") : null)),
      h("tbody", {}, rows))));
}

function rollbacksCard(doc) {
  if (!doc.rollbacks.length) return null;
  const items = doc.rollbacks.map((rb) => h("tr", { "data-rollback": rb.rollback },
    h("td", { class: "num" }, `#${rb.rollback}`),
    h("td", {}, rb.replaced_run ? "restoration replaced the run record" :
      (rb.rollback === doc.run.rollbacks && doc.run.rolled_back_to ? `to ${doc.run.rolled_back_to}` : "")),
    h("td", {}, rb.steps.length ? rb.steps.map((s, i) => [i ? ", " : "", h("span", { class: "mono" }, s.step_id),
      h("span", { class: "faint" }, ` (${s.status}, ×${s.attempts})`)]) : h("span", { class: "faint" }, "none"))));
  return h("div", { class: "card", id: "rollbacks" },
    h("header", {}, h("h2", {}, "Rollbacks"), h("span", { class: "muted" }, "step records each rollback replaced, kept until retention removes the run")),
    h("div", { class: "card-body flush" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Rollback"), h("th", {}, "Checkpoint"), h("th", {}, "Replaced steps"))),
      h("tbody", {}, items))));
}

function inputsCard(doc) {
  const meta = Object.keys(doc.metadata || {}).length ? JSON.stringify(doc.metadata, null, 2) : null;
  return h("div", { class: "card" }, h("header", {}, h("h2", {}, "Inputs and metadata")),
    h("div", { class: "card-body" },
      h("div", { class: "section-label" }, "inputs"), h("pre", { class: "value" }, doc.inputs.text + (doc.inputs.truncated ? " …" : "")),
      meta ? [h("div", { class: "section-label" }, "metadata"), h("pre", { class: "value" }, meta)] : null));
}

// -- actions (only offered with --allow-actions) --------------------------------------------

function confirmDialog({ title, text, extra, okLabel, danger, run }) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-extra").replaceChildren(extra || "");
  const error = document.getElementById("confirm-error");
  error.hidden = true;
  const ok = document.getElementById("confirm-ok");
  ok.textContent = okLabel;
  ok.className = `btn ${danger ? "danger" : "primary"}`;
  ok.disabled = false;
  const form = document.getElementById("confirm-form");
  form.onsubmit = async (e) => {
    e.preventDefault();
    ok.disabled = true;
    try {
      const message = await run();
      dialog.close();
      toast(message);
      refresh();
    } catch (err) {
      error.textContent = err.hint ? `${err.message} — ${err.hint}` : err.message;
      error.hidden = false;
      ok.disabled = false;
    }
  };
  document.getElementById("confirm-cancel").onclick = () => dialog.close();
  dialog.showModal();
}

function confirmResolve(runId, s, action) {
  const texts = {
    retry: `Run ${s.step_id} again when the run resumes? It is not idempotent: if its side effect already happened, retrying repeats it.`,
    skip: `Mark ${s.step_id} skipped? The run continues without it when it resumes (a skipped step runs again on a later resume).`,
    succeed: `Mark ${s.step_id} succeeded with the output below? Its dependants will use that output; the step never runs again.`,
  };
  const output = action === "succeed" ? h("textarea", { id: "resolve-output", "aria-label": "output JSON", spellcheck: "false" }, "null") : null;
  confirmDialog({
    title: `${action === "succeed" ? "Mark succeeded" : action[0].toUpperCase() + action.slice(1)}: ${s.step_id}`,
    text: texts[action], extra: output, okLabel: action === "succeed" ? "Mark succeeded" : action[0].toUpperCase() + action.slice(1),
    danger: action === "retry",
    run: async () => {
      const body = { action };
      if (output) {
        try { body.output = JSON.parse(output.value); } catch (e) { throw new ApiError(400, { error: `the output is not JSON: ${e.message}` }); }
      }
      const res = await api(`/api/runs/${encodeURIComponent(runId)}/steps/${encodeURIComponent(s.step_id)}/resolve`, body);
      return `${s.step_id}: ${res.status}`;
    },
  });
}

function confirmRollback(runId, c) {
  confirmDialog({
    title: `Roll back to ${c.name}?`,
    text: `Run ${runId} returns to checkpoint ${c.name} (${fmtTime(c.created_at)}). Steps recorded since are replaced; ` +
      "the replaced records stay readable under Rollbacks until retention removes the run, and the run is paused. Cost already spent stays counted.",
    okLabel: "Roll back", danger: true,
    run: async () => {
      const res = await api(`/api/runs/${encodeURIComponent(runId)}/rollback`, { checkpoint: c.name });
      return `rolled back to ${res.checkpoint} (rollback #${res.rollback})`;
    },
  });
}

function confirmKeep(conflict, sibling) {
  confirmDialog({
    title: `Keep ${sibling.dot}'s version?`,
    text: `Key ${conflict.key} has ${conflict.siblings.length} concurrent versions. Keeping this one writes ` +
      (sibling.deleted ? "a delete" : "its value") + " again as a version that supersedes all of them; sync ships it to the other nodes.",
    extra: h("pre", { class: "value" }, sibling.deleted ? "(deleted)" : sibling.value.text + (sibling.value.truncated ? " …" : "")),
    okLabel: "Keep this version", danger: false,
    run: async () => {
      const res = await api("/api/conflicts/resolve", { key: conflict.key, keep: sibling.dot, seen: conflict.siblings.map((x) => x.dot) });
      return `${res.key}: kept ${res.kept} (LSN ${res.lsn})`;
    },
  });
}

// -- replication ------------------------------------------------------------------------------

function lagSample(doc) {
  const local = doc.local;
  state.lag.push({ t: Date.now(), seconds: local.oldest_unreplicated_age_seconds || 0, entries: local.unreplicated_entries });
  while (state.lag.length > LAG_SAMPLES) state.lag.shift();
}

async function sampleLag() {
  // Other views keep sampling the lag (at most once per poll), so the chart has a history.
  const last = state.lag[state.lag.length - 1];
  if (last && Date.now() - last.t < POLL_MS - 100) return;
  try { lagSample(await api("/api/replication")); } catch (e) { /* the next poll tries again */ }
}

async function viewReplication() {
  const doc = await api("/api/replication");
  state.syncConfigured = doc.configured;
  if (doc.configured) lagSample(doc);
  const local = doc.local;
  const parts = [h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Replication"),
    h("div", { class: "sub" }, doc.configured ? `this node ${local.node_id} → ${doc.server}` : `this node ${local.node_id}`)))];

  if (!doc.configured) {
    parts.push(h("div", { class: "banner info", id: "sync-off" }, h("span", { class: "icon" }, icon("info", 18)),
      h("div", { class: "body" }, h("strong", {}, "Sync is not configured"),
        h("p", {}, doc.reason),
        h("p", { class: "faint" }, "Start walsync ui with those settings to see the recovery point, the lag, nodes and leases."))));
    if (local.synced_before) parts.push(localStats(local, null));
  } else {
    const remote = doc.remote;
    if (remote.error) {
      parts.push(h("div", { class: "banner bad" }, h("span", { class: "icon" }, icon("x", 18)),
        h("div", { class: "body" }, h("strong", {}, "The server did not answer"), h("p", {}, remote.error),
          remote.hint ? h("p", { class: "faint" }, remote.hint) : null)));
    }
    const me = remote.nodes.find((n) => n.this_node) || null;
    parts.push(localStats(local, me, remote));
    parts.push(lagCard());
    parts.push(nodesCard(remote));
    parts.push(leasesCard(remote));
  }
  parts.push(conflictsCard(doc.conflicts));
  return h("div", {}, parts);
}

function localStats(local, me, remote) {
  const err = local.last_error;
  return h("div", { class: "stats" },
    stat("Recovery point", me && me.recovery_point_unix_ms ? ago(me.recovery_point_unix_ms) : "—",
      me && me.recovery_point_unix_ms ? `newest commit on the server: ${fmtTime(me.recovery_point_unix_ms)}` : "nothing acknowledged yet",
      "recovery-point"),
    stat("Unreplicated", fmtInt(local.unreplicated_entries),
      local.oldest_unreplicated_age_seconds !== null ? `oldest waiting ${fmtDuration(local.oldest_unreplicated_age_seconds * 1000)}` : "every local commit is on the server",
      local.unreplicated_entries ? "warn" : "unreplicated"),
    stat("Acknowledged LSN", fmtInt(local.acked_lsn), `of ${fmtInt(local.applied_lsn)} applied here`, "acked"),
    remote ? stat("Server head", remote.head === null ? "—" : fmtInt(remote.head), `pull cursor ${fmtInt(local.pull_cursor)}`, "head") : null,
    stat("Last error", err ? "error" : "none", err ? err.message || JSON.stringify(err) : "the worker recorded no error", err ? "bad" : "last-error"));
}

function lagCard() {
  const samples = state.lag;
  return h("div", { class: "card", id: "lag" },
    h("header", {}, h("h2", {}, "Lag"), h("span", { class: "muted" }, `sampled every ${POLL_MS / 1000} s while this page is open`)),
    h("div", { class: "card-body" }, h("div", { class: "charts" },
      chart("Oldest unreplicated commit", samples.map((s) => s.seconds), samples, (v) => fmtDuration(v * 1000)),
      chart("Unreplicated entries", samples.map((s) => s.entries), samples, fmtInt))));
}

function chart(title, values, samples, fmt) {
  const W = 600;
  const H = 120;
  const last = values.length ? values[values.length - 1] : 0;
  const max = Math.max(1e-9, ...values);
  const top = values.length ? max * 1.15 || 1 : 1;
  const x = (i) => (values.length < 2 ? W : (i * W) / (values.length - 1));
  const y = (v) => H - 4 - (v / top) * (H - 12);
  const pts = values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`);
  const svg = h("svg:svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img",
                             "aria-label": `${title}: ${fmt(last)}` },
    [0.25, 0.5, 0.75].map((f) => h("svg:line", { class: "gridline", x1: 0, x2: W, y1: H * f, y2: H * f })),
    values.length > 1 ? [
      h("svg:path", { class: "area", d: `M0,${H} L${pts.join(" L")} L${W},${H} Z` }),
      h("svg:polyline", { class: "line", points: pts.join(" ") }),
    ] : h("svg:text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "currentColor", opacity: 0.5, "font-size": 13 }, "collecting samples…"));
  const first = samples.length ? fmtClock(samples[0].t) : "";
  return h("div", { class: "chart" },
    h("div", { class: "chart-title" }, h("span", {}, title), h("b", {}, fmt(last))),
    svg,
    h("div", { class: "axis" }, h("span", {}, first), h("span", {}, `max ${fmt(values.length ? max : 0)}`), h("span", {}, "now")));
}

function nodesCard(remote) {
  const rows = remote.nodes.map((n) => h("tr", { "data-node": n.node_id },
    h("td", {}, h("span", { class: "mono" }, n.node_id), n.this_node ? h("span", { class: "tag plain" }, " this node") : null),
    h("td", { class: "r num" }, fmtInt(n.acked_lsn)),
    h("td", {}, n.recovery_point_unix_ms ? h("span", { title: fmtTime(n.recovery_point_unix_ms) }, ago(n.recovery_point_unix_ms)) : "—"),
    h("td", {}, n.last_push_at ? timeCell(n.last_push_at) : h("span", { class: "faint" }, n.known_to_server ? "—" : "never pushed")),
    h("td", {}, n.last_pull_at ? timeCell(n.last_pull_at) : "—"),
    h("td", { class: "r num" }, fmtInt(n.pull_cursor))));
  return h("div", { class: "card", id: "nodes" },
    h("header", {}, h("h2", {}, "Nodes"), h("span", { class: "muted" }, "this node, the nodes that last wrote its runs, and lease holders")),
    h("div", { class: "card-body flush" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Node"), h("th", { class: "r" }, "Acked LSN"), h("th", {}, "Recovery point"),
        h("th", {}, "Last push"), h("th", {}, "Last pull"), h("th", { class: "r" }, "Pull cursor"))),
      h("tbody", {}, rows))));
}

function leasesCard(remote) {
  const body = remote.leases.length ? h("table", {},
    h("thead", {}, h("tr", {}, h("th", {}, "Run"), h("th", {}, "Holder"), h("th", { class: "r" }, "Token"), h("th", {}, "State"), h("th", {}, "Expires"))),
    h("tbody", {}, remote.leases.map((l) => h("tr", { "data-lease": l.run_id },
      h("td", {}, h("a", { class: "run-id", href: `#/runs/${encodeURIComponent(l.run_id)}` }, l.run_id)),
      h("td", { class: "mono" }, l.holder),
      h("td", { class: "r num" }, l.token),
      h("td", {}, h("span", { class: `pill ${l.live ? "s-running" : "s-cancelled"}` }, l.live ? "live" : "expired")),
      h("td", {}, fmtTime(l.expires_at))))))
    : h("div", { class: "empty" }, "No leases on the server.");
  return h("div", { class: "card", id: "leases" }, h("header", {}, h("h2", {}, "Leases")), h("div", { class: "card-body flush" }, body));
}

function conflictsCard(doc) {
  const items = doc.conflicts.map((c) => h("div", { class: "conflict", "data-key": c.key },
    h("div", {}, h("span", { class: "mono" }, c.key), h("span", { class: "muted" }, ` · ${c.siblings.length} concurrent versions`)),
    h("div", { class: "siblings" }, c.siblings.map((s) => h("div", { class: "sibling", "data-dot": s.dot },
      h("div", { class: "who" }, h("span", { class: "mono" }, s.dot), h("span", { title: fmtTime(s.hlc_unix_ms) }, ago(s.hlc_unix_ms))),
      h("pre", { class: "value" }, s.deleted ? "(deleted)" : s.value.text + (s.value.truncated ? " …" : "")),
      state.meta.actions ? h("button", { class: "btn small", type: "button", onclick: () => confirmKeep(c, s) }, "Keep this…") : null)))));
  return h("div", { class: "card", id: "conflicts" },
    h("header", {}, h("h2", {}, "Conflicts"), h("span", { class: "muted" }, "keys with concurrent versions (siblings) in this store")),
    h("div", { class: "card-body flush" }, items.length ? items : h("div", { class: "empty" }, "No conflicts."),
      doc.more ? h("div", { class: "empty" }, "More keys have conflicts: ", h("code", {}, "walsync conflicts list"), " shows them all.") : null));
}

// -- store health --------------------------------------------------------------------------------

async function viewStore() {
  const doc = await api("/api/health");
  const cp = doc.last_checkpoint;
  const w = doc.writer;
  const writer = w.alive ? stat("Writer", `pid ${w.pid}`, "a process has the store open for writing", "writer")
    : w.crashed ? stat("Writer", "crashed", "the last writer died with the store open; its next open replays the WAL", "warn")
      : stat("Writer", "none", "no process has the store open for writing", "writer");
  const verify = doc.verify;
  let verifyBody;
  if (!verify) {
    verifyBody = h("p", { class: "muted" }, "Not verified since this dashboard started.");
  } else {
    verifyBody = h("div", {},
      h("div", { class: "title-line" }, h("span", { class: `pill ${verify.ok ? "s-success" : "s-failure"}`, id: "verify-result" }, verify.ok ? "ok" : "damaged"),
        h("span", { class: "muted" }, `${fmtInt(verify.records)} records in ${verify.segments} segment(s), ${fmtBytes(verify.wal_bytes)}, checked ${ago(verify.at_unix * 1000)} in ${fmtDuration(verify.seconds * 1000)}`)),
      verify.damage.map((d) => h("pre", { class: "value error" }, d.message)),
      verify.torn_tail ? h("p", { class: "muted" }, `torn tail: ${verify.torn_tail.bytes_cut} bytes at offset ${verify.torn_tail.offset} of ${verify.torn_tail.segment} (never acknowledged; cut on the next open)`) : null);
  }
  const button = h("button", { class: "btn", type: "button", id: "verify-now",
    onclick: async (e) => {
      e.target.disabled = true;
      e.target.textContent = "Verifying…";
      try { await api("/api/verify"); } catch (err) { toast(err.message); }
      refresh();
    } }, "Verify now");
  return h("div", {},
    h("div", { class: "page-head" }, h("div", {}, h("h1", {}, "Store"), h("div", { class: "sub mono" }, doc.path))),
    h("div", { class: "stats" },
      stat("Applied LSN", fmtInt(doc.applied_lsn), `node ${doc.node_id}`, "applied"),
      stat("WAL", fmtBytes(doc.wal_bytes), doc.wal_segments ? `${doc.wal_segments} segment(s) from LSN ${fmtInt(doc.wal_first_lsn)}`
        : "no segment: every record is in the checkpoint's base", "wal"),
      stat("Snapshot", fmtBytes(doc.snapshot_bytes), `${fmtInt(doc.keys)} keys`, "snapshot"),
      stat("Last checkpoint", cp.at_unix ? ago(cp.at_unix * 1000) : (cp.error ? "unreadable" : "none yet"),
        cp.error ? cp.error : cp.base_lsn ? `base at LSN ${fmtInt(cp.base_lsn)}, ${fmtTime(cp.at_unix * 1000)}` : "no base copy of the snapshot yet", cp.error ? "bad" : "checkpoint"),
      writer,
      doc.retain_floor ? stat("Retained for sync", `LSN ${fmtInt(doc.retain_floor)}`, "WAL kept from here until the server has it", "floor") : null),
    h("div", { class: "card", id: "verify" },
      h("header", {}, h("h2", {}, "Verify"), button),
      h("div", { class: "card-body" }, verifyBody,
        h("p", { class: "faint" }, "Reads every WAL frame and checks its checksum and LSN, like ", h("code", {}, "walsync verify"),
          ". Read-only, and safe beside a live writer."))));
}

// -- start ------------------------------------------------------------------------------------------

function applyTheme(theme) {
  const root = document.documentElement;
  if (theme === "light" || theme === "dark") root.dataset.theme = theme; else delete root.dataset.theme;
  document.getElementById("theme").title = `Theme: ${theme || "system"}`;
}

async function start() {
  const forced = new URLSearchParams(location.search).get("theme");
  let theme = forced || localStorage.getItem("walsync-theme") || "";
  applyTheme(theme);
  document.getElementById("theme").addEventListener("click", () => {
    theme = theme === "" ? "light" : theme === "light" ? "dark" : "";
    localStorage.setItem("walsync-theme", theme);
    applyTheme(theme);
  });
  for (;;) {
    try {
      state.meta = await api("/api/meta");
      break;
    } catch (err) {
      setLive(false, err.message || "dashboard server unreachable");
      await new Promise((resolve) => { setTimeout(resolve, POLL_MS); });
    }
  }
  const name = document.getElementById("store-name");
  name.textContent = state.meta.store;
  name.title = `store ${state.meta.store_path}, node ${state.meta.node_id}`;
  const mode = document.getElementById("mode");
  mode.textContent = state.meta.actions ? "actions enabled" : "read-only";
  mode.classList.toggle("actions", state.meta.actions);
  document.title = `walsync · ${state.meta.store_path.split("/").pop()}`;
  try {
    const rep = await api("/api/replication");
    state.syncConfigured = rep.configured;
    if (rep.configured) lagSample(rep);
  } catch (e) { state.syncConfigured = false; }
  window.addEventListener("hashchange", navigate);
  navigate();
}

start();
