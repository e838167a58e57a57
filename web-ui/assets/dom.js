// DOM helpers. Every string that reaches the page goes through a text node or
// an attribute value: nothing here ever parses HTML.

/**
 * Creates an element. `attrs` keys are attribute names (`class`, `data-*`,
 * `aria-*`, …) except `on*`, which must be functions and become listeners.
 * Children: nodes, strings (text nodes), arrays, or null/false (skipped).
 */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs) setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) {
      if (typeof v === "function") el.addEventListener(k.slice(2), v);
      continue;
    }
    if (k === "style") continue; // never: the CSP forbids inline styles
    if (k === "hidden" || k === "disabled" || k === "checked" || k === "open" || k === "readonly") {
      if (v) el.setAttribute(k, "");
      continue;
    }
    if (k === "value") {
      el.value = v;
      continue;
    }
    el.setAttribute(k, v === true ? "" : String(v));
  }
}

export function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else if (c instanceof Node) el.append(c);
    else el.append(document.createTextNode(String(c)));
  }
  return el;
}

export const $ = (sel, root = document) => root.querySelector(sel);
export const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

const SVG = "http://www.w3.org/2000/svg";

// Small 16×16 stroke icons (our own markup, never data).
const ICONS = {
  copy: ["M5.5 5.5h7v8h-7z", "M3.5 10.5v-8h7"],
  replay: ["M2.8 8a5.2 5.2 0 1 0 1.6-3.8", "M2.5 2.2v3h3"],
  edit: ["M10.5 2.5l3 3-7.5 7.5H3v-3z", "M9 4l3 3"],
  trash: ["M2.5 4.5h11", "M6 4.5V3h4v1.5", "M4 4.5l.7 9h6.6l.7-9", "M6.7 7v4.5M9.3 7v4.5"],
  download: ["M8 2.5v8", "M4.8 7.5L8 10.7l3.2-3.2", "M3 13.5h10"],
  terminal: ["M2.5 3h11v10h-11z", "M5 6.5l2 1.5-2 1.5", "M8.5 10h2.5"],
  diff: ["M5.5 2.5v11", "M10.5 2.5v11", "M2.5 6h6", "M7.5 10h6"],
  back: ["M13 8H3.5", "M7.5 4L3.5 8l4 4"],
  close: ["M4 4l8 8", "M12 4l-8 8"],
  search: ["M7 3a4 4 0 1 0 0 8a4 4 0 1 0 0-8z", "M10 10l3.5 3.5"],
  check: ["M3 8.5l3 3 7-7"],
  keyboard: ["M1.5 4.5h13v7h-13z", "M4 7h.01M6.5 7h.01M9 7h.01M11.5 7h.01M5 9.3h6"],
  link: ["M6.5 9.5l3-3", "M7.5 4.5l1-1a2.8 2.8 0 0 1 4 4l-1 1", "M8.5 11.5l-1 1a2.8 2.8 0 0 1-4-4l1-1"],
};

/** An inline SVG icon (decorative; give its button an aria-label). */
export function icon(name) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 16 16");
  svg.setAttribute("width", "16");
  svg.setAttribute("height", "16");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("class", "icon");
  for (const d of ICONS[name] || []) {
    const p = document.createElementNS(SVG, "path");
    p.setAttribute("d", d);
    svg.append(p);
  }
  return svg;
}

/** A button with an icon and optional visible label. */
export function iconButton(name, label, attrs = {}, showLabel = true) {
  return h(
    "button",
    { type: "button", title: attrs.title ?? label, "aria-label": label, ...attrs },
    icon(name),
    showLabel ? h("span", { class: "btn-label" }, label) : null,
  );
}

let toastTimer = 0;

/** A short notice at the bottom of the window. */
export function toast(message, kind = "info") {
  const box = document.getElementById("toasts");
  if (!box) return;
  const t = h("div", { class: `toast toast-${kind}`, role: kind === "error" ? "alert" : "status" }, message);
  box.append(t);
  while (box.children.length > 4) box.firstElementChild.remove();
  clearTimeout(toastTimer);
  setTimeout(() => t.classList.add("leaving"), kind === "error" ? 5200 : 2600);
  setTimeout(() => t.remove(), kind === "error" ? 5600 : 3000);
}

/**
 * Copies `text` to the clipboard; when the clipboard is unavailable, shows it
 * in a dialog with the text selected instead.
 */
export async function copyText(text, what = "Text") {
  try {
    if (!navigator.clipboard?.writeText) throw new Error("no clipboard");
    await navigator.clipboard.writeText(text);
    toast(`${what} copied to the clipboard`, "ok");
    return true;
  } catch {
    showCopyDialog(text, what);
    return false;
  }
}

export function showCopyDialog(text, what) {
  const dlg = document.getElementById("copy-dialog");
  const area = document.getElementById("copy-text");
  document.getElementById("copy-title").textContent = `Copy ${what.toLowerCase()}`;
  area.value = text;
  openDialog(dlg);
  area.focus();
  area.select();
}

/** Opens a <dialog> modally (it gets the `open` attribute). */
export function openDialog(dlg) {
  if (!dlg.open) {
    if (typeof dlg.showModal === "function") dlg.showModal();
    else dlg.setAttribute("open", "");
  }
}

export function closeDialog(dlg) {
  if (dlg.open) {
    if (typeof dlg.close === "function") dlg.close();
    else dlg.removeAttribute("open");
  }
}

/** Whether any modal dialog is open. */
export function dialogOpen() {
  return !!document.querySelector("dialog[open]");
}

/** Asks a yes/no question in the confirm dialog; resolves to a boolean. */
export function confirmDialog(title, message, okLabel = "OK") {
  const dlg = document.getElementById("confirm-dialog");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-message").textContent = message;
  const ok = document.getElementById("confirm-ok");
  ok.textContent = okLabel;
  return new Promise((resolve) => {
    let answer = false;
    const onOk = () => {
      answer = true;
      closeDialog(dlg);
    };
    const onClose = () => {
      ok.removeEventListener("click", onOk);
      dlg.removeEventListener("close", onClose);
      resolve(answer);
    };
    ok.addEventListener("click", onOk);
    dlg.addEventListener("close", onClose);
    openDialog(dlg);
    ok.focus();
  });
}

/** `fn` delayed until `ms` pass without another call; `.cancel()`, `.flush()`. */
export function debounce(fn, ms) {
  let timer = 0;
  let args = null;
  const d = (...a) => {
    args = a;
    clearTimeout(timer);
    timer = setTimeout(() => {
      timer = 0;
      fn(...args);
    }, ms);
  };
  d.cancel = () => {
    clearTimeout(timer);
    timer = 0;
  };
  d.pending = () => timer !== 0;
  return d;
}

/** Triggers a download of `blob` as `filename`. */
export function downloadBlob(blob, filename) {
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: filename, class: "hidden-link" });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
