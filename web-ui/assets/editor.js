// The edit-and-replay dialog: prefilled from an exchange, turned into
// ReplayOptions (only what changed), sent, and errors shown inline.

import { $, closeDialog, openDialog } from "./dom.js";
import { providerName, verdictSentence } from "./format.js";
import { tryParseJson, stringifyPretty } from "./json.js";

/** Headers the editor leaves out: the HTTP client recomputes them on send. */
const HIDDEN = new Set(["content-length"]);

/** `Name: value` lines → [[lowercase name, value]…], or throws with the line number. */
export function parseHeaderLines(text) {
  const out = [];
  String(text)
    .split("\n")
    .forEach((line, i) => {
      const l = line.replace(/\r$/, "");
      if (!l.trim() || l.trimStart().startsWith("#")) return;
      const c = l.indexOf(":");
      if (c <= 0) throw new Error(`Header line ${i + 1} is not "Name: value": ${l}`);
      const name = l.slice(0, c).trim();
      if (!/^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/.test(name)) throw new Error(`Header line ${i + 1}: "${name}" is not a valid header name`);
      out.push([name.toLowerCase(), l.slice(c + 1).trim(), name]);
    });
  return out;
}

/**
 * What to send: set_headers for every name whose values changed or is new,
 * remove_headers for every name that disappeared. Repeated headers are sent
 * as one comma-joined value (the API sets one value per name).
 */
export function headerEdits(original, editedText) {
  const edited = parseHeaderLines(editedText);
  const group = (pairs) => {
    const m = new Map();
    for (const [n, v, display] of pairs) {
      if (!m.has(n)) m.set(n, { values: [], display: display || n });
      m.get(n).values.push(v);
    }
    return m;
  };
  const before = group(original.filter((hd) => !HIDDEN.has(hd.name.toLowerCase())).map((hd) => [hd.name.toLowerCase(), String(hd.value).trim()]));
  const after = group(edited);
  const set_headers = [];
  const remove_headers = [];
  for (const [name, { values, display }] of after) {
    const old = before.get(name);
    if (old && old.values.length === values.length && old.values.every((v, i) => v === values[i])) continue;
    set_headers.push(`${display}: ${values.join(", ")}`);
  }
  for (const name of before.keys()) {
    if (!after.has(name)) remove_headers.push(name);
  }
  return { set_headers, remove_headers };
}

/** Wires the dialog once; `open(detail)` fills and shows it. */
export function setupEditor({ send }) {
  const dlg = $("#editor");
  const method = $("#edit-method");
  const path = $("#edit-path");
  const headers = $("#edit-headers");
  const body = $("#edit-body");
  const resign = $("#edit-resign");
  const to = $("#edit-to");
  const err = $("#edit-error");
  const sendBtn = $("#edit-send");
  const bodyNote = $("#edit-body-note");
  const resignNote = $("#edit-resign-note");
  const source = $("#edit-source");
  const format = $("#edit-format");
  let current = null;
  let prefilledBody = "";
  let binary = false;

  const showError = (msg) => {
    err.textContent = msg || "";
    err.hidden = !msg;
  };

  const bodyChanged = () => body.value !== prefilledBody;

  const updateNotes = () => {
    if (!current) return;
    const notes = [];
    if (binary) notes.push("Binary body, as base64. Left unchanged, the exact bytes are sent.");
    const node = !binary && body.value.trim() ? tryParseJson(body.value) : null;
    format.hidden = binary || !node;
    if (!binary && /^\s*[{[]/.test(body.value) && !node) notes.push("Not valid JSON (sent as typed).");
    else if (bodyChanged()) notes.push("Edited: sent exactly as typed.");
    else notes.push("Unchanged: the original bytes are sent.");
    bodyNote.textContent = notes.join(" ");
    const sig = current.signature;
    let rn = "";
    if (!current.provider) rn = "No signature provider detected on this request.";
    else if (sig?.verdict === "no_secret") rn = verdictSentence(sig);
    else if (bodyChanged() && !resign.checked) rn = `The body changed: the original ${providerName(current.provider)} signature will no longer match. Tick Re-sign to sign it again.`;
    else rn = `Refreshes the timestamp and signs with the agent's ${providerName(current.provider)} secret.`;
    resignNote.textContent = rn;
  };

  body.addEventListener("input", updateNotes);
  resign.addEventListener("change", updateNotes);
  format.addEventListener("click", () => {
    const node = tryParseJson(body.value);
    if (node) {
      body.value = stringifyPretty(node);
      updateNotes();
    }
  });

  const doSend = async () => {
    if (!current) return;
    showError("");
    let options;
    try {
      options = buildOptions();
    } catch (e) {
      showError(e.message);
      return;
    }
    sendBtn.disabled = true;
    sendBtn.classList.add("busy");
    try {
      await send(current, options);
      closeDialog(dlg);
    } catch (e) {
      showError(e.message || String(e));
    } finally {
      sendBtn.disabled = false;
      sendBtn.classList.remove("busy");
    }
  };

  const buildOptions = () => {
    const o = {};
    const m = method.value.trim().toUpperCase();
    if (!m) throw new Error("The method is empty");
    if (!/^[!#$%&'*+\-.^_`|~0-9A-Z]+$/.test(m)) throw new Error(`"${m}" is not a valid method`);
    if (m !== current.method.toUpperCase()) o.method = m;
    const p = path.value.trim();
    if (!p) throw new Error("The path is empty (use / for the root)");
    if (/\s/.test(p)) throw new Error("The path cannot contain spaces (percent-encode them as %20)");
    if (p !== current.path) o.path = p;
    const { set_headers, remove_headers } = headerEdits(current.request?.headers || [], headers.value);
    if (set_headers.length) o.set_headers = set_headers;
    if (remove_headers.length) o.remove_headers = remove_headers;
    if (bodyChanged()) {
      if (binary) {
        const b64 = body.value.replace(/\s+/g, "");
        if (!/^[A-Za-z0-9+/]*={0,2}$/.test(b64) || b64.length % 4 === 1) throw new Error("The body is not valid base64");
        o.body_base64 = b64;
      } else {
        o.body = body.value;
      }
    }
    if (resign.checked && !resign.disabled) o.resign = true;
    const target = to.value.trim();
    if (target) {
      if (!/^https?:\/\/[^\s]+$/i.test(target)) throw new Error("Send to must be a URL like http://127.0.0.1:4000");
      o.to = target;
    }
    return o;
  };

  sendBtn.addEventListener("click", doSend);
  dlg.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      doSend();
    }
  });
  dlg.addEventListener("close", () => {
    current = null;
  });

  return {
    open(detail, defaultTarget) {
      current = detail;
      showError("");
      source.textContent = `${detail.method} ${detail.path}`;
      method.value = detail.method;
      path.value = detail.path;
      to.value = "";
      to.placeholder = defaultTarget ? `Default: ${defaultTarget} (the agent's target)` : "Default: the agent's target";
      headers.value = (detail.request?.headers || [])
        .filter((hd) => !HIDDEN.has(hd.name.toLowerCase()))
        .map((hd) => `${hd.name}: ${hd.value}`)
        .join("\n");
      const rb = detail.request_body;
      binary = !!rb && rb.len > 0 && typeof rb.text !== "string";
      if (binary) prefilledBody = rb.base64;
      else {
        const text = rb?.text ?? "";
        const node = text.trim() ? tryParseJson(text) : null;
        prefilledBody = node ? stringifyPretty(node) : text;
        // JSON already formatted exactly like ours is "unchanged" either way.
      }
      body.value = prefilledBody;
      body.classList.toggle("mono-b64", binary);
      $("#edit-body-label").textContent = binary ? "Body (base64)" : "Body";
      resign.checked = false;
      resign.disabled = !detail.provider;
      $("#edit-resign-provider").textContent = detail.provider ? ` (${providerName(detail.provider)})` : "";
      updateNotes();
      openDialog(dlg);
      body.scrollTop = 0;
      method.focus();
      method.select?.();
    },
  };
}
