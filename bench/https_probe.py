"""The relay's HTTPS ingress, two builds side by side: relay CPU per request.

Usage: python3 bench/https_probe.py DIR_A DIR_B
Starts DIR/relay-server of each with a self-signed certificate on loopback (no
agent), then sends GET requests for an unknown tunnel (answered 404) with
Python's TLS client: 20,000 over one keep-alive connection (the TLS record
layer, hyper, routing), then 2,000 each on a new connection (TLS handshakes),
twice, alternating the builds. Prints the relay's user + system CPU per request
from /proc/PID/stat. `hookrelay-bench` sends plain HTTP only; this checks that a
build trained on it (scripts/build-pgo) is not slower on the HTTPS path.
"""
import http.client
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(binary, keep_alive, count, warmup=200):
    data = tempfile.mkdtemp()
    https = free_port()
    relay = subprocess.Popen(
        [binary, "--data-dir", data, "--https", f"127.0.0.1:{https}", "--http", "off",
         "--quic", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}",
         "--max-connections-per-ip", "100000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", https)).close()
                break
            except OSError:
                if time.time() > deadline or relay.poll() is not None:
                    sys.exit(f"{binary} did not listen on {https}")
                time.sleep(0.1)
        conn = None
        for i in range(count + warmup):
            if i == warmup:
                used, started = cpu_seconds(relay.pid), time.time()
            if conn is None or not keep_alive:
                if conn:
                    conn.close()
                conn = http.client.HTTPSConnection("127.0.0.1", https, context=ctx, timeout=10)
            conn.request("GET", "/t/nope/hook")
            answer = conn.getresponse()
            answer.read()
            if answer.status != 404:
                sys.exit(f"expected 404 for an unknown tunnel, got {answer.status}")
        used = cpu_seconds(relay.pid) - used
        return used / count * 1e6, count / (time.time() - started)
    finally:
        relay.terminate()
        relay.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    for keep_alive, count in [(True, 20000), (False, 2000)]:
        for _ in range(2):
            for build in sys.argv[1:3]:
                us, rps = run(os.path.join(build, "relay-server"), keep_alive, count)
                kind = "keep-alive" if keep_alive else "new connection"
                print(f"{kind:14} {build}: relay {us:.1f} us/request, {rps:.0f} req/s", flush=True)


if __name__ == "__main__":
    main()
