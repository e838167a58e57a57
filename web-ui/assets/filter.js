// The filter box's little language, mapped onto the list API's parameters:
//   free text            → q (searched in request and response bodies)
//   method:POST          → method
//   status:4xx|404|failed → status
//   path:/stripe         → path (substring)
//   header:name[:value]  → header
//   tunnel:NAME          → tunnel
//   since:1h  until:…    → since / until (15m, 2h, 7d, 2026-11-28, unix seconds…)
// Values with spaces can be quoted: header:"x-event: a b" or "two words".

const KEYS = {
  method: "method",
  m: "method",
  status: "status",
  s: "status",
  path: "path",
  p: "path",
  header: "header",
  h: "header",
  tunnel: "tunnel",
  since: "since",
  until: "until",
  q: "q",
  text: "q",
  body: "q",
};

/** Splits on whitespace, keeping quoted runs together (quotes removed). */
export function tokenize(input) {
  const tokens = [];
  let cur = "";
  let inQuote = false;
  let has = false;
  for (const ch of String(input)) {
    if (ch === '"') {
      inQuote = !inQuote;
      has = true;
      continue;
    }
    if (!inQuote && /\s/.test(ch)) {
      if (has) tokens.push(cur);
      cur = "";
      has = false;
      continue;
    }
    cur += ch;
    has = true;
  }
  if (has) tokens.push(cur);
  return tokens;
}

/**
 * Parses the filter box. Returns `{ params, chips, warnings, active }`:
 * `params` for the API, `chips` ([key, value]) to show what applies.
 */
export function parseFilter(input) {
  const params = {};
  const free = [];
  const warnings = [];
  for (const token of tokenize(input)) {
    const m = /^([a-z]+):(.*)$/is.exec(token);
    const key = m ? KEYS[m[1].toLowerCase()] : undefined;
    if (!key) {
      free.push(token);
      continue;
    }
    let value = m[2].trim();
    if (!value) {
      warnings.push(`${m[1]}: needs a value`);
      continue;
    }
    if (key === "method") value = value.toUpperCase();
    if (key === "status") {
      value = value.toLowerCase();
      if (!/^(\d{3}|[1-5]xx|failed|error)$/.test(value)) {
        warnings.push(`status:${value}: use a code (404), a class (4xx) or failed`);
      }
    }
    if (key === "q") {
      free.push(value);
      continue;
    }
    if (params[key] !== undefined && params[key] !== value) {
      warnings.push(`only one ${key}: filter applies; using ${key}:${value}`);
    }
    params[key] = value;
  }
  if (free.length) params.q = free.join(" ");
  const order = ["method", "status", "path", "header", "tunnel", "since", "until", "q"];
  const chips = order.filter((k) => params[k] !== undefined).map((k) => [k === "q" ? "text" : k, params[k]]);
  return { params, chips, warnings, active: chips.length > 0 };
}

/** A stable key for a parsed filter (same key, same API query). */
export function filterKey(params) {
  return JSON.stringify(Object.keys(params).sort().map((k) => [k, params[k]]));
}
