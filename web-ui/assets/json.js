// A small JSON parser that keeps what JSON.parse loses for display: key order
// (JSON.parse moves integer-like keys first), duplicate keys, and numbers as
// written (no rounding of 64-bit ids). Plus a pretty-printer and a collapsible
// tree renderer. Every value is shown as text.

import { h } from "./dom.js";

const MAX_DEPTH = 512;

export class JsonError extends Error {
  constructor(message, pos) {
    super(`${message} at position ${pos}`);
    this.pos = pos;
  }
}

const NUM = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;
const CTRL = /[\u0000-\u001f]/;
const STR_BODY = /(?:[^"\\\u0000-\u001f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*/y;

/**
 * Parses `text`. Nodes: `{t:"obj", entries:[[key, node]…]}`, `{t:"arr", items}`,
 * `{t:"str", v}`, `{t:"num", raw}`, `{t:"bool", v}`, `{t:"null"}`.
 * Throws JsonError.
 */
export function parseJson(text) {
  let i = 0;
  const ws = () => {
    for (;;) {
      const c = text.charCodeAt(i);
      if (c === 32 || c === 10 || c === 13 || c === 9) i++;
      else return;
    }
  };
  const fail = (msg) => {
    throw new JsonError(msg, i);
  };
  const str = () => {
    // at the opening quote; fast path for strings without escapes
    const close = text.indexOf('"', i + 1);
    if (close > 0) {
      const raw = text.slice(i + 1, close);
      if (!raw.includes("\\") && !CTRL.test(raw)) {
        i = close + 1;
        return raw;
      }
    }
    const start = i;
    STR_BODY.lastIndex = i + 1;
    STR_BODY.exec(text);
    const end = STR_BODY.lastIndex;
    if (text[end] !== '"') {
      i = end;
      fail(end >= text.length ? "Unterminated string" : "Invalid character in string");
    }
    i = end + 1;
    return JSON.parse(text.slice(start, i));
  };
  const value = (depth) => {
    if (depth > MAX_DEPTH) fail("Nesting too deep");
    ws();
    const c = text[i];
    if (c === "{") {
      i++;
      const entries = [];
      ws();
      if (text[i] === "}") {
        i++;
        return { t: "obj", entries };
      }
      for (;;) {
        ws();
        if (text[i] !== '"') fail("Expected a key");
        const k = str();
        ws();
        if (text[i] !== ":") fail("Expected ':'");
        i++;
        entries.push([k, value(depth + 1)]);
        ws();
        if (text[i] === ",") {
          i++;
          continue;
        }
        if (text[i] === "}") {
          i++;
          return { t: "obj", entries };
        }
        fail("Expected ',' or '}'");
      }
    }
    if (c === "[") {
      i++;
      const items = [];
      ws();
      if (text[i] === "]") {
        i++;
        return { t: "arr", items };
      }
      for (;;) {
        items.push(value(depth + 1));
        ws();
        if (text[i] === ",") {
          i++;
          continue;
        }
        if (text[i] === "]") {
          i++;
          return { t: "arr", items };
        }
        fail("Expected ',' or ']'");
      }
    }
    if (c === '"') return { t: "str", v: str() };
    if (c === "t" && text.startsWith("true", i)) {
      i += 4;
      return { t: "bool", v: true };
    }
    if (c === "f" && text.startsWith("false", i)) {
      i += 5;
      return { t: "bool", v: false };
    }
    if (c === "n" && text.startsWith("null", i)) {
      i += 4;
      return { t: "null" };
    }
    NUM.lastIndex = i;
    const m = NUM.exec(text);
    if (m && m[0].length) {
      i += m[0].length;
      return { t: "num", raw: m[0] };
    }
    fail(i >= text.length ? "Unexpected end of input" : "Unexpected character");
    return null;
  };
  const root = value(0);
  ws();
  if (i < text.length) fail("Unexpected data after the JSON value");
  return root;
}

/** Parses, or returns null when `text` is not JSON. */
export function tryParseJson(text) {
  if (typeof text !== "string") return null;
  const t = text.trimStart();
  if (!t) return null;
  try {
    return parseJson(text);
  } catch {
    return null;
  }
}

function scalarText(node) {
  switch (node.t) {
    case "str":
      return JSON.stringify(node.v);
    case "num":
      return node.raw;
    case "bool":
      return node.v ? "true" : "false";
    default:
      return "null";
  }
}

/** Pretty-prints a parsed node with `indent` spaces, keeping key order and numbers. */
export function stringifyPretty(node, indent = 2) {
  const out = [];
  const pad = (d) => " ".repeat(d * indent);
  const walk = (n, d) => {
    if (n.t === "obj") {
      if (!n.entries.length) return out.push("{}");
      out.push("{\n");
      n.entries.forEach(([k, v], idx) => {
        out.push(pad(d + 1), JSON.stringify(k), ": ");
        walk(v, d + 1);
        out.push(idx < n.entries.length - 1 ? ",\n" : "\n");
      });
      out.push(pad(d), "}");
    } else if (n.t === "arr") {
      if (!n.items.length) return out.push("[]");
      out.push("[\n");
      n.items.forEach((v, idx) => {
        out.push(pad(d + 1));
        walk(v, d + 1);
        out.push(idx < n.items.length - 1 ? ",\n" : "\n");
      });
      out.push(pad(d), "]");
    } else {
      out.push(scalarText(n));
    }
    return undefined;
  };
  walk(node, 0);
  return out.join("");
}

/** Pretty JSON text if `text` is JSON, else null. */
export function prettyJsonText(text) {
  const node = tryParseJson(text);
  return node ? stringifyPretty(node) : null;
}

function countNodes(node, limit) {
  let n = 0;
  const stack = [node];
  while (stack.length && n <= limit) {
    const x = stack.pop();
    n++;
    if (x.t === "obj") for (const [, v] of x.entries) stack.push(v);
    else if (x.t === "arr") for (const v of x.items) stack.push(v);
  }
  return n;
}

function pathPart(key) {
  return /^[A-Za-z_$][\w$]*$/.test(key) ? `.${key}` : `[${JSON.stringify(key)}]`;
}

/**
 * Renders a collapsible tree: `.json` root; lines `.json-line`; keys
 * `.json-key`; values `.json-string|number|bool|null`; each non-empty object
 * or array is a `.json-node` with a `.json-toggle` button.
 * Big documents start collapsed below depth `collapseDepth`.
 */
export function renderJsonTree(node) {
  const big = countNodes(node, 4000) > 4000;
  const collapseDepth = big ? 2 : Infinity;
  const root = h("div", { class: "json", role: "tree" });

  const punct = (s) => h("span", { class: "json-punct" }, s);

  const keyEl = (key, path) =>
    key === undefined
      ? null
      : [h("span", { class: "json-key", title: path }, JSON.stringify(key)), punct(": ")];

  const walk = (n, key, last, depth, path) => {
    const comma = last ? null : punct(",");
    if (n.t !== "obj" && n.t !== "arr") {
      const cls = n.t === "str" ? "json-string" : n.t === "num" ? "json-number" : n.t === "bool" ? "json-bool" : "json-null";
      return h("div", { class: "json-line" }, keyEl(key, path), h("span", { class: cls }, scalarText(n)), comma);
    }
    const isObj = n.t === "obj";
    const kids = isObj ? n.entries : n.items;
    const [open, close] = isObj ? ["{", "}"] : ["[", "]"];
    if (!kids.length) {
      return h("div", { class: "json-line" }, keyEl(key, path), punct(open + close), comma);
    }
    const collapsed = depth >= collapseDepth;
    const count = isObj ? `${kids.length} ${kids.length === 1 ? "key" : "keys"}` : `${kids.length} ${kids.length === 1 ? "item" : "items"}`;
    const children = h("div", { class: "json-children" });
    kids.forEach((kid, idx) => {
      const [k, v] = isObj ? kid : [undefined, kid];
      const childPath = isObj ? path + pathPart(k) : `${path}[${idx}]`;
      children.append(walk(v, k, idx === kids.length - 1, depth + 1, childPath));
    });
    return h(
      "div",
      { class: collapsed ? "json-node collapsed" : "json-node" },
      h(
        "div",
        { class: "json-line json-open-line" },
        h("button", {
          type: "button",
          class: "json-toggle",
          "aria-expanded": collapsed ? "false" : "true",
          "aria-label": `Collapse or expand ${count}`,
          title: `${count} — Alt-click: all below`,
        }),
        keyEl(key, path),
        punct(open),
        h("span", { class: "json-ellipsis" }, h("span", { class: "json-count" }, ` ${count} `), close, last ? "" : ","),
      ),
      children,
      h("div", { class: "json-line json-close" }, punct(close), comma),
    );
  };

  root.append(walk(node, undefined, true, 0, "$"));
  root.addEventListener("click", (ev) => {
    const toggle = ev.target.closest(".json-toggle, .json-ellipsis");
    if (!toggle || !root.contains(toggle)) return;
    const nodeEl = toggle.closest(".json-node");
    const collapse = !nodeEl.classList.contains("collapsed");
    setCollapsed(nodeEl, collapse);
    if (ev.altKey || ev.shiftKey) {
      for (const n of nodeEl.querySelectorAll(".json-node")) setCollapsed(n, collapse);
    }
  });
  return root;
}

function setCollapsed(nodeEl, collapse) {
  nodeEl.classList.toggle("collapsed", collapse);
  const btn = nodeEl.querySelector(":scope > .json-open-line > .json-toggle");
  if (btn) btn.setAttribute("aria-expanded", collapse ? "false" : "true");
}

/** Expands or collapses every node of a rendered tree. */
export function setAllCollapsed(root, collapse) {
  const nodes = root.querySelectorAll(".json-node");
  nodes.forEach((n, idx) => setCollapsed(n, collapse && idx > 0));
}
