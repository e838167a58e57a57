// Pure formatting helpers: times, sizes, durations, status classes, labels.

const pad = (n, w = 2) => String(n).padStart(w, "0");

/** `14:03:22` (today) or `Nov 28 14:03:22` (another day), local time. */
export function fmtTime(ms) {
  if (typeof ms !== "number") return "";
  const d = new Date(ms);
  const hms = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  const now = new Date();
  if (d.toDateString() === now.toDateString()) return hms;
  const month = d.toLocaleString("en", { month: "short" });
  return `${month} ${d.getDate()} ${hms}`;
}

/** `2026-11-28 14:03:22.123` in local time. */
export function fmtDateTime(ms) {
  if (typeof ms !== "number") return "";
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

/** `just now`, `42 s ago`, `3 min ago`, `2 h ago`, `5 d ago`. */
export function fmtAgo(ms, now = Date.now()) {
  if (typeof ms !== "number") return "";
  const s = Math.round((now - ms) / 1000);
  if (s < 0) return "in the future";
  if (s < 5) return "just now";
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

/** `12 ms`, `1.24 s`, `2 min 3 s`. */
export function fmtDuration(ms) {
  if (typeof ms !== "number" || !Number.isFinite(ms)) return "—";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  const m = Math.floor(ms / 60000);
  return `${m} min ${Math.round((ms % 60000) / 1000)} s`;
}

/** `0 B`, `812 B`, `1.2 KB`, `3.4 MB`. */
export function fmtBytes(n) {
  if (typeof n !== "number") return "";
  if (n < 1024) return `${n} B`;
  const units = ["KB", "MB", "GB"];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v < 10 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

/** `2xx` | `3xx` | `4xx` | `5xx` | `failed`: the list's colour class. */
export function statusClass(ex) {
  const status = ex?.response?.status;
  if (ex?.outcome !== "ok" || typeof status !== "number") return "failed";
  if (status >= 500) return "5xx";
  if (status >= 400) return "4xx";
  if (status >= 300) return "3xx";
  if (status >= 200) return "2xx";
  return "failed";
}

const OUTCOME_SHORT = {
  ok: "ok",
  local_app_unreachable: "unreachable",
  local_app_timeout: "timeout",
  local_app_error: "app error",
  bad_request: "bad request",
  cancelled: "cancelled",
};

const OUTCOME_LONG = {
  ok: "Delivered",
  local_app_unreachable: "Local app unreachable",
  local_app_timeout: "Local app timed out",
  local_app_error: "Local app error",
  bad_request: "Request could not be built",
  cancelled: "Cancelled",
};

/** What the status column shows: the code, or a short failure word. */
export function statusLabel(ex) {
  const status = ex?.response?.status;
  if (typeof status === "number" && ex.outcome === "ok") return String(status);
  if (typeof status === "number") return `${status}`;
  return OUTCOME_SHORT[ex?.outcome] ?? String(ex?.outcome ?? "?");
}

export function outcomeLabel(outcome) {
  return OUTCOME_LONG[outcome] ?? String(outcome ?? "unknown");
}

const REASONS = {
  100: "Continue", 101: "Switching Protocols", 200: "OK", 201: "Created", 202: "Accepted",
  203: "Non-Authoritative Information", 204: "No Content", 205: "Reset Content", 206: "Partial Content",
  300: "Multiple Choices", 301: "Moved Permanently", 302: "Found", 303: "See Other", 304: "Not Modified",
  307: "Temporary Redirect", 308: "Permanent Redirect", 400: "Bad Request", 401: "Unauthorized",
  402: "Payment Required", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
  406: "Not Acceptable", 408: "Request Timeout", 409: "Conflict", 410: "Gone", 411: "Length Required",
  412: "Precondition Failed", 413: "Content Too Large", 415: "Unsupported Media Type",
  418: "I'm a teapot", 421: "Misdirected Request", 422: "Unprocessable Content", 425: "Too Early",
  426: "Upgrade Required", 428: "Precondition Required", 429: "Too Many Requests",
  431: "Request Header Fields Too Large", 451: "Unavailable For Legal Reasons",
  500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
  504: "Gateway Timeout", 505: "HTTP Version Not Supported",
};

export function reasonPhrase(status) {
  return REASONS[status] ?? "";
}

const PROVIDERS = {
  stripe: "Stripe",
  github: "GitHub",
  slack: "Slack",
  shopify: "Shopify",
  standard_webhooks: "Standard Webhooks",
  twilio: "Twilio",
  gitlab: "GitLab",
  twitch: "Twitch",
  paddle: "Paddle",
};

export function providerName(p) {
  if (!p) return "";
  return PROVIDERS[p] ?? String(p).replace(/_/g, " ");
}

const VERDICTS = {
  valid: "valid",
  invalid: "invalid",
  stale: "stale",
  unsigned: "unsigned",
  no_secret: "no secret",
};

export function verdictLabel(v) {
  return VERDICTS[v] ?? String(v ?? "");
}

/** A sentence about a signature verdict, for tooltips and the summary. */
export function verdictSentence(sig) {
  if (!sig) return "";
  const who = providerName(sig.provider);
  switch (sig.verdict) {
    case "valid":
      return `${who} signature is valid`;
    case "invalid":
      return `${who} signature is invalid${sig.reason ? `: ${sig.reason}` : ""}`;
    case "stale": {
      const age = typeof sig.age_s === "number" ? sig.age_s : null;
      const when = age === null ? "" : age < 0 ? ` (timestamp ${-age} s in the future)` : ` (timestamp ${age} s old)`;
      return `${who} signature matches but is outside the time tolerance${when}`;
    }
    case "unsigned":
      return "No known signature header";
    case "no_secret":
      return `${who} signature not checked: no secret configured (pass --verify ${sig.provider ?? "provider"}=SECRET to the agent)`;
    default:
      return String(sig.verdict ?? "");
  }
}

/** The value of the first header called `name` (lowercase), or undefined. */
export function headerValue(headers, name) {
  const h = (headers || []).find((x) => String(x.name).toLowerCase() === name);
  return h ? h.value : undefined;
}

/** Decodes standard base64 to bytes. */
export function base64ToBytes(b64) {
  if (!b64) return new Uint8Array(0);
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** Encodes bytes as standard base64. */
export function bytesToBase64(bytes) {
  let bin = "";
  const chunk = 0x8000;
  for (let i = 0; i < bytes.length; i += chunk) {
    bin += String.fromCharCode.apply(null, bytes.subarray(i, i + chunk));
  }
  return btoa(bin);
}

/** Whether `s` looks like an exchange id (a ULID). */
export function isId(s) {
  return typeof s === "string" && /^[0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{26}$/.test(s);
}

/** Quotes `s` for a POSIX shell. */
export function shellQuote(s) {
  return `'${String(s).replace(/'/g, "'\\''")}'`;
}
