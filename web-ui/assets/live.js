// The live feed: a WebSocket to /api/live that reconnects with backoff.

const MIN_DELAY = 500;
const MAX_DELAY = 15000;

/**
 * Connects and keeps connecting. Callbacks:
 * - `onMessage(msg, first)`: each JSON message; `first` is true for the first
 *   message of each connection (the server's status hello, sent once it has
 *   subscribed: a list fetched after it misses nothing).
 * - `onDown(delayMs)`: the socket closed; the next attempt is in `delayMs`.
 * Returns `{ retryNow() }`.
 */
export function connectLive({ onMessage, onDown }) {
  let ws = null;
  let attempt = 0;
  let timer = 0;

  function open() {
    timer = 0;
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    let socket;
    try {
      socket = new WebSocket(`${proto}//${location.host}/api/live`);
    } catch {
      schedule();
      return;
    }
    ws = socket;
    let first = true;
    socket.addEventListener("message", (ev) => {
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (!msg || typeof msg !== "object") return;
      const isFirst = first;
      first = false;
      attempt = 0;
      onMessage(msg, isFirst);
    });
    socket.addEventListener("close", () => {
      if (ws !== socket) return;
      ws = null;
      schedule();
    });
  }

  function schedule() {
    const base = Math.min(MAX_DELAY, MIN_DELAY * 2 ** attempt);
    const delay = Math.round(base * (0.75 + Math.random() * 0.5));
    attempt++;
    clearTimeout(timer);
    timer = setTimeout(open, delay);
    onDown(delay);
  }

  open();
  return {
    retryNow() {
      if (ws) return;
      clearTimeout(timer);
      open();
    },
  };
}
