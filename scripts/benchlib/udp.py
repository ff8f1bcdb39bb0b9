"""UDP through tcprouter versus direct, in the same run: new flows per second and datagrams per second.

Three test backends (tcprouter-test/backend: udp-echo on UDP 1234) labelled udp.port=5683. Two client namespaces
(benchlib.ClientHost, one per path, so their flows never share a conntrack tuple): `direct` sends to backend 0's
address (one forward, no NAT; a DOCKER-USER rule lets it in), `tcprouter` to the host's address on 5683 (DNAT,
rotation, connmark). The load generator below runs in the client's namespace, the paths taking turns going first:
  new flows    a fresh socket per request-response (each is a new conntrack entry, dispatched by the nat table)
  datagrams    one flow, WINDOW datagrams kept in flight (the established path: no nat table, conntrack only)
Usage (root, Docker host, holds /run/tcprouter-tests.lock for the run): scripts/bench-udp [--rounds 3] [--duration 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import time

from tests.support import BACKEND_IMAGE, BACKEND_PORT, Router, in_netns, tcprouter, udp_ask, wait_until

from .common import ClientHost, host_lock, log, sh, unique

FRONT = 5683
WINDOW = 32
# Fewer flows per measurement than ephemeral ports (32768-60999): a reused source port within the conntrack timeout
# would ride on an old entry instead of being a new flow. The client's entries are deleted after each measurement.
MAX_FLOWS = 20_000


def new_flows(address: str, port: int, duration: float) -> float:
    """Request-response on a fresh socket each, for `duration` s or MAX_FLOWS flows: answered flows per second."""
    done, started = 0, time.monotonic()
    while time.monotonic() - started < duration and done < MAX_FLOWS:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flow:
            flow.settimeout(1)
            flow.sendto(b"x", (address, port))
            with contextlib.suppress(TimeoutError):
                flow.recv(256)
                done += 1
    return done / (time.monotonic() - started)


def datagrams(address: str, port: int, duration: float) -> float:
    """One flow with WINDOW datagrams in flight for `duration` s: answered datagrams per second."""
    answered = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flow:
        flow.connect((address, port))
        flow.settimeout(0.2)
        for _ in range(WINDOW):
            flow.send(b"x" * 64)
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            try:
                flow.recv(256)
                answered += 1
            except TimeoutError:  # a datagram was lost: put the window back
                for _ in range(WINDOW):
                    flow.send(b"x" * 64)
                continue
            flow.send(b"x" * 64)
    return answered / duration


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("scripts/bench-udp needs root (namespaces, iptables, Docker)", file=sys.stderr)
        return 1
    flavour = sh(
        sys.executable, "-c", "from tcprouter.netfilter import detect_flavour; print(detect_flavour())"
    ).strip()
    results: dict[tuple[str, str], list[float]] = {}
    with host_lock("bench-udp"), contextlib.ExitStack() as stack:
        tcprouter("cleanup")
        stack.callback(tcprouter, "cleanup")
        ips = []
        for _ in range(3):
            name = unique("tcpr-bench-udp-")
            stack.callback(sh, "docker", "rm", "-f", name, check=False)
            sh("docker", "run", "-d", "--name", name, "--label", f"udp.port={FRONT}", BACKEND_IMAGE)
            ips.append(sh("docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name))
        ips = [ip.strip() for ip in ips]
        clients = {path: ClientHost.create(stack, index) for index, path in enumerate(("direct", "tcprouter"))}
        for client in clients.values():
            stack.callback(sh, "conntrack", "-D", "-s", client.client_ip, check=False)
        rule = ["-s", f"{clients['direct'].client_ip}/32", "-d", f"{ips[0]}/32", "-p", "udp", "-j", "ACCEPT"]
        sh(f"iptables-{flavour}", "-w", "-I", "DOCKER-USER", "1", *rule)
        stack.callback(sh, f"iptables-{flavour}", "-w", "-D", "DOCKER-USER", *rule, check=False)
        router = Router().start()
        stack.callback(router.stop)
        targets = {"direct": (ips[0], BACKEND_PORT), "tcprouter": (clients["tcprouter"].host_ip, FRONT)}

        def answered(path: str) -> bool:
            def ask() -> bool:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flow:
                    try:
                        return bool(udp_ask(flow, *targets[path], 0.2))
                    except TimeoutError:
                        return False

            return in_netns(clients[path].name, ask)

        for path in targets:
            wait_until(lambda path=path: answered(path), 10, what=f"the {path} path answering")
        for round_ in range(args.rounds):
            for figure, measure in (("new flows/s", new_flows), ("datagrams/s", datagrams)):
                order = list(targets.items())
                for path, target in order if round_ % 2 else reversed(order):  # alternate: no path always goes first
                    rate = in_netns(clients[path].name, lambda m=measure, t=target: m(*t, args.duration))
                    results.setdefault((figure, path), []).append(rate)
                    sh("conntrack", "-D", "-s", clients[path].client_ip, check=False)
                    log(f"round {round_ + 1}: {figure} {path}: {rate:,.0f}")
    print(f"\nmedians of {args.rounds} rounds of up to {args.duration:g} s (new flows: at most {MAX_FLOWS:,})")
    print("| figure | direct | tcprouter | tcprouter / direct |")
    print("|---|---:|---:|---:|")
    for figure in ("new flows/s", "datagrams/s"):
        direct, routed = (statistics.median(results[(figure, path)]) for path in ("direct", "tcprouter"))
        print(f"| {figure} | {direct:,.0f} | {routed:,.0f} | {routed / direct:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
