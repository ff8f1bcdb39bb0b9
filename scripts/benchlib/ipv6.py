"""IPv6 versus IPv4 through tcprouter, in the same run: new TCP connections per second to one dual-stack pool.

A lab engine of its own with IPv6 (tests.cluster.DockerLab: daemon.json ipv6, ip6tables; the host's dockerd is only
asked for the backend image), three test backends on a network created with --ipv6, tcprouter in the node's namespace
(local mode), and a client namespace on the lab bridge. Each measurement opens connections one after another to the
node's frontend, over IPv4 (198.18.96.11) or IPv6 (fd00:96::11), each read to the backend's greeting and closed: every
one is a new conntrack entry, DNATed by the family's rules. The families take turns going first, round by round.
Usage (root, Docker host, holds /run/tcprouter-tests.lock for the run): scripts/bench-v6 [--rounds 5] [--duration 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

from tests.cluster import DockerLab
from tests.support import BACKEND_IMAGE, Router, greet, in_netns, wait_until

from .common import host_lock, log, sh

FRONT = 8600
SUBNET, SUBNET6, V6NET = "198.18.96", "fd00:96::", "fd00:21::/64"
IPV6_DAEMON = {"ipv6": True, "fixed-cidr-v6": "fd00:11::/64", "experimental": True, "ip6tables": True}
# Fewer connections per measurement than ephemeral ports: a reused source port would meet a TIME_WAIT entry.
MAX_CONNECTIONS = 20_000


def new_connections(address: str, duration: float) -> float:
    """Connect, read the greeting, close, for `duration` s or MAX_CONNECTIONS: connections per second."""
    done, started = 0, time.monotonic()
    while time.monotonic() - started < duration and done < MAX_CONNECTIONS:
        greet(address, FRONT, 2)
        done += 1
    return done / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("scripts/bench-v6 needs root (namespaces, iptables, Docker)", file=sys.stderr)
        return 1
    results: dict[str, list[float]] = {"ipv4": [], "ipv6": []}
    with host_lock("bench-v6"), contextlib.ExitStack() as stack:
        lab = DockerLab(nodes=1, swarm=False, subnet=SUBNET, subnet6=SUBNET6, daemon_config=IPV6_DAEMON)
        stack.callback(lab.destroy)
        lab.create()
        lab.docker(1, "network", "create", "--ipv6", "--subnet", V6NET, "v6net")
        for _ in range(3):
            lab.docker(1, "run", "-d", "--network", "v6net", "--label", f"tcp.port={FRONT}", BACKEND_IMAGE)
        client, _, _ = lab.add_client(50)
        router = Router("--docker-url", lab.node_url(1), netns=lab.node_ns(1)).start()
        stack.callback(router.stop)
        targets = {"ipv4": lab.node_address(1), "ipv6": lab.node_address6(1)}

        def answers(address: str) -> bool:
            try:
                return bool(in_netns(client, lambda: greet(address, FRONT, 1)))
            except OSError:
                return False

        for family, address in targets.items():
            wait_until(lambda a=address: answers(a), 20, 0.2, f"the frontend answering over {family}")
        for round_ in range(args.rounds):
            order = list(targets.items())
            for family, address in order if round_ % 2 else reversed(order):  # alternate: neither always first
                rate = in_netns(client, lambda a=address: new_connections(a, args.duration))
                results[family].append(rate)
                log(f"round {round_ + 1}: {family}: {rate:,.0f} new connections/s")
        sh("ip", "netns", "exec", lab.node_ns(1), sys.executable, "-m", "tcprouter", "cleanup", check=False)
    ratios = [v6 / v4 for v4, v6 in zip(results["ipv4"], results["ipv6"], strict=True)]
    print(
        f"\nmedians of {args.rounds} rounds of {args.duration:g} s; ipv6/ipv4 per round: "
        f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})"
    )
    print("| figure | IPv4 | IPv6 | IPv6 / IPv4 |")
    print("|---|---:|---:|---:|")
    v4, v6 = statistics.median(results["ipv4"]), statistics.median(results["ipv6"])
    print(f"| new connections/s | {v4:,.0f} | {v6:,.0f} | {statistics.median(ratios):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
