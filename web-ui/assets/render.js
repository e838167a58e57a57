// List rows and the detail pane, built from exchanges with text nodes only.

import { h, icon, iconButton } from "./dom.js";
import {
  fmtAgo,
  fmtBytes,
  fmtDateTime,
  fmtDuration,
  fmtTime,
  isId,
  outcomeLabel,
  providerName,
  reasonPhrase,
  statusClass,
  statusLabel,
  verdictLabel,
  verdictSentence,
} from "./format.js";
import { noResponseBody, renderBodyView } from "./body.js";

const VERDICT_MARK = { valid: "✓", invalid: "✗", stale: "!" };

/** Link to another exchange (replay original, duplicate…). */
function exchangeLink(id, text, cls, title) {
  return h(
    "a",
    { class: cls, href: isId(id) ? `#x=${id}` : undefined, "data-goto": String(id), title: title || String(id) },
    text,
  );
}

/** The provider + signature verdict badge: `.sig[data-verdict]`. */
export function sigBadge(sig, provider) {
  const who = providerName(sig.provider || provider);
  return h(
    "span",
    { class: "sig", "data-verdict": String(sig.verdict), title: verdictSentence(sig) },
    VERDICT_MARK[sig.verdict] ? h("span", { class: "sig-mark", "aria-hidden": "true" }, VERDICT_MARK[sig.verdict]) : null,
    who ? h("span", { class: "sig-provider" }, who) : null,
    h("span", { class: "sig-verdict" }, verdictLabel(sig.verdict)),
  );
}

/** A badge for an attempt at a webhook the relay queued (sender got 202). */
export function queuedBadge(q) {
  if (!q) return null;
  if (q.interrupted) return h("span", { class: "queue-mark failed", title: queuedSentence(q) }, "interrupted");
  if (q.failed) return h("span", { class: "queue-mark failed", title: queuedSentence(q) }, `failed ${q.attempt}/${q.max_attempts}`);
  if (q.next_attempt_at_ms) return h("span", { class: "queue-mark retry", title: queuedSentence(q) }, `retry ${q.attempt}/${q.max_attempts}`);
  return h("span", { class: "queue-mark", title: queuedSentence(q) }, q.attempt > 1 ? `queued · try ${q.attempt}` : "queued");
}

function queuedSentence(q) {
  if (q.interrupted) return "The agent stopped while the app had this webhook; it was not sent again (at most once). Replay it if the app did not get it.";
  if (q.failed) return `Attempt ${q.attempt} of ${q.max_attempts} failed; no more attempts. Replay it when the app is fixed.`;
  if (q.next_attempt_at_ms) return `Attempt ${q.attempt} of ${q.max_attempts} failed; next attempt at ${new Date(q.next_attempt_at_ms).toLocaleTimeString()}.`;
  return `Delivered from the relay's queue (attempt ${q.attempt} of ${q.max_attempts}); the sender got 202.`;
}

/** One list row. */
export function renderRow(ex) {
  const cls = statusClass(ex);
  const meta = [];
  if (ex.signature) meta.push(sigBadge(ex.signature, ex.provider));
  else if (ex.provider) meta.push(h("span", { class: "provider" }, providerName(ex.provider)));
  if (ex.replay_of) meta.push(exchangeLink(ex.replay_of, "↻ replay", "replay-mark", `Replay of ${ex.replay_of}: open the original`));
  if (ex.duplicate_of) meta.push(exchangeLink(ex.duplicate_of, "dup", "dup-mark", `Duplicate of ${ex.duplicate_of}: the same delivery was seen before`));
  const q = queuedBadge(ex.queued);
  if (q) meta.push(q);
  if (ex.outcome !== "ok" && ex.error) meta.push(h("span", { class: "row-error" }, ex.error));
  const statusTitle = ex.response
    ? `${ex.response.status} ${reasonPhrase(ex.response.status)}`.trim()
    : `${outcomeLabel(ex.outcome)}${ex.error ? `: ${ex.error}` : ""}`;
  return h(
    "div",
    { class: "row", "data-id": ex.id, role: "option", "aria-selected": "false", title: ex.url },
    h("span", { class: "method", "data-method": ex.method }, ex.method),
    h("span", { class: "path" }, ex.path),
    h("span", { class: "status", "data-class": cls, title: statusTitle }, statusLabel(ex)),
    h("span", { class: "row-meta" }, meta),
    h(
      "span",
      { class: "row-timing" },
      h("span", { class: "duration", title: "Total time at the agent" }, fmtDuration(ex.duration?.total_ms)),
      h("span", { class: "time", title: fmtDateTime(ex.received_at_ms) }, fmtTime(ex.received_at_ms)),
    ),
  );
}

function headersTable(headers) {
  if (!headers || !headers.length) return h("p", { class: "muted small-text" }, "No headers");
  return h(
    "table",
    { class: "headers kv" },
    h(
      "tbody",
      null,
      headers.map((hd) =>
        h(
          "tr",
          null,
          h("td", { class: "name" }, hd.name),
          h(
            "td",
            { class: "value", title: hd.value_base64 ? `Not UTF-8; exact bytes (base64): ${hd.value_base64}` : undefined },
            hd.value,
            hd.value_base64 ? h("span", { class: "tag" }, "not UTF-8") : null,
          ),
        ),
      ),
    ),
  );
}

function queryTable(url) {
  const q = String(url).split("#")[0].split("?").slice(1).join("?");
  if (!q) return null;
  const pairs = q.split("&").filter(Boolean).map((p) => {
    const i = p.indexOf("=");
    const dec = (s) => {
      try {
        return decodeURIComponent(s.replace(/\+/g, " "));
      } catch {
        return s;
      }
    };
    return i < 0 ? [dec(p), ""] : [dec(p.slice(0, i)), dec(p.slice(i + 1))];
  });
  return h(
    "section",
    { class: "section" },
    h("h3", null, "Query parameters ", h("span", { class: "count" }, String(pairs.length))),
    h(
      "table",
      { class: "kv query-table" },
      h("tbody", null, pairs.map(([k, v]) => h("tr", null, h("td", { class: "name" }, k), h("td", { class: "value" }, v)))),
    ),
  );
}

const KNOWN_FIELDS = new Set([
  "id", "delivery_id", "tunnel", "received_at_relay_ms", "received_at_ms", "remote_addr", "method", "url",
  "path", "target", "request", "response", "outcome", "error", "duration", "provider", "signature",
  "replay_of", "duplicate_of", "queued", "request_body", "response_body",
]);

function copyable(text, label) {
  return h(
    "span",
    { class: "copyable" },
    h("code", null, text),
    h("button", { type: "button", class: "copy mini", "data-copy": text, "data-copy-label": label, "aria-label": `Copy ${label}`, title: `Copy ${label}` }, icon("copy")),
  );
}

function summary(d, ctx) {
  const items = [];
  const add = (label, ...value) => items.push(h("dt", null, label), h("dd", null, ...value));
  const dur = d.duration || {};
  if (d.response) {
    add("Status", h("span", { class: "status-text", "data-class": statusClass(d) }, `${d.response.status} ${reasonPhrase(d.response.status)}`.trim()));
  }
  add("Outcome", h("span", { class: d.outcome === "ok" ? "" : "bad" }, outcomeLabel(d.outcome)), d.error ? h("span", { class: "muted" }, ` — ${d.error}`) : null);
  add("Received", fmtDateTime(d.received_at_ms), h("span", { class: "muted" }, ` · ${fmtAgo(d.received_at_ms)}`));
  if (typeof d.received_at_relay_ms === "number") add("At the relay", fmtDateTime(d.received_at_relay_ms));
  const parts = [];
  if (typeof dur.local_app_ms === "number") parts.push(`local app ${fmtDuration(dur.local_app_ms)}`);
  if (typeof dur.relay_to_agent_ms === "number") parts.push(`relay → agent ${fmtDuration(dur.relay_to_agent_ms)}`);
  add("Duration", h("strong", null, fmtDuration(dur.total_ms)), parts.length ? h("span", { class: "muted" }, ` · ${parts.join(" · ")}`) : null);
  if (d.signature) {
    add("Signature", sigBadge(d.signature, d.provider), h("span", { class: "sig-sentence" }, verdictSentence(d.signature)));
  } else if (d.provider) {
    add("Provider", providerName(d.provider));
  }
  if (d.remote_addr) add("From", h("code", null, d.remote_addr));
  add("Tunnel", h("code", null, d.tunnel ?? ""), h("span", { class: "muted" }, " → "), h("code", null, d.target ?? ""));
  if (d.delivery_id) add("Delivery id", copyable(d.delivery_id, "delivery id"));
  add("Exchange id", copyable(d.id, "exchange id"));
  if (d.replay_of) add("Replay of", exchangeLink(d.replay_of, d.replay_of, "xlink", "Open the original"));
  if (d.duplicate_of) add("Duplicate of", exchangeLink(d.duplicate_of, d.duplicate_of, "xlink", "Open the first delivery"));
  if (d.queued) add("Queued", queuedBadge(d.queued), h("span", { class: "muted" }, ` ${queuedSentence(d.queued)}`));
  const replays = ctx.replaysOf?.(d.id) || [];
  if (replays.length) {
    add(
      "Replays",
      ...replays.map((r) =>
        exchangeLink(r.id, `↻ ${statusLabel(r)} · ${fmtTime(r.received_at_ms)}`, `xlink chip-link status-chip`, `Open replay ${r.id}`),
      ),
    );
  }
  for (const [k, v] of Object.entries(d)) {
    if (KNOWN_FIELDS.has(k) || v === null || v === undefined) continue;
    add(k.replace(/_/g, " "), h("code", null, typeof v === "string" ? v : JSON.stringify(v)));
  }
  return h("dl", { class: "summary" }, items);
}

function callouts(d) {
  const out = [];
  if (d.outcome !== "ok") {
    const hint =
      d.outcome === "local_app_unreachable"
        ? `Nothing answered at ${d.target}. Is your app running?`
        : d.outcome === "local_app_timeout"
          ? "Your app took too long to answer."
          : "";
    out.push(
      h(
        "div",
        { class: "callout callout-bad", role: "note" },
        h("strong", null, outcomeLabel(d.outcome)),
        d.error ? h("span", null, ` — ${d.error}`) : null,
        hint ? h("div", { class: "callout-hint" }, hint) : null,
      ),
    );
  }
  const v = d.signature?.verdict;
  if (v === "invalid" || v === "stale") {
    out.push(h("div", { class: "callout callout-warn", role: "note" }, h("strong", null, "Signature "), verdictSentence(d.signature)));
  }
  return out;
}

/**
 * Fills the detail pane for exchange detail `d`. `ctx`: `{ tab, view,
 * onTab(tab), onView(view), replaysOf(id) }`.
 */
export function renderDetail(d, ctx) {
  const cls = statusClass(d);
  const statusText = d.response ? `${d.response.status} ${reasonPhrase(d.response.status)}`.trim() : outcomeLabel(d.outcome);
  const actions = h(
    "div",
    { class: "actions", role: "toolbar", "aria-label": "Actions" },
    iconButton("replay", "Replay", { id: "replay", class: "primary", title: "Send this request to your app again (r)" }),
    iconButton("edit", "Edit & replay", { id: "edit-replay", title: "Change method, path, headers or body, then send (e)" }),
    d.replay_of ? iconButton("diff", "Compare", { id: "compare", "aria-label": "Compare with original", title: "Compare with the original, side by side (c)" }) : null,
    iconButton("terminal", "Copy as curl", { id: "copy-curl", title: "Copy a curl command that sends this request" }),
    iconButton("download", "HAR", { id: "download-har", title: "Download this exchange as HAR 1.2" }),
    iconButton("trash", "Delete", { id: "delete", class: "danger-ghost", title: "Delete this exchange" }),
  );

  const head = h(
    "div",
    { class: "detail-head" },
    h("button", { type: "button", id: "back", class: "back ghost", "aria-label": "Back to the list" }, icon("back"), h("span", { class: "btn-label" }, "All exchanges")),
    h(
      "div",
      { class: "title-row" },
      h("span", { class: "method method-badge", "data-method": d.method }, d.method),
      h("span", { class: "detail-status", "data-class": cls }, statusText),
      h(
        "div",
        { class: "detail-url" },
        h("span", { class: "url-text" }, d.url),
        h("button", { type: "button", class: "copy mini", "data-copy": d.url, "data-copy-label": "URL", "aria-label": "Copy URL", title: "Copy URL" }, icon("copy")),
      ),
      d.replay_of ? h("span", { class: "tag tag-replay" }, "↻ replay") : null,
      d.duplicate_of ? h("span", { class: "tag tag-dup" }, "duplicate") : null,
      h("span", { class: "title-time muted", title: fmtDateTime(d.received_at_ms) }, fmtAgo(d.received_at_ms)),
    ),
    actions,
  );

  const reqHeaders = d.request?.headers || [];
  const resHeaders = d.response?.headers || [];
  const tabs = [
    ["request", "Request", `${reqHeaders.length} headers · ${fmtBytes(d.request_body?.len ?? d.request?.body_len ?? 0)}`],
    ["response", "Response", d.response ? `${d.response.status} · ${fmtBytes(d.response_body?.len ?? d.response.body_len ?? 0)}` : "none"],
  ];
  const tabButtons = tabs.map(([key, label, meta]) =>
    h(
      "button",
      { type: "button", class: "tab", role: "tab", "data-tab": key, "aria-selected": "false" },
      h("span", { class: "tab-label" }, label),
      h("span", { class: "tab-meta" }, meta),
    ),
  );
  const panel = h("div", { class: "tab-panel", role: "tabpanel" });

  const showTab = (tab) => {
    for (const b of tabButtons) b.setAttribute("aria-selected", b.dataset.tab === tab ? "true" : "false");
    panel.dataset.tab = tab;
    const viewOpts = { view: ctx.view, onView: (v) => ctx.onView?.(v) };
    if (tab === "response") {
      if (!d.response) {
        panel.replaceChildren(
          h("section", { class: "section" }, noResponseBody(`No response: ${outcomeLabel(d.outcome).toLowerCase()}${d.error ? ` — ${d.error}` : ""}`)),
        );
        return;
      }
      panel.replaceChildren(
        h("section", { class: "section" }, h("h3", null, "Headers ", h("span", { class: "count" }, String(resHeaders.length))), headersTable(resHeaders)),
        h("section", { class: "section" }, h("h3", null, "Body"), renderBodyView(d.response_body, resHeaders, viewOpts)),
      );
    } else {
      panel.replaceChildren(
        queryTable(d.url) || "",
        h("section", { class: "section" }, h("h3", null, "Headers ", h("span", { class: "count" }, String(reqHeaders.length))), headersTable(reqHeaders)),
        h("section", { class: "section" }, h("h3", null, "Body"), renderBodyView(d.request_body, reqHeaders, viewOpts)),
      );
    }
  };
  for (const b of tabButtons) {
    b.addEventListener("click", () => {
      showTab(b.dataset.tab);
      ctx.onTab?.(b.dataset.tab);
    });
  }
  showTab(ctx.tab === "response" ? "response" : "request");

  return h(
    "div",
    { class: "detail-inner" },
    head,
    callouts(d),
    summary(d, ctx),
    h("div", { class: "tabs", role: "tablist" }, tabButtons),
    panel,
  );
}

/** The detail pane before anything is selected. */
export function renderDetailPlaceholder(message) {
  return h(
    "div",
    { class: "detail-placeholder" },
    h("div", { class: "placeholder-title" }, message || "Select an exchange to inspect it"),
    h(
      "ul",
      { class: "shortcuts-mini" },
      h("li", null, h("kbd", null, "↑"), h("kbd", null, "↓"), " move"),
      h("li", null, h("kbd", null, "Enter"), " open"),
      h("li", null, h("kbd", null, "r"), " replay"),
      h("li", null, h("kbd", null, "e"), " edit & replay"),
      h("li", null, h("kbd", null, "/"), " filter"),
      h("li", null, h("kbd", null, "?"), " all shortcuts"),
    ),
  );
}
