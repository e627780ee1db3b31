#!/usr/bin/env python3
"""
Reactor lag under heavy accounting work (issue 3): does counting a huge
prompt, or estimating a long cancelled stream, stall the other streams?

One "probe" stream (x-mock-tokens events, x-mock-delay-ms apart) runs
through llmgate while other clients send requests with ~200k-token prompts
and hang up mid-stream, which makes the gateway parse the big body and
estimate prompt and output with tiktoken. The probe's inter-event gaps are
measured at the client: with the heavy work off the reactor thread they
stay near the upstream's own spacing.

    .venv/bin/python bench/reactor_lag.py            # about 20 s
    .venv/bin/python bench/reactor_lag.py --heavy 0  # the baseline

Traffic goes only to 127.0.0.1; every loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]


def start(plugin: str, args: list[str], cwd: str) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        TWISTD + [plugin, *args, "--port", "tcp:0:interface=127.0.0.1"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    pattern = re.compile(rb"(GatewaySite|Site) starting on (\d+)")
    deadline = time.monotonic() + 30
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = pattern.search(line)
        if m and (plugin != "llmgate" or m.group(1) == b"GatewaySite"):
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
            return proc, int(m.group(2))
    proc.kill()
    raise SystemExit(f"{plugin} did not start")


def post(port: int, body: bytes, headers: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + headers.encode()
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )
    return s


def probe(port: int, tokens: int, delay_ms: int, out: list[float]) -> None:
    body = json.dumps({"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    s = post(port, body, f"x-mock-tokens: {tokens}\r\nx-mock-delay-ms: {delay_ms}\r\n")
    s.settimeout(60)
    buf = b""
    while True:
        data = s.recv(65536)
        if not data:
            break
        now = time.monotonic()
        n = data.count(b'"content":" ')
        out.extend([now] * n)
        buf = (buf + data)[-64:]
        if b"[DONE]" in buf:
            break
    s.close()


def heavy(port: int, prompt_tokens: int, stop: threading.Event, count: list[int]) -> None:
    words = " ".join(["lighthouse keeper"] * (prompt_tokens // 2))
    body = json.dumps(
        {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": words}]}
    ).encode()
    while not stop.is_set() and count[0] < 200:
        s = post(port, body, "x-mock-tokens: 2000\r\nx-mock-delay-ms: 1\r\n")
        s.settimeout(30)
        got = b""
        while got.count(b"data:") < 500:
            data = s.recv(65536)
            if not data:
                break
            got += data
        s.close()  # hang up mid-stream: the gateway must estimate
        count[0] += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heavy", type=int, default=2, help="clients sending huge prompts and hanging up")
    ap.add_argument("--prompt-tokens", type=int, default=200_000)
    ap.add_argument("--tokens", type=int, default=1000, help="probe stream events")
    ap.add_argument("--delay-ms", type=int, default=10)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="llmgate-lag-")
    mock, mport = start("llmgate-mock", [], tmp)
    conf = os.path.join(tmp, "gw.toml")
    with open(conf, "w") as f:
        f.write(
            f'[providers.m]\nkind = "openai"\nbase_url = "http://127.0.0.1:{mport}/v1"\ndefault = true\n'
            f'[ledger]\npath = "{tmp}/usage.db"\n'
        )
    gw, gport = start("llmgate", ["--config", conf, "--workers", "1"], tmp)
    try:
        stop = threading.Event()
        done = [0]
        workers = [threading.Thread(target=heavy, args=(gport, args.prompt_tokens, stop, done), daemon=True) for _ in range(args.heavy)]
        for w in workers:
            w.start()
        arrivals: list[float] = []
        probe(gport, args.tokens, args.delay_ms, arrivals)
        stop.set()
        for w in workers:
            w.join(30)
        gaps = sorted((b - a) * 1000 for a, b in zip(arrivals, arrivals[1:]))
        result = {
            "heavy_clients": args.heavy,
            "heavy_requests_done": done[0],
            "prompt_tokens": args.prompt_tokens,
            "probe_events": len(arrivals),
            "upstream_gap_ms": args.delay_ms,
            "gap_ms_p50": round(statistics.median(gaps), 2),
            "gap_ms_p99": round(gaps[int(len(gaps) * 0.99) - 1], 2),
            "gap_ms_max": round(gaps[-1], 2),
        }
        print(json.dumps(result))
    finally:
        for p in (gw, mock):
            p.terminate()
            p.wait(30)


if __name__ == "__main__":
    main()
