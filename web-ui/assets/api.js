// The inspector's JSON API (same origin).

/** An API failure: HTTP status (0 when unreachable), error code and message. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code);
    this.status = status;
    this.code = code;
  }
}

async function call(method, url, body) {
  const init = { method, cache: "no-store", headers: { accept: "application/json" } };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(url, init);
  } catch {
    throw new ApiError(0, "unreachable", "The agent's inspector is not reachable");
  }
  if (!res.ok) {
    let code = `http_${res.status}`;
    let message = `${res.status} ${res.statusText}`.trim();
    try {
      const j = await res.json();
      if (j && typeof j === "object") {
        code = j.error || code;
        message = j.message || j.error || message;
      }
    } catch {
      // not JSON: keep the status line
    }
    throw new ApiError(res.status, code, message);
  }
  return res;
}

const exchangeUrl = (id) => `/api/exchanges/${encodeURIComponent(id)}`;

/** `GET /api/status`. */
export async function getStatus() {
  return (await call("GET", "/api/status")).json();
}

/** `GET /api/exchanges` with filter params (empty ones dropped). */
export async function listExchanges(params) {
  const qs = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== "") qs.set(k, String(v));
  }
  const q = qs.toString();
  return (await call("GET", `/api/exchanges${q ? `?${q}` : ""}`)).json();
}

/** `GET /api/exchanges/{id}`: the exchange with both bodies. */
export async function getExchange(id) {
  return (await call("GET", exchangeUrl(id))).json();
}

export async function deleteExchange(id) {
  await call("DELETE", exchangeUrl(id));
}

export async function clearExchanges() {
  await call("DELETE", "/api/exchanges");
}

/** `POST /api/exchanges/{id}/replay`: resolves to the new exchange. */
export async function replayExchange(id, options = {}) {
  return (await call("POST", `${exchangeUrl(id)}/replay`, options)).json();
}

/** `GET /api/exchanges/{id}/export?format=…` as text. */
export async function exportExchange(id, format) {
  return (await call("GET", `${exchangeUrl(id)}/export?format=${encodeURIComponent(format)}`)).text();
}
