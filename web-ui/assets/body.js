// The body viewer: Pretty (JSON tree, form table, indented XML), Raw (text)
// and Hex (offset, hex, ASCII). Webhook bytes only ever become text nodes.

import { h, icon, copyText } from "./dom.js";
import { base64ToBytes, fmtBytes, headerValue } from "./format.js";
import { parseJson, renderJsonTree, setAllCollapsed, stringifyPretty, tryParseJson } from "./json.js";
import { prettyXmlLines, prettyXmlText } from "./xml.js";

/** Bodies above this size are shown in part until asked. */
const RAW_LIMIT = 512 * 1024;
const HEX_PAGE = 16 * 1024;
const TREE_LIMIT = 2 * 1024 * 1024;

const FORM_SNIFF = /^[^=&\s]+=[^&\s]*(?:&[^=&\s]+=[^&\s]*)*$/;

/**
 * What a body is: "empty" | "binary" | "json" | "form" | "xml" | "text".
 */
export function bodyKind(body, contentType) {
  if (!body || body.len === 0) return "empty";
  if (typeof body.text !== "string") return "binary";
  const ct = String(contentType || "").toLowerCase();
  const t = body.text.trimStart();
  if (/[/+]json\b/.test(ct) || ((ct === "" || ct.startsWith("text/plain")) && /^[{[]/.test(t) && tryParseJson(body.text))) return "json";
  if (ct.includes("application/x-www-form-urlencoded") || (ct === "" && FORM_SNIFF.test(body.text.trim()))) return "form";
  if (/[/+]xml\b/.test(ct) || t.startsWith("<?xml")) return "xml";
  return "text";
}

function decodeForm(s) {
  try {
    return decodeURIComponent(s.replace(/\+/g, " "));
  } catch {
    return s;
  }
}

/** `a=1&b=2` → [[name, value]…] (decoded; repeated names kept). */
export function parseForm(text) {
  return text
    .split("&")
    .filter((p) => p.length)
    .map((p) => {
      const i = p.indexOf("=");
      return i < 0 ? [decodeForm(p), ""] : [decodeForm(p.slice(0, i)), decodeForm(p.slice(i + 1))];
    });
}

/** Hex dump lines: `00000000  7b 22 69 64 …  |{"id…|`. */
export function hexDump(bytes, start = 0, end = bytes.length) {
  const lines = [];
  for (let off = start; off < end; off += 16) {
    let hex = "";
    let ascii = "";
    for (let i = 0; i < 16; i++) {
      if (i === 8) hex += " ";
      if (off + i < end) {
        const b = bytes[off + i];
        hex += `${b.toString(16).padStart(2, "0")} `;
        ascii += b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : ".";
      } else {
        hex += "   ";
      }
    }
    lines.push(`${off.toString(16).padStart(8, "0")}  ${hex} |${ascii}|`);
  }
  return lines;
}

/** The body as text lines for the compare view: pretty when we know how. */
export function bodyTextForDiff(body, contentType) {
  if (!body || body.len === 0) return [];
  const kind = bodyKind(body, contentType);
  if (kind === "binary") return hexDump(base64ToBytes(body.base64));
  if (kind === "json") {
    const node = tryParseJson(body.text);
    if (node) return stringifyPretty(node).split("\n");
  }
  if (kind === "form") return parseForm(body.text).map(([k, v]) => `${k} = ${v}`);
  if (kind === "xml") return prettyXmlText(body.text).split("\n");
  return body.text.split("\n");
}

/** Text of a body (lossy for binary). */
function lossyText(body) {
  if (typeof body.text === "string") return body.text;
  return new TextDecoder("utf-8", { fatal: false }).decode(base64ToBytes(body.base64));
}

/**
 * Renders the viewer. `opts`: `{ view, onView(view), label }`. `view` is the
 * preferred view; binary bodies fall back to hex.
 * Returns `.body-view`.
 */
export function renderBodyView(body, headers, opts = {}) {
  const contentType = headerValue(headers, "content-type") || "";
  const kind = bodyKind(body, contentType);
  const root = h("div", { class: "body-view", "data-kind": kind });

  if (!body) {
    root.append(h("div", { class: "body-empty" }, opts.missing || "No body"));
    return root;
  }

  let view = opts.view || "pretty";
  if (kind === "binary" && !opts.explicit) view = "hex";
  if (kind === "binary" && view === "pretty") view = "hex";
  if (kind === "empty") view = "raw";

  const content = h("div", { class: "body-content" });
  const extra = h("span", { class: "body-extra" });
  const viewButtons = ["pretty", "raw", "hex"].map((v) =>
    h(
      "button",
      {
        type: "button",
        "data-view": v,
        class: "seg",
        "aria-pressed": "false",
        disabled: (v === "pretty" && kind === "binary") || kind === "empty",
        title: v === "pretty" ? prettyTitle(kind) : v === "raw" ? "The body as text" : "Offset, hex bytes and ASCII",
      },
      v === "pretty" ? "Pretty" : v === "raw" ? "Raw" : "Hex",
    ),
  );

  const info = [];
  if (contentType) info.push(contentType.split(";")[0].trim());
  info.push(fmtBytes(body.len));
  if (kind === "binary") info.push("binary");

  const copyBtn = h(
    "button",
    { type: "button", class: "ghost small", title: "Copy the body (text; base64 when binary)", disabled: kind === "empty" },
    icon("copy"),
    h("span", { class: "btn-label" }, "Copy"),
  );
  copyBtn.addEventListener("click", () => {
    if (typeof body.text === "string") copyText(body.text, "Body");
    else copyText(body.base64, "Body (base64)");
  });

  root.append(
    h(
      "div",
      { class: "body-toolbar" },
      h("div", { class: "segmented", role: "group", "aria-label": "Body view" }, viewButtons),
      extra,
      h("span", { class: "body-info" }, info.join(" · ")),
      copyBtn,
    ),
    content,
  );

  const show = (v) => {
    view = v;
    for (const b of viewButtons) b.setAttribute("aria-pressed", b.dataset.view === v ? "true" : "false");
    extra.replaceChildren();
    content.replaceChildren();
    root.dataset.view = v;
    if (kind === "empty") {
      content.append(h("div", { class: "body-empty" }, "Empty body"));
      return;
    }
    if (v === "hex") renderHex(content, body);
    else if (v === "raw") renderRaw(content, body);
    else renderPretty(content, extra, body, kind);
  };
  for (const b of viewButtons) {
    b.addEventListener("click", () => {
      show(b.dataset.view);
      opts.onView?.(b.dataset.view);
    });
  }
  show(view);
  return root;
}

function prettyTitle(kind) {
  switch (kind) {
    case "json":
      return "JSON as a collapsible tree";
    case "form":
      return "Form fields as a table";
    case "xml":
      return "Indented XML";
    case "binary":
      return "Binary: no pretty view";
    default:
      return "No structure detected: shown as text";
  }
}

function truncatedNote(shown, total, onMore) {
  const more = h("button", { type: "button", class: "link" }, "Show everything");
  more.addEventListener("click", onMore);
  return h("div", { class: "body-note" }, `Showing the first ${fmtBytes(shown)} of ${fmtBytes(total)}. `, more);
}

function renderRaw(content, body, all = false) {
  const text = lossyText(body);
  const notes = [];
  if (typeof body.text !== "string") {
    notes.push(h("div", { class: "body-note" }, "Not valid UTF-8: shown with replacement characters. Hex shows the exact bytes."));
  }
  const cut = !all && text.length > RAW_LIMIT;
  const pre = h("pre", { class: "raw" }, cut ? text.slice(0, RAW_LIMIT) : text);
  content.replaceChildren(...notes, pre);
  if (cut) content.append(truncatedNote(RAW_LIMIT, text.length, () => renderRaw(content, body, true)));
}

function renderHex(content, body) {
  const bytes = base64ToBytes(body.base64);
  const pre = h("pre", { class: "hex" });
  const header = h("div", { class: "hex-head" }, "offset    00 01 02 03 04 05 06 07  08 09 0a 0b 0c 0d 0e 0f  ascii");
  content.replaceChildren(header, pre);
  let shown = 0;
  const more = () => {
    const end = Math.min(bytes.length, shown + HEX_PAGE);
    pre.append(document.createTextNode(hexDump(bytes, shown, end).join("\n") + (end < bytes.length ? "\n" : "")));
    shown = end;
    content.querySelector(".body-note")?.remove();
    if (shown < bytes.length) {
      const btn = h("button", { type: "button", class: "link" }, `Show ${fmtBytes(Math.min(HEX_PAGE, bytes.length - shown))} more`);
      btn.addEventListener("click", more);
      content.append(h("div", { class: "body-note" }, `${fmtBytes(shown)} of ${fmtBytes(bytes.length)} shown. `, btn));
    }
  };
  more();
}

function renderPretty(content, extra, body, kind) {
  if (kind === "json") {
    if (body.text.length > TREE_LIMIT) {
      const node = tryParseJson(body.text);
      content.append(
        h("div", { class: "body-note" }, "Large document: pretty-printed without the collapsible tree."),
        h("pre", { class: "raw" }, node ? stringifyPretty(node) : body.text),
      );
      return;
    }
    let node;
    try {
      node = parseJson(body.text);
    } catch (err) {
      content.append(
        h("div", { class: "body-note warn" }, `Not valid JSON (${err.message}): shown as text.`),
        h("pre", { class: "raw" }, body.text),
      );
      return;
    }
    const tree = renderJsonTree(node);
    const expand = h("button", { type: "button", class: "ghost small" }, "Expand all");
    const collapse = h("button", { type: "button", class: "ghost small" }, "Collapse all");
    expand.addEventListener("click", () => setAllCollapsed(tree, false));
    collapse.addEventListener("click", () => setAllCollapsed(tree, true));
    extra.append(expand, collapse);
    content.append(tree);
    return;
  }
  if (kind === "form") {
    const pairs = parseForm(body.text);
    const table = h(
      "table",
      { class: "kv form-table" },
      h("thead", null, h("tr", null, h("th", null, "Field"), h("th", null, "Value"))),
      h(
        "tbody",
        null,
        pairs.map(([k, v]) => {
          // Some senders (Slack) put a JSON document in a form field.
          const node = /^\s*[{[]/.test(v) ? tryParseJson(v) : null;
          return h("tr", null, h("td", { class: "name" }, k), h("td", { class: "value" }, node ? renderJsonTree(node) : v));
        }),
      ),
    );
    content.append(table);
    return;
  }
  if (kind === "xml") {
    const pre = h("pre", { class: "xml" });
    const lines = prettyXmlLines(body.text);
    lines.forEach((line, i) => {
      if (line.depth) pre.append(document.createTextNode("  ".repeat(line.depth)));
      for (const [cls, text] of line.parts) {
        pre.append(cls ? h("span", { class: cls }, text) : document.createTextNode(text));
      }
      if (i < lines.length - 1) pre.append(document.createTextNode("\n"));
    });
    content.append(pre);
    return;
  }
  renderRaw(content, body);
}

/** A compact message used when a part has no body at all. */
export function noResponseBody(message) {
  const root = h("div", { class: "body-view", "data-kind": "none" });
  root.append(h("div", { class: "body-empty" }, message));
  return root;
}
