// The compare view: a replay side by side with its original — status line,
// header differences and a line diff of the bodies.

import { $, h, icon, openDialog } from "./dom.js";
import { bodyTextForDiff } from "./body.js";
import { diffHeaders, diffLines, sideBySide } from "./diff.js";
import {
  fmtDateTime,
  fmtDuration,
  headerValue,
  outcomeLabel,
  reasonPhrase,
  statusClass,
  verdictLabel,
  providerName,
} from "./format.js";

/** Unchanged runs hiding more than FOLD lines are folded, keeping CONTEXT lines around changes. */
const FOLD = 8;
const CONTEXT = 3;

function statusSection(a, b) {
  const fields = [
    ["Method", (x) => x.method],
    ["URL", (x) => x.url],
    ["Status", (x) => (x.response ? `${x.response.status} ${reasonPhrase(x.response.status)}`.trim() : "—")],
    ["Outcome", (x) => outcomeLabel(x.outcome) + (x.error ? ` — ${x.error}` : "")],
    ["Duration", (x) => fmtDuration(x.duration?.total_ms)],
    ["Signature", (x) => (x.signature ? `${providerName(x.signature.provider || x.provider)} ${verdictLabel(x.signature.verdict)}`.trim() : "—")],
    ["Time", (x) => fmtDateTime(x.received_at_ms)],
  ];
  return h(
    "section",
    { class: "diff-section diff-status" },
    h("h3", null, "Summary"),
    h(
      "table",
      { class: "diff-table" },
      h("thead", null, h("tr", null, h("th", null, ""), h("th", null, "Original"), h("th", null, "Replay"))),
      h(
        "tbody",
        null,
        fields.map(([label, get]) => {
          const va = get(a);
          const vb = get(b);
          const same = va === vb || label === "Time" || label === "Duration";
          const cell = (v, x) =>
            label === "Status"
              ? h("td", { class: same ? "" : "changed" }, h("span", { class: "status-text", "data-class": statusClass(x) }, v))
              : h("td", { class: same ? "" : "changed" }, v);
          return h("tr", { class: same ? "" : "row-changed" }, h("th", { scope: "row" }, label), cell(va, a), cell(vb, b));
        }),
      ),
    ),
  );
}

function headersSection(title, before, after) {
  const rows = diffHeaders(before, after);
  const changed = rows.filter((r) => r.kind !== "same").length;
  const onlyChanges = h("input", { type: "checkbox", checked: changed > 0 });
  const table = h(
    "table",
    { class: "diff-table header-diff" },
    h("thead", null, h("tr", null, h("th", null, "Header"), h("th", null, "Original"), h("th", null, "Replay"))),
    h(
      "tbody",
      null,
      rows.map((r) =>
        h(
          "tr",
          { class: `hd-${r.kind}`, "data-kind": r.kind },
          h("td", { class: "name" }, h("span", { class: "hd-mark", "aria-hidden": "true" }, { same: " ", changed: "~", added: "+", removed: "−" }[r.kind]), r.name),
          h("td", { class: "before" }, r.before ?? ""),
          h(
            "td",
            { class: "after" },
            r.after ?? "",
            r.kind === "removed" && r.name === "content-length" ? h("span", { class: "muted" }, "recomputed on send, not recorded") : null,
          ),
        ),
      ),
    ),
  );
  const apply = () => table.classList.toggle("only-changes", onlyChanges.checked);
  onlyChanges.addEventListener("change", apply);
  apply();
  return h(
    "section",
    { class: "diff-section diff-headers" },
    h(
      "div",
      { class: "diff-section-head" },
      h("h3", null, title, " ", h("span", { class: "count" }, changed ? `${changed} changed` : "identical")),
      h("label", { class: "check small-text" }, onlyChanges, " Only differences"),
    ),
    table,
  );
}

function bodySection(title, bodyA, headersA, bodyB, headersB) {
  const a = bodyTextForDiff(bodyA, headerValue(headersA, "content-type"));
  const b = bodyTextForDiff(bodyB, headerValue(headersB, "content-type"));
  const rows = sideBySide(diffLines(a, b));
  const changes = rows.filter((r) => r.kind !== "same").length;
  const grid = h("div", { class: "diff-lines", role: "table" });

  const lineRow = (r) => {
    const left =
      r.left === null
        ? [h("span", { class: "ln" }, ""), h("span", { class: "diff-empty" }, "")]
        : [h("span", { class: "ln" }, String(r.left + 1)), h("span", { class: r.kind === "same" ? "diff-same" : "diff-del" }, a[r.left])];
    const right =
      r.right === null
        ? [h("span", { class: "ln" }, ""), h("span", { class: "diff-empty" }, "")]
        : [h("span", { class: "ln" }, String(r.right + 1)), h("span", { class: r.kind === "same" ? "diff-same" : "diff-add" }, b[r.right])];
    return h("div", { class: `diff-row diff-row-${r.kind}`, role: "row" }, left, right);
  };

  // Fold long unchanged runs.
  let i = 0;
  while (i < rows.length) {
    if (rows[i].kind !== "same") {
      grid.append(lineRow(rows[i]));
      i++;
      continue;
    }
    let j = i;
    while (j < rows.length && rows[j].kind === "same") j++;
    const run = rows.slice(i, j);
    const keepHead = i === 0 ? 0 : CONTEXT;
    const keepTail = j === rows.length ? 0 : CONTEXT;
    if (run.length - keepHead - keepTail > FOLD) {
      run.slice(0, keepHead).forEach((r) => grid.append(lineRow(r)));
      const hidden = run.slice(keepHead, run.length - keepTail);
      const btn = h("button", { type: "button", class: "diff-fold" }, `⋯ ${hidden.length} unchanged lines`);
      btn.addEventListener("click", () => btn.replaceWith(...hidden.map(lineRow)));
      grid.append(btn);
      run.slice(run.length - keepTail).forEach((r) => grid.append(lineRow(r)));
    } else {
      run.forEach((r) => grid.append(lineRow(r)));
    }
    i = j;
  }
  let summary;
  if (!a.length && !b.length) summary = "both empty";
  else if (!changes) summary = "identical";
  else summary = `${changes} changed ${changes === 1 ? "line" : "lines"}`;
  return h(
    "section",
    { class: "diff-section diff-body" },
    h("h3", null, title, " ", h("span", { class: "count" }, summary)),
    h("div", { class: "diff-cols-head" }, h("span", null, "Original"), h("span", null, "Replay")),
    a.length || b.length ? grid : h("p", { class: "muted" }, "No body on either side."),
  );
}

/** Shows the compare dialog for `replay` vs `original` (both details). */
export function showCompare(original, replay) {
  const dlg = $("#diff");
  const content = $("#diff-content");
  $("#diff-subtitle").textContent = `${original.id} → ${replay.id}`;
  content.replaceChildren(
    statusSection(original, replay),
    headersSection("Request headers", original.request?.headers, replay.request?.headers),
    bodySection("Request body", original.request_body, original.request?.headers, replay.request_body, replay.request?.headers),
    original.response || replay.response
      ? headersSection("Response headers", original.response?.headers, replay.response?.headers)
      : null,
    original.response || replay.response
      ? bodySection("Response body", original.response_body, original.response?.headers, replay.response_body, replay.response?.headers)
      : null,
  );
  openDialog(dlg);
  content.scrollTop = 0;
}

/** Shows the compare dialog with an error (e.g. the original was deleted). */
export function showCompareError(message) {
  const dlg = $("#diff");
  $("#diff-subtitle").textContent = "";
  $("#diff-content").replaceChildren(h("div", { class: "callout callout-bad" }, icon("diff"), " ", message));
  openDialog(dlg);
}
