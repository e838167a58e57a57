// Shows the agent's connection state and public URLs. Everything is set with
// textContent: nothing from the network is ever parsed as HTML.
const state = document.getElementById("state");
const tunnel = document.getElementById("tunnel");
const urls = document.getElementById("urls");

async function refresh() {
  try {
    const res = await fetch("/api/status", { cache: "no-store" });
    const s = await res.json();
    state.textContent = s.state.replace("_", " ");
    state.dataset.state = s.state;
    tunnel.textContent = s.tunnel;
    urls.replaceChildren(...(s.public_urls || []).map((u) => {
      const li = document.createElement("li");
      const code = document.createElement("code");
      code.textContent = u;
      li.append(code);
      return li;
    }));
  } catch {
    state.textContent = "agent unreachable";
    state.dataset.state = "stopped";
  }
}

refresh();
setInterval(refresh, 2000);
