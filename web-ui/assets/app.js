// Hookrelay inspector: live list of webhook exchanges, detail, replay, edit &
// replay, compare. Webhook data is only ever set as text (see dom.js).

import * as api from "./api.js";
import { $, $$, h, icon, copyText, toast, openDialog, closeDialog, dialogOpen, confirmDialog, debounce, downloadBlob } from "./dom.js";
import { fmtAgo, fmtDuration, isId, shellQuote, statusLabel } from "./format.js";
import { parseFilter } from "./filter.js";
import { connectLive } from "./live.js";
import { renderRow, renderDetail, renderDetailPlaceholder } from "./render.js";
import { setupEditor } from "./editor.js";
import { showCompare, showCompareError } from "./compare.js";

const PAGE = 50;
const MAX_PAGE = 500;
const DETAIL_CACHE = 100;

const narrowQuery = window.matchMedia("(max-width: 760px)");

const state = {
  items: [], // exchanges, newest first
  rows: new Map(), // id → row element
  nextBefore: null,
  filterText: "",
  filter: parseFilter(""),
  listSeq: 0,
  loading: false,
  queue: [], // live events that arrived during a list load
  loadedOnce: false,
  selectedId: null,
  shownId: null,
  shown: null, // the detail being shown
  detailSeq: 0,
  pendingSelect: null, // a replay to open once it shows up in the list
  selGen: 0, // bumps on every user selection: late replays do not steal focus
  tab: "request",
  view: "pretty",
  status: null,
  urls: [],
  wsUp: false,
  reconnectAt: 0,
  cache: new Map(), // id → detail (exchanges never change once recorded)
};

const els = {
  conn: $("#conn"),
  connText: $("#conn-text"),
  urls: $("#urls"),
  target: $("#target"),
  banner: $("#banner"),
  bannerText: $("#banner-text"),
  bannerRetry: $("#banner-retry"),
  main: $("#main"),
  filter: $("#filter"),
  filterClear: $("#filter-clear"),
  filterInfo: $("#filter-info"),
  listScroll: $("#list-scroll"),
  list: $("#list"),
  listError: $("#list-error"),
  empty: $("#empty"),
  nomatch: $("#nomatch"),
  loadOlder: $("#load-older"),
  listCount: $("#list-count"),
  detail: $("#detail"),
};

const isNarrow = () => narrowQuery.matches;

// ---------------------------------------------------------------- status

function setConn(kind, text, title) {
  els.conn.dataset.state = kind;
  els.connText.textContent = text;
  els.conn.title = title || "";
}

function applyStatus(s) {
  if (!s || typeof s !== "object") return;
  state.status = s;
  if (Array.isArray(s.public_urls) && s.public_urls.length) state.urls = s.public_urls.map(String);
  if (s.state === "connected") {
    setConn("connected", "connected", `Tunnel ${s.tunnel ?? ""} is up`);
    showBanner(null);
  } else if (s.state === "reconnecting") {
    setConn("reconnecting", "reconnecting", s.last_error ? `Relay link down: ${s.last_error}` : "Relay link down");
    showBanner(`The agent lost its link to the relay${s.last_error ? ` (${s.last_error})` : ""}. Retrying; webhooks sent meanwhile are not delivered.`);
  } else {
    setConn(String(s.state || "stopped"), String(s.state || "stopped"), "The agent has stopped");
    showBanner("The agent has stopped.");
  }
  renderUrls();
  if (s.target) {
    els.target.hidden = false;
    els.target.replaceChildren(h("span", { class: "muted" }, "→ "), h("code", null, String(s.target)));
    els.target.title = `Webhooks are forwarded to ${s.target}${s.data_dir ? `\nHistory in ${s.data_dir}` : ""}${s.version ? `\nrelay-client ${s.version}` : ""}`;
  }
  updateEmpty();
}

function renderUrls() {
  const stale = state.status?.state !== "connected";
  if (!state.urls.length) {
    els.urls.replaceChildren(h("span", { class: "muted small-text" }, state.status ? "no public URL yet" : ""));
    return;
  }
  els.urls.replaceChildren(
    ...state.urls.map((u) =>
      h(
        "span",
        { class: stale ? "public-url stale" : "public-url", title: stale ? `${u} (not reachable until the agent reconnects)` : u },
        u,
        h("button", { type: "button", class: "copy mini", "data-copy": u, "data-copy-label": "Public URL", "aria-label": "Copy the public URL", title: "Copy" }, icon("copy")),
      ),
    ),
  );
}

function showBanner(text, retry = false) {
  els.banner.hidden = !text;
  els.bannerText.textContent = text || "";
  els.bannerRetry.hidden = !retry;
}

function sampleCurl(url) {
  const base = url.endsWith("/") ? url : `${url}/`;
  return `curl -X POST ${shellQuote(`${base}webhooks/test`)} \\\n  -H 'content-type: application/json' \\\n  -d '{"type":"hello","data":{"id":1}}'`;
}

function updateEmpty() {
  const url = state.urls[0];
  $("#empty-url").textContent = url || "waiting for the tunnel…";
  $("#empty-curl").textContent = url ? sampleCurl(url) : "";
  $("#empty-url-copy").hidden = !url;
  $("#empty-curl-copy").hidden = !url;
}

// ---------------------------------------------------------------- list

function compareIds(a, b) {
  // ULIDs sort by time as strings (Crockford base32, upper case)
  const x = String(a).toUpperCase();
  const y = String(b).toUpperCase();
  return x < y ? -1 : x > y ? 1 : 0;
}

function rowFor(ex) {
  let row = state.rows.get(ex.id);
  if (!row) {
    row = renderRow(ex);
    state.rows.set(ex.id, row);
  }
  row.classList.toggle("selected", ex.id === state.selectedId);
  row.setAttribute("aria-selected", ex.id === state.selectedId ? "true" : "false");
  return row;
}

function setItems(exchanges) {
  const seen = new Set();
  state.items = [];
  for (const ex of exchanges) {
    if (!ex || !ex.id || seen.has(ex.id)) continue;
    seen.add(ex.id);
    state.items.push(ex);
  }
  for (const id of [...state.rows.keys()]) if (!seen.has(id)) state.rows.delete(id);
  els.list.replaceChildren(...state.items.map(rowFor));
  updateListChrome();
}

function insertExchange(ex, live = true) {
  if (!ex || !ex.id || state.rows.has(ex.id)) return false;
  // Past the loaded pages: it will come with "load older".
  const oldest = state.items[state.items.length - 1];
  if (state.nextBefore && oldest && compareIds(ex.id, oldest.id) < 0) return false;
  let idx = state.items.findIndex((e) => compareIds(e.id, ex.id) < 0);
  if (idx < 0) idx = state.items.length;
  state.items.splice(idx, 0, ex);
  const row = rowFor(ex);
  const before = els.list.children[idx] || null;
  els.list.insertBefore(row, before);
  if (live) {
    row.classList.add("fresh");
    setTimeout(() => row.classList.remove("fresh"), 1600);
  }
  updateListChrome();
  return true;
}

function removeExchange(id) {
  const idx = state.items.findIndex((e) => e.id === id);
  if (idx >= 0) state.items.splice(idx, 1);
  state.rows.get(id)?.remove();
  state.rows.delete(id);
  state.cache.delete(id);
  updateListChrome();
  return idx;
}

function updateListChrome() {
  const n = state.items.length;
  const filtered = state.filter.active;
  els.empty.hidden = !(state.loadedOnce && n === 0 && !filtered);
  els.nomatch.hidden = !(state.loadedOnce && n === 0 && filtered);
  $("#nomatch-filter").textContent = state.filterText;
  els.loadOlder.hidden = !state.nextBefore;
  els.listCount.textContent = n === 0 ? "" : `${n} ${n === 1 ? "exchange" : "exchanges"}${filtered ? " matching" : ""}${state.nextBefore ? " · more below" : ""}`;
  els.main.classList.toggle("is-empty", n === 0 && !filtered && state.loadedOnce);
}

function listParams(extra) {
  return { ...state.filter.params, ...extra };
}

/** Loads the first page again (keeping as many rows as were shown). */
async function reloadList({ keepCount = false } = {}) {
  const seq = ++state.listSeq;
  state.loading = true;
  const limit = keepCount ? Math.min(MAX_PAGE, Math.max(PAGE, state.items.length)) : PAGE;
  els.listScroll.classList.add("loading");
  try {
    const page = await api.listExchanges(listParams({ limit }));
    if (seq !== state.listSeq) return;
    els.listError.hidden = true;
    state.nextBefore = page.next_before || null;
    setItems(Array.isArray(page.exchanges) ? page.exchanges : []);
  } catch (err) {
    if (seq !== state.listSeq) return;
    els.listError.hidden = false;
    els.listError.textContent = err.status === 400 ? `Filter: ${err.message}` : `Could not load the exchanges: ${err.message}`;
    if (err.status === 400) setItems([]);
  } finally {
    if (seq === state.listSeq) {
      state.loading = false;
      els.listScroll.classList.remove("loading");
      const first = !state.loadedOnce;
      state.loadedOnce = true;
      updateListChrome();
      drainQueue();
      if (first) onFirstLoad();
    }
  }
}

async function loadOlder() {
  if (!state.nextBefore || state.loading) return;
  const seq = state.listSeq;
  els.loadOlder.disabled = true;
  try {
    const page = await api.listExchanges(listParams({ limit: PAGE, before: state.nextBefore }));
    if (seq !== state.listSeq) return;
    state.nextBefore = page.next_before || null;
    const fresh = (page.exchanges || []).filter((e) => e && e.id && !state.rows.has(e.id));
    state.items.push(...fresh);
    els.list.append(...fresh.map(rowFor));
    updateListChrome();
  } catch (err) {
    toast(`Could not load older exchanges: ${err.message}`, "error");
  } finally {
    els.loadOlder.disabled = false;
  }
}

const requery = debounce(() => reloadList({ keepCount: true }), 300);

function drainQueue() {
  const q = state.queue;
  state.queue = [];
  for (const msg of q) handleEvent(msg);
}

function handleEvent(msg) {
  if (state.loading && (msg.type === "exchange" || msg.type === "deleted" || msg.type === "cleared")) {
    // Applied once the page being fetched is in.
    state.queue.push(msg);
    return;
  }
  switch (msg.type) {
    case "exchange": {
      const ex = msg.exchange;
      if (!ex || !ex.id) return;
      if (state.filter.active) requery();
      else insertExchange(ex);
      if (state.pendingSelect === ex.id) openExchange(ex.id, { show: true, user: false });
      break;
    }
    case "deleted": {
      const id = String(msg.id);
      state.cache.delete(id);
      if (state.rows.has(id)) removeExchange(id);
      if (state.shownId === id || state.selectedId === id) {
        state.selectedId = null;
        showPlaceholder("This exchange was deleted.");
      }
      break;
    }
    case "cleared": {
      state.cache.clear();
      state.nextBefore = null;
      setItems([]);
      state.selectedId = null;
      showPlaceholder("History cleared.");
      break;
    }
    case "lagged":
      reloadList({ keepCount: true });
      break;
    case "status":
      applyStatus(msg.status);
      break;
    default:
      break;
  }
}

// ---------------------------------------------------------------- selection & detail

function setSelected(id, scroll = true) {
  if (state.selectedId && state.selectedId !== id) {
    const old = state.rows.get(state.selectedId);
    old?.classList.remove("selected");
    old?.setAttribute("aria-selected", "false");
  }
  state.selectedId = id;
  const row = id ? state.rows.get(id) : null;
  if (row) {
    row.classList.add("selected");
    row.setAttribute("aria-selected", "true");
    if (scroll) row.scrollIntoView({ block: "nearest" });
  }
  writeHash();
}

async function getDetail(id) {
  if (state.cache.has(id)) return state.cache.get(id);
  const d = await api.getExchange(id);
  state.cache.set(id, d);
  if (state.cache.size > DETAIL_CACHE) state.cache.delete(state.cache.keys().next().value);
  return d;
}

/** Selects `id` and shows its detail (`show`: switch to it in a narrow window). */
async function openExchange(id, { show = false, user = true } = {}) {
  if (!id) return;
  if (user) {
    state.selGen++;
    state.pendingSelect = null;
  }
  if (state.pendingSelect === id) state.pendingSelect = null;
  setSelected(id);
  if (show) showDetailView();
  const seq = ++state.detailSeq;
  if (state.shownId === id && state.shown) return;
  els.detail.classList.add("loading");
  try {
    const d = await getDetail(id);
    if (seq !== state.detailSeq) return;
    renderDetailPane(d);
  } catch (err) {
    if (seq !== state.detailSeq) return;
    showPlaceholder(err.status === 404 ? "This exchange no longer exists." : `Could not load it: ${err.message}`);
  } finally {
    if (seq === state.detailSeq) els.detail.classList.remove("loading");
  }
}

const openSoon = debounce((id) => openExchange(id, { user: false }), 120);

function renderDetailPane(d) {
  const sameExchange = state.shownId === d.id;
  const scroll = els.detail.scrollTop;
  state.shownId = d.id;
  state.shown = d;
  els.detail.dataset.id = d.id;
  els.detail.classList.remove("placeholder");
  els.detail.replaceChildren(
    renderDetail(d, {
      tab: state.tab,
      view: state.view,
      onTab: (t) => {
        state.tab = t;
      },
      onView: (v) => {
        if (v !== "hex") state.view = v;
      },
      replaysOf: (id) => state.items.filter((e) => e.replay_of === id),
    }),
  );
  els.detail.scrollTop = sameExchange ? scroll : 0;
}

function showPlaceholder(message) {
  state.shownId = null;
  state.shown = null;
  state.detailSeq++;
  delete els.detail.dataset.id;
  els.detail.classList.add("placeholder");
  els.detail.classList.remove("loading");
  els.detail.replaceChildren(renderDetailPlaceholder(message));
  hideDetailView();
  writeHash();
}

function showDetailView() {
  if (!els.main.classList.contains("show-detail")) {
    els.main.classList.add("show-detail");
    if (isNarrow()) els.detail.scrollTop = 0;
  }
}

function hideDetailView() {
  els.main.classList.remove("show-detail");
  if (isNarrow() && state.selectedId) state.rows.get(state.selectedId)?.scrollIntoView({ block: "nearest" });
}

function moveSelection(delta) {
  if (!state.items.length) return;
  let idx = state.items.findIndex((e) => e.id === state.selectedId);
  if (idx < 0) idx = delta > 0 ? 0 : state.items.length - 1;
  else idx = Math.max(0, Math.min(state.items.length - 1, idx + delta));
  const id = state.items[idx].id;
  state.selGen++;
  state.pendingSelect = null;
  setSelected(id);
  if (!isNarrow()) openSoon(id);
}

// ---------------------------------------------------------------- actions

async function doReplay(id, options = {}) {
  const gen = state.selGen;
  const ex = await api.replayExchange(id, options);
  if (ex && ex.id) {
    if (state.filter.active) requery();
    else insertExchange(ex);
    const where = options.to ? ` (${options.to})` : "";
    toast(`Replayed${where}: ${statusLabel(ex)} in ${fmtDuration(ex.duration?.total_ms)}`, ex.outcome === "ok" && ex.response?.status < 400 ? "ok" : "warn");
    if (state.selGen === gen) {
      if (state.rows.has(ex.id) || state.filter.active) openExchange(ex.id, { show: true, user: false });
      else state.pendingSelect = ex.id;
    }
  }
  return ex;
}

async function replaySelected(id = state.selectedId) {
  if (!id) return;
  const btn = $("#replay");
  if (btn) btn.disabled = true;
  try {
    await doReplay(id);
  } catch (err) {
    toast(`Replay failed: ${err.message}`, "error");
  } finally {
    if (btn) btn.disabled = false;
  }
}

let editor;

async function editSelected(id = state.selectedId) {
  if (!id) return;
  try {
    const d = await getDetail(id);
    editor.open(d, state.status?.target);
  } catch (err) {
    toast(`Cannot open the editor: ${err.message}`, "error");
  }
}

async function compareSelected(id = state.shownId) {
  if (!id) return;
  try {
    const d = await getDetail(id);
    if (!d.replay_of) return;
    let original;
    try {
      original = await getDetail(d.replay_of);
    } catch (err) {
      showCompareError(err.status === 404 ? `The original (${d.replay_of}) was deleted: nothing to compare with.` : `Could not load the original: ${err.message}`);
      return;
    }
    showCompare(original, d);
  } catch (err) {
    toast(`Cannot compare: ${err.message}`, "error");
  }
}

async function copyCurl(id = state.shownId) {
  if (!id) return;
  try {
    const text = await api.exportExchange(id, "curl");
    await copyText(text, "curl command");
  } catch (err) {
    toast(`Could not export: ${err.message}`, "error");
  }
}

async function downloadHar(id = state.shownId) {
  if (!id) return;
  try {
    const text = await api.exportExchange(id, "har");
    downloadBlob(new Blob([text], { type: "application/json" }), `hookrelay-${id}.har`);
  } catch (err) {
    toast(`Could not export: ${err.message}`, "error");
  }
}

async function deleteOne(id = state.shownId) {
  if (!id) return;
  const idx = state.items.findIndex((e) => e.id === id);
  try {
    await api.deleteExchange(id);
  } catch (err) {
    if (err.status !== 404) {
      toast(`Could not delete: ${err.message}`, "error");
      return;
    }
  }
  removeExchange(id);
  state.shownId = null;
  state.shown = null;
  if (state.selectedId === id) state.selectedId = null;
  toast("Deleted", "ok");
  const next = state.items[Math.min(idx, state.items.length - 1)];
  if (next && idx >= 0 && !isNarrow()) {
    openExchange(next.id, { user: false });
  } else {
    state.selectedId = null;
    showPlaceholder();
  }
}

async function clearAll() {
  const ok = await confirmDialog("Clear all exchanges?", "This deletes every recorded request and response from the agent's history. It cannot be undone.", "Delete all");
  if (!ok) return;
  try {
    await api.clearExchanges();
    state.cache.clear();
    state.nextBefore = null;
    setItems([]);
    state.selectedId = null;
    showPlaceholder("History cleared.");
  } catch (err) {
    toast(`Could not clear: ${err.message}`, "error");
  }
}

// ---------------------------------------------------------------- filter

function renderFilterInfo() {
  const f = state.filter;
  els.filterClear.hidden = !els.filter.value;
  if (!f.active && !f.warnings.length) {
    els.filterInfo.hidden = true;
    els.filterInfo.replaceChildren();
    return;
  }
  els.filterInfo.hidden = false;
  els.filterInfo.replaceChildren(
    ...f.chips.map(([k, v]) => h("span", { class: "chip" }, h("span", { class: "chip-key" }, k), h("span", { class: "chip-value" }, v))),
    ...f.warnings.map((w) => h("span", { class: "chip chip-warn" }, w)),
  );
}

function applyFilter() {
  applyFilterNow.cancel();
  state.filterText = els.filter.value.trim();
  state.filter = parseFilter(state.filterText);
  renderFilterInfo();
  writeHash();
  requery.cancel();
  reloadList();
}

const applyFilterNow = debounce(applyFilter, 250);

// ---------------------------------------------------------------- hash (deep links)

function writeHash() {
  const parts = [];
  if (state.selectedId) parts.push(`x=${state.selectedId}`);
  if (state.filterText) parts.push(`f=${encodeURIComponent(state.filterText)}`);
  const hash = parts.length ? `#${parts.join("&")}` : "";
  if (location.hash !== hash) history.replaceState(null, "", hash || `${location.pathname}${location.search}`);
}

function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  return { x: p.get("x"), f: p.get("f") };
}

// ---------------------------------------------------------------- events

function onFirstLoad() {
  document.documentElement.dataset.ready = "1";
  const { x } = readHash();
  if (x && isId(x)) openExchange(x, { user: false });
}

function wire() {
  // Every copy button carries its text.
  document.addEventListener("click", (ev) => {
    const btn = ev.target.closest("button[data-copy]");
    if (btn) {
      ev.preventDefault();
      ev.stopPropagation();
      copyText(btn.dataset.copy, btn.dataset.copyLabel || "Text");
      return;
    }
    const close = ev.target.closest("[data-close]");
    if (close) {
      const dlg = close.closest("dialog");
      if (dlg) closeDialog(dlg);
    }
  });
  // Clicking the backdrop of a modal closes it.
  for (const dlg of $$("dialog.modal")) {
    dlg.addEventListener("click", (ev) => {
      if (ev.target === dlg) {
        const r = dlg.getBoundingClientRect();
        const inside = ev.clientX >= r.left && ev.clientX <= r.right && ev.clientY >= r.top && ev.clientY <= r.bottom;
        if (!inside) closeDialog(dlg);
      }
    });
  }

  $("#empty-url-copy").append(icon("copy"));
  $("#empty-curl-copy").append(icon("copy"));
  $("#empty-url-copy").addEventListener("click", () => state.urls[0] && copyText(state.urls[0], "Public URL"));
  $("#empty-curl-copy").addEventListener("click", () => state.urls[0] && copyText(sampleCurl(state.urls[0]), "curl command"));

  els.list.addEventListener("click", (ev) => {
    const link = ev.target.closest("a[data-goto]");
    if (link) {
      ev.preventDefault();
      ev.stopPropagation();
      openExchange(link.dataset.goto, { show: true });
      return;
    }
    const row = ev.target.closest(".row");
    if (row) openExchange(row.dataset.id, { show: true });
  });

  els.detail.addEventListener("click", (ev) => {
    const link = ev.target.closest("a[data-goto]");
    if (link) {
      ev.preventDefault();
      openExchange(link.dataset.goto, { show: true });
      return;
    }
    const btn = ev.target.closest("button[id]");
    if (!btn) return;
    const id = state.shownId;
    switch (btn.id) {
      case "replay":
        replaySelected(id);
        break;
      case "edit-replay":
        editSelected(id);
        break;
      case "compare":
        compareSelected(id);
        break;
      case "copy-curl":
        copyCurl(id);
        break;
      case "download-har":
        downloadHar(id);
        break;
      case "delete":
        deleteOne(id);
        break;
      case "back":
        hideDetailView();
        break;
      default:
        break;
    }
  });

  els.loadOlder.addEventListener("click", loadOlder);
  // Load older pages when scrolling to the bottom.
  if ("IntersectionObserver" in window) {
    const io = new IntersectionObserver(
      (entries) => {
        if (entries.some((e) => e.isIntersecting) && !els.loadOlder.hidden && !els.loadOlder.disabled) loadOlder();
      },
      { root: els.listScroll, rootMargin: "200px" },
    );
    io.observe(els.loadOlder);
  }

  els.filter.addEventListener("input", () => {
    els.filterClear.hidden = !els.filter.value;
    applyFilterNow();
  });
  els.filter.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") {
      ev.preventDefault();
      applyFilter();
    } else if (ev.key === "Escape") {
      ev.preventDefault();
      if (els.filter.value) {
        els.filter.value = "";
        applyFilter();
      } else els.filter.blur();
    } else if (ev.key === "ArrowDown") {
      ev.preventDefault();
      els.filter.blur();
      moveSelection(state.selectedId ? 0 : 1);
    }
  });
  els.filterClear.addEventListener("click", () => {
    els.filter.value = "";
    applyFilter();
    els.filter.focus();
  });
  $("#nomatch-clear").addEventListener("click", () => {
    els.filter.value = "";
    applyFilter();
  });
  $("#clear-all").addEventListener("click", clearAll);
  $("#help-btn").addEventListener("click", () => openDialog($("#help")));
  els.bannerRetry.addEventListener("click", () => live?.retryNow());

  document.addEventListener("keydown", onKey);
  window.addEventListener("hashchange", () => {
    const { x } = readHash();
    if (x && isId(x) && x !== state.selectedId) openExchange(x, { show: true });
  });
  // Keep "3 min ago" honest.
  setInterval(() => {
    if (state.shown && !document.hidden) {
      const t = els.detail.querySelector(".title-time");
      if (t) t.textContent = fmtAgo(state.shown.received_at_ms);
    }
  }, 30000);

  editor = setupEditor({ send: (d, options) => doReplay(d.id, options) });
}

function onKey(ev) {
  if (ev.defaultPrevented || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (dialogOpen()) return; // dialogs handle their keys (Escape closes them natively)
  const t = ev.target;
  if (t instanceof Element && t.closest("input, textarea, select, [contenteditable]")) return;
  const onControl = t instanceof Element && t.closest("button, a[href], summary");
  switch (ev.key) {
    case "ArrowDown":
    case "j":
      ev.preventDefault();
      moveSelection(1);
      break;
    case "ArrowUp":
    case "k":
      ev.preventDefault();
      moveSelection(-1);
      break;
    case "Enter":
      if (onControl) return;
      if (state.selectedId) {
        ev.preventDefault();
        openSoon.cancel();
        openExchange(state.selectedId, { show: true });
      }
      break;
    case "r":
      ev.preventDefault();
      replaySelected();
      break;
    case "e":
      ev.preventDefault();
      editSelected();
      break;
    case "c":
      if (state.shown?.replay_of) {
        ev.preventDefault();
        compareSelected();
      }
      break;
    case "/":
      ev.preventDefault();
      els.filter.focus();
      els.filter.select();
      break;
    case "?":
      ev.preventDefault();
      openDialog($("#help"));
      break;
    case "Escape":
      if (els.main.classList.contains("show-detail") && isNarrow()) {
        ev.preventDefault();
        hideDetailView();
      }
      break;
    default:
      break;
  }
}

// ---------------------------------------------------------------- live feed

function updateDownBanner() {
  if (!state.loadedOnce && !state.reconnectAt) return;
  const s = Math.max(0, Math.ceil((state.reconnectAt - Date.now()) / 1000));
  showBanner(
    s > 0
      ? `Lost the live connection to the agent (is relay-client still running?). Retrying in ${s} s…`
      : "Lost the live connection to the agent. Reconnecting…",
    true,
  );
}

let live = null;

function start() {
  wire();
  const { f } = readHash();
  if (f) {
    els.filter.value = f;
    state.filterText = f.trim();
    state.filter = parseFilter(state.filterText);
    renderFilterInfo();
  }
  showPlaceholder();
  updateEmpty();

  live = connectLive({
    onMessage(msg, first) {
      if (first) {
        state.wsUp = true;
        // The server subscribed before this hello: a list fetched now misses nothing.
        if (msg.type === "status") applyStatus(msg.status);
        reloadList({ keepCount: state.loadedOnce });
        if (msg.type !== "status") handleEvent(msg);
        return;
      }
      handleEvent(msg);
    },
    onDown(delay) {
      state.wsUp = false;
      state.reconnectAt = Date.now() + delay;
      setConn("reconnecting", "reconnecting…", "Lost the live connection to the agent's inspector");
      updateDownBanner();
    },
  });
  // Count down to the next attempt while the live feed is down.
  setInterval(() => {
    if (!state.wsUp) updateDownBanner();
  }, 1000);

  // Without a live feed after a moment, still show what is recorded.
  setTimeout(async () => {
    if (state.loadedOnce || state.loading) return;
    try {
      applyStatus(await api.getStatus());
    } catch {
      // the banner already says we are reconnecting
    }
    if (!state.loadedOnce && !state.loading) reloadList();
  }, 1500);
}

start();
