"""SYN flood: a spoofed-source hping3 flood at one frontend, with and without SYNPROXY, in the same run.

Namespaces only: a router namespace holds tcprouter's compiled rules (frontends 80 and 81, one backend each
in a backend namespace), a flood namespace runs `hping3 --flood --rand-source -S` at frontend 80, and a
legit namespace opens connections (connect + 3-byte request/response) to 80 and 81 meanwhile. The router's
default route leads into a veth that drops what it gets, so SYN/ACKs to spoofed sources are really sent.
Measured: the router's conntrack entries (peak, and as % of nf_conntrack_max, which each namespace gets in
full), the legit success rate (a connection may take up to 3 s: one SYN retransmission, at 1 s), the connect
time and the exchange's (connect, request, response) per frontend, host CPU from /proc/stat, and the packets
the host dropped from full input queues (softnet_stat).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path

from tcprouter.compiler import Options, Synproxy, compile_rules
from tcprouter.diff import restore_script
from tcprouter.model import Backend, Balance, DesiredState, Frontend
from tcprouter.netfilter import Flavour, Iptables

from .common import log, netns_add, percentile, sh, veth

FRONTENDS = (80, 81)
SERVER = """
import socket, threading
def serve(port):
    s = socket.create_server(("10.71.9.2", port), backlog=4096)
    while True:
        c, _ = s.accept()
        threading.Thread(target=answer, args=(c,), daemon=True).start()
def answer(c):
    with c:
        if c.recv(3):
            c.sendall(b"ok\\n")
for p in (8080, 8081):
    threading.Thread(target=serve, args=(p,), daemon=True).start()
threading.Event().wait()
"""
CLIENT = """
import json, socket, sys, time
end = time.monotonic() + float(sys.argv[1])
results = {"80": [], "81": []}
while time.monotonic() < end:
    for port in (80, 81):
        started = time.perf_counter()
        try:
            with socket.create_connection(("10.71.1.1", port), timeout=3) as c:
                connected = time.perf_counter() - started
                c.sendall(b"hi\\n")
                ok = c.recv(3) == b"ok\\n"
            results[str(port)].append([connected, time.perf_counter() - started] if ok else None)
        except OSError:
            results[str(port)].append(None)
        time.sleep(0.01)
print(json.dumps(results))
"""


def _cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the host, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _backlog_drops() -> int:
    """Packets the host dropped because a CPU's input queue (netdev_max_backlog) was full, from softnet_stat."""
    return sum(int(line.split()[1], 16) for line in Path("/proc/net/softnet_stat").read_text().splitlines())


def _case(router: str, flood: str | None, legit: str, iptables: Iptables, synproxy: bool, duration: float) -> dict:
    """One case; `flood` None: the baseline, the legit client alone."""
    backends = {80: Backend("a" * 64, "b80", "10.71.9.2", 8080), 81: Backend("b" * 64, "b81", "10.71.9.2", 8081)}
    state = DesiredState({p: Frontend(p, Balance.ROUNDROBIN, (backends[p],)) for p in FRONTENDS})
    options = Options(
        forward_parent="FORWARD", synproxy=Synproxy.ALL if synproxy else Synproxy.LABEL, tcp_loose_before=1
    )
    iptables.restore(restore_script(iptables.read()[0], compile_rules(state, options)))
    sh("ip", "netns", "exec", router, "sysctl", "-qw", f"net.netfilter.nf_conntrack_tcp_loose={0 if synproxy else 1}")
    maximum = int(Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())
    client = subprocess.Popen(
        ["ip", "netns", "exec", legit, "python3", "-c", CLIENT, str(duration)], stdout=subprocess.PIPE, text=True
    )
    hping = flood and subprocess.Popen(
        ["ip", "netns", "exec", flood, "hping3", "--flood", "--rand-source", "-S", "-q", "-p", "80", "10.71.1.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    busy0, total0 = _cpu()
    drops0 = _backlog_drops()
    peak = 0
    end = time.monotonic() + duration
    while time.monotonic() < end:
        peak = max(peak, int(sh("ip", "netns", "exec", router, "conntrack", "-C").strip()))
        time.sleep(0.25)
    busy1, total1 = _cpu()
    drops = _backlog_drops() - drops0
    sent = ""
    if hping:
        hping.terminate()
        sent = hping.communicate()[1]
    legit_results = json.loads(client.communicate(timeout=duration + 10)[0])
    for port in FRONTENDS:  # the entries the flood made
        sh("ip", "netns", "exec", router, "conntrack", "-D", "-p", "tcp", "--orig-port-dst", str(port), check=False)
    per_frontend = {}
    for port, outcomes in legit_results.items():
        times = [t[0] * 1000 for t in outcomes if t is not None]
        exchanges = [t[1] * 1000 for t in outcomes if t is not None]
        per_frontend[port] = {
            "attempts": len(outcomes),
            "success_rate": len(times) / len(outcomes) if outcomes else float("nan"),
            "connect_p50_ms": percentile(times, 50),
            "connect_p99_ms": percentile(times, 99),
            "exchange_p50_ms": percentile(exchanges, 50),
            "exchange_p99_ms": percentile(exchanges, 99),
            "exchanges_over_1s": sum(t > 1000 for t in exchanges),  # a lost segment, resent
        }
    return {
        "synproxy": synproxy,
        "flood": bool(flood),
        "flood_packets": next((line.split()[0] for line in sent.splitlines() if "transmitted" in line), "0"),
        "conntrack_peak": peak,
        "conntrack_max": maximum,
        "conntrack_peak_pct": 100 * peak / maximum,
        "host_cpu_pct": 100 * (busy1 - busy0) / max(1, total1 - total0),
        "backlog_drops": drops,
        "legit": per_frontend,
    }


def run(duration: float = 10.0) -> dict:
    """Both cases in one run, the unprotected one first."""
    with contextlib.ExitStack() as stack:
        router, flood, legit, backend = (netns_add(stack, f"tcpr-flood-{n}-") for n in ("r", "f", "l", "b"))
        for ns, net, tag in ((flood, "10.71.1", "f"), (legit, "10.71.2", "l"), (backend, "10.71.9", "b")):
            veth(stack, router, f"{net}.1", ns, f"{net}.2", f"fl{tag}{router[-4:]}")
            sh("ip", "-n", ns, "route", "add", "default", "via", f"{net}.1")
        # The way out for replies to spoofed sources: a veth whose peer drops them, a static neighbour (no ARP).
        sh("ip", "-n", router, "link", "add", "sink", "type", "veth", "peer", "name", "sinkpeer")
        for dev in ("sink", "sinkpeer"):
            sh("ip", "-n", router, "link", "set", dev, "up")
        sh("ip", "-n", router, "addr", "add", "10.71.8.1/24", "dev", "sink")
        sh(
            "ip",
            "-n",
            router,
            "neigh",
            "add",
            "10.71.8.2",
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "sink",
            "nud",
            "permanent",
        )
        sh("ip", "-n", router, "route", "add", "default", "via", "10.71.8.2")
        sh("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        server = subprocess.Popen(["ip", "netns", "exec", backend, "python3", "-c", SERVER])
        stack.callback(server.wait)
        stack.callback(server.terminate)
        deadline = time.monotonic() + 10
        while ":8081" not in sh("ip", "netns", "exec", backend, "ss", "-Hltn"):  # the server binds
            if time.monotonic() > deadline:
                raise RuntimeError("the flood phase's backend did not start listening")
            time.sleep(0.05)
        iptables = Iptables(Flavour.NFT, netns=router)
        cases = []
        for synproxy in (False, True):
            for flooding in (None, flood):  # the baseline first, then the flood
                log(f"flood: {duration:g} s, synproxy {synproxy}, flood {bool(flooding)}")
                cases.append(_case(router, flooding, legit, iptables, synproxy, duration))
        return {"duration_s": duration, "cases": cases}


def table(result: dict) -> list[str]:
    out = [
        f"{result['duration_s']:g} s per case: the legit client alone, then with `hping3 --flood --rand-source -S` "
        "at frontend 80.\n",
        "| SYNPROXY | flood SYNs sent | conntrack peak | % of max | host CPU | legit :80 ok | :80 connect p50 / p99 ms "
        "| :80 exchange p50 / p99 ms | legit :81 ok | :81 connect p50 / p99 ms | :81 exchange p50 / p99 ms "
        "| backlog drops |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in result["cases"]:
        legit = [
            f"{100 * f['success_rate']:.1f}% ({f['attempts']}) | {f['connect_p50_ms']:.2f} / {f['connect_p99_ms']:.2f} "
            f"| {f['exchange_p50_ms']:.2f} / {f['exchange_p99_ms']:.2f} ({f['exchanges_over_1s']} > 1 s)"
            for f in (case["legit"]["80"], case["legit"]["81"])
        ]
        out.append(
            f"| {'on' if case['synproxy'] else 'off'} | {case['flood_packets']} | {case['conntrack_peak']} "
            f"| {case['conntrack_peak_pct']:.1f}% | {case['host_cpu_pct']:.0f}% | {legit[0]} | {legit[1]} "
            f"| {case['backlog_drops']} |"
        )
    return out
