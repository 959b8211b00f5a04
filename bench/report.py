#!/usr/bin/env python3
"""Turns bench/run.sh's results into markdown tables.

usage: report.py RESULTS ROOT COMMAND QUICK

Prints the tables; unless QUICK is 1, also replaces the part of docs/benchmarks.md
between the `bench:begin` and `bench:end` markers (creating the file if needed), so the
hand-written analysis below the marker survives a re-run.
"""

import datetime
import os
import platform
import subprocess
import sys

SYSTEMS = ["direct", "nginx", "netbore-ws", "netbore-wss", "netbore-wss-agent", "netbore-e2e",
           "netbore-tcp",
           "rathole-tcp", "rathole-ws", "bore"]
LABELS = {
    "direct": "origin directly",
    "nginx": "nginx (1 hop)",
    "netbore-ws": "Netbore ws",
    "netbore-wss": "Netbore wss",
    "netbore-wss-agent": "Netbore wss agent link only",
    "netbore-e2e": "Netbore edge→edge",
    "netbore-tcp": "Netbore tcp tunnel",
    "rathole-tcp": "rathole tcp",
    "rathole-ws": "rathole ws",
    "bore": "bore",
}
# metric, description, higher is better
METRICS = [
    ("w1_rps", "W1 1 KiB GET, 64 conns: requests/s", True),
    ("w1_cpu_us_per_req", "W1 tunnel CPU per request (µs, user+system of the tunnel's "
     "processes)", False),
    ("w1_p50_us", "W1 p50 latency (µs)", False),
    ("w1_p99_us", "W1 p99 latency (µs)", False),
    ("w2_p50_us", "W2 1 KiB GET, 1 conn: p50 (µs)", False),
    ("w2_p99_us", "W2 p99 (µs)", False),
    ("w2_cpu_us_per_req", "W2 tunnel CPU per request (µs)", False),
    ("w3_download_MBps", "W3 256 MiB download (MB/s)", True),
    ("w3_upload_MBps", "W3 256 MiB upload (MB/s)", True),
    ("w4_server_rss_kib", "W4 server/edge RSS, 1 idle tunnel (KiB)", False),
    ("w4_client_rss_kib", "W4 client/agent RSS, 1 idle tunnel (KiB)", False),
    ("w4_server_anon_kib", "W4 server/edge anonymous memory, 1 idle tunnel (KiB)", False),
    ("w4_client_anon_kib", "W4 client/agent anonymous memory, 1 idle tunnel (KiB)", False),
    ("w4_server_rss_after_load_kib", "W4 edge RSS after W1–W5 (KiB)", False),
    ("w4_client_rss_after_load_kib", "W4 agent RSS after W1–W5 (KiB)", False),
    ("w4_edge_base_rss_kib", "W4 fresh edge RSS, no tunnel (KiB)", False),
    ("w4_edge_rss_1000_kib", "W4 edge RSS, 1,000 idle tunnels (KiB)", False),
    ("w4_per_tunnel_1000_bytes", "W4 edge bytes per idle tunnel at 1,000", False),
    ("w4_edge_rss_10000_kib", "W4 edge RSS, 10,000 idle tunnels (KiB)", False),
    ("w4_per_tunnel_10000_bytes", "W4 edge bytes per idle tunnel at 10,000", False),
    ("w5_p50_us", "W5 WebSocket echo p50 (µs)", False),
    ("w5_p99_us", "W5 WebSocket echo p99 (µs)", False),
    ("w6_ms", "W6 agent start → first proxied byte (ms)", False),
]


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def load(path):
    r = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3:
                r[(parts[0], parts[1])] = parts[2]
    return r


def fmt(v):
    n = num(v)
    if n is None:
        return v if v else "—"
    return f"{n:,.0f}" if abs(n) >= 100 or n == int(n) else f"{n:.1f}"


def ratio(a, b):
    a, b = num(a), num(b)
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def cmd_out(*args):
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=10)
        lines = (p.stdout or p.stderr).strip().splitlines()
        # rathole prints its version on a "Build Version:" line.
        for line in lines:
            if line.startswith("Build Version:"):
                return line.split(":", 1)[1].strip()
        return lines[0]
    except Exception:  # noqa: BLE001 - a missing tool is just "not installed"
        return "not installed"


def machine(root):
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    rev = cmd_out("git", "-C", root, "rev-parse", "--short", "HEAD")
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores, {mem} RAM, Linux {platform.release()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- netbore: git {rev} (release build); {cmd_out('rustc', '-V')}",
        f"- nginx: {cmd_out('nginx', '-v')}; wrk: {cmd_out('wrk', '-v')}; "
        f"curl: {' '.join(cmd_out('curl', '--version').split()[:2])}",
        f"- rathole: {cmd_out('rathole', '--version')}; bore: {cmd_out('bore', '--version')}",
    ]


def render(r, root, command):
    val = lambda s, m: r.get((s, m))  # noqa: E731
    out = ["## Setup", ""]
    out += machine(root)
    out += [
        f"- command: `{command}` (from the repository root)",
        "- everything on 127.0.0.1; wrk runs 1 thread; every system forwards to the same "
        "origin (`netbore-bench origin`, hyper); Netbore edge and agent log at the default "
        "`info` level (the edge's access log is on), nginx keeps its access log",
        "",
        "## All figures",
        "",
        "Ratios are this figure divided by the same figure for the origin reached directly "
        "and for rathole in the same run (for latency and memory, lower is better; for "
        "requests/s and MB/s, higher is better).",
        "",
    ]
    for m, desc, _ in METRICS:
        rows = [s for s in SYSTEMS if val(s, m) is not None]
        if not rows:
            continue
        out += [f"### {desc}", "",
                "| system | value | ÷ direct | ÷ rathole tcp | ÷ rathole ws |",
                "| --- | ---: | ---: | ---: | ---: |"]
        for s in rows:
            v = val(s, m)
            out.append(f"| {LABELS[s]} | {fmt(v)} | {ratio(v, val('direct', m))} | "
                       f"{ratio(v, val('rathole-tcp', m))} | {ratio(v, val('rathole-ws', m))} |")
        out.append("")
    out.append("Netbore edge→edge: the agent links to one edge; the load goes to a second edge, "
               "which forwards every request over the internal HTTP/2 hop (Redis registry). "
               "Netbore tcp tunnel: `netbore tcp` (a port of its own on the edge, bytes on "
               "CONNECT streams of the agent's link), the same HTTP loads as the others. "
               "Tunnel CPU: the edge and the agent for Netbore (both edges for edge→edge), "
               "server and client for rathole and bore, nginx's master and workers; none for "
               "the origin reached directly.")
    out.append("")
    # The inspector's cost: W1 with the agent's inspector on and with --no-inspect,
    # alternating on one stack, two rounds each.
    rounds = [(num(val("netbore-inspect-on", f"w1_r{i}_rps")),
               num(val("netbore-inspect-off", f"w1_r{i}_rps")),
               num(val("netbore-inspect-on", f"w1_r{i}_cpu_us_per_req")),
               num(val("netbore-inspect-off", f"w1_r{i}_cpu_us_per_req"))) for i in (1, 2)]
    if any(r[0] for r in rounds):
        out += ["### W1 with the inspector on and with `--no-inspect` (Netbore ws)", "",
                "| round | inspector on, req/s | `--no-inspect`, req/s | on ÷ off | "
                "CPU/request on | CPU/request off |",
                "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for i, (on, off, con, coff) in enumerate(rounds, 1):
            out.append(f"| {i} | {fmt(on)} | {fmt(off)} | {ratio(on, off)} | "
                       f"{fmt(con)} µs | {fmt(coff)} µs |")
        out.append("")
    missing = [LABELS[s] for s in SYSTEMS if val(s, "installed") == "no"]
    if missing:
        out.append(f"Not installed in this run: {', '.join(missing)}.")
    out.append("")

    out += ["## Targets", "", "| target | measured | met |", "| --- | --- | --- |"]

    def target(name, a, op, b, factor, shown):
        a, b = num(a), num(b)
        if a is None or b is None or a == 0 or b == 0:
            out.append(f"| {name} | not measured | — |")
            return
        ok = a >= factor * b if op == ">=" else a <= factor * b
        out.append(f"| {name} | {shown(a, b)} | {'yes' if ok else '**no**'} |")

    nw = lambda m: val("netbore-ws", m)  # noqa: E731
    target("W1 tunnel CPU per request ws ≤ 0.8× rathole ws", nw("w1_cpu_us_per_req"), "<=",
           val("rathole-ws", "w1_cpu_us_per_req"), 0.8,
           lambda a, b: f"{a:.1f} vs {b:.1f} µs = {a / b:.2f}×")
    target("W1 ws ≥ 1.25× rathole ws", nw("w1_rps"), ">=", val("rathole-ws", "w1_rps"), 1.25,
           lambda a, b: f"{a:,.0f} vs {b:,.0f} req/s = {a / b:.2f}×")
    target("W1 ws ≥ 0.85× nginx", nw("w1_rps"), ">=", val("nginx", "w1_rps"), 0.85,
           lambda a, b: f"{a:,.0f} vs {b:,.0f} req/s = {a / b:.2f}×")
    target("W2 p50 ws ≤ rathole ws", nw("w2_p50_us"), "<=", val("rathole-ws", "w2_p50_us"), 1,
           lambda a, b: f"{a:.0f} vs {b:.0f} µs")
    target("W2 p99 ws ≤ 2× its p50", nw("w2_p99_us"), "<=", nw("w2_p50_us"), 2,
           lambda a, b: f"{a:.0f} vs p50 {b:.0f} µs = {a / b:.2f}×")
    for d in ("download", "upload"):
        m = f"w3_{d}_MBps"
        target(f"W3 {d} ws ≥ 1.5× rathole ws", nw(m), ">=", val("rathole-ws", m), 1.5,
               lambda a, b: f"{a:.0f} vs {b:.0f} MB/s = {a / b:.2f}×")
        target(f"W3 {d} wss agent link ≥ 0.8× ws", val("netbore-wss-agent", m), ">=", nw(m), 0.8,
               lambda a, b: f"{a:.0f} vs {b:.0f} MB/s = {a / b:.2f}×")
        target(f"W3 {d} wss ≥ 0.7× ws", val("netbore-wss", m), ">=", nw(m), 0.7,
               lambda a, b: f"{a:.0f} vs {b:.0f} MB/s = {a / b:.2f}×")
    target("W4 edge ≤ 10 KiB per idle tunnel at 10,000", nw("w4_per_tunnel_10000_bytes"), "<=",
           10240, 1, lambda a, b: f"{a:,.0f} bytes")
    target("W4 idle agent < 10 MiB RSS", nw("w4_client_rss_kib"), "<=", 10240, 1,
           lambda a, b: f"{a / 1024:.1f} MiB "
           f"({num(nw('w4_client_anon_kib') or 0) / 1024:.1f} MiB of it anonymous)")
    for p in ("p50", "p99"):
        target(f"W5 {p} ws within 1.15× nginx", nw(f"w5_{p}_us"), "<=", val("nginx", f"w5_{p}_us"),
               1.15, lambda a, b: f"{a:.0f} vs {b:.0f} µs = {a / b:.2f}×")
    target("W1 edge→edge ≥ 0.75× single edge (ws)", val("netbore-e2e", "w1_rps"), ">=",
           nw("w1_rps"), 0.75, lambda a, b: f"{a:,.0f} vs {b:,.0f} req/s = {a / b:.2f}×")
    on = sum(r[0] or 0 for r in rounds)
    off = sum(r[1] or 0 for r in rounds)
    target("W1 inspector on ≥ 0.9× `--no-inspect` (both rounds)", on or None, ">=", off or None,
           0.9, lambda a, b: f"{a / 2:,.0f} vs {b / 2:,.0f} req/s = {a / b:.2f}×")
    out.append("")
    return out


BEGIN = "<!-- bench:begin (generated by bench/run.sh; edit below bench:end) -->"
END = "<!-- bench:end -->"


def main():
    results, root, command, quick = sys.argv[1:5]
    body = render(load(results), root, command)
    text = "\n".join(body)
    print(text)
    if quick == "1":
        return
    path = os.path.join(root, "docs", "benchmarks.md")
    head, tail = "# Benchmarks\n\n", "\n## Analysis\n\n(to be written)\n"
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if BEGIN in old and END in old:
            head = old.split(BEGIN)[0]
            tail = old.split(END, 1)[1]
    with open(path, "w") as f:
        f.write(head + BEGIN + "\n\n" + text + "\n" + END + "\n\n" + tail.lstrip("\n"))


if __name__ == "__main__":
    main()
