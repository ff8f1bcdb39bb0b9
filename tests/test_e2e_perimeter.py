"""End to end, the perimeter: operators' rules in DOCKER-USER win, tcprouter leaves the host's other traffic
alone, the access labels refuse clients with a reset, and tcp.synproxy keeps a SYN flood out of conntrack.
Real containers, the host's tables, two client namespaces on different subnets."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .support import (
    CLIENT_SUBNET,
    ClientHost,
    Router,
    connect_outcome,
    greetings,
    in_netns,
    invalid_segment_crosses,
    sh,
    wait_until,
)

pytestmark = pytest.mark.e2e
FRONT = 27017


@pytest.fixture
def second_client(client_host: ClientHost) -> Iterator[ClientHost]:
    """Another external client, on 203.0.113.0/24 (the first one is on 198.51.100.0/24)."""
    host = ClientHost(host_ip="203.0.113.1", client_ip="203.0.113.2").create()
    try:
        yield host
    finally:
        host.forget_flows()
        host.destroy()


@contextmanager
def host_rule(flavour: str, *spec: str, chain: str = "DOCKER-USER", position: str | None = None) -> Iterator[None]:
    """A rule in one of the host's chains for the test's duration, deleted by its exact spec even on failure."""
    tool = f"iptables-{flavour}"
    sh(tool, "-w", *(("-I", chain, position) if position else ("-A", chain)), *spec)
    try:
        yield
    finally:
        sh(tool, "-w", "-D", chain, *spec, check=False)


def outcome(client: ClientHost) -> str:
    return connect_outcome(client.name, client.host_ip, FRONT, 2)


def routed(backends, start_router, **labels: str) -> Router:
    """A one-backend frontend with these access labels, routed by a tcprouter that checks and resyncs often."""
    backends.start({"tcp.port": str(FRONT), **{f"tcp.{k}": v for k, v in labels.items()}})
    return start_router("--check-interval", "0.2", "--resync-interval", "1")


def test_an_operators_drop_added_after_start_stops_that_client_and_no_other(
    backends, start_router, client_host, second_client, host_tables
):
    router = routed(backends, start_router)
    assert (outcome(client_host), outcome(second_client)) == ("answered", "answered")
    with host_rule(host_tables, "-s", f"{client_host.client_ip}/32", "-j", "DROP", position="1"):
        assert (outcome(client_host), outcome(second_client)) == ("timeout", "answered")
        # drift checks and a full resync later, tcprouter has not moved its hook above the operator's rule
        synced = router.last_sync()
        wait_until(lambda: router.last_sync() > synced, 10, what="a full resync")
        assert (outcome(client_host), outcome(second_client)) == ("timeout", "answered")
        assert "drift" not in router.log()
    client_host.forget_flows()
    assert outcome(client_host) == "answered"


def test_an_invalid_packet_of_the_hosts_other_traffic_is_not_dropped(
    backends, start_router, client_host, second_client, host_tables
):
    """A SYN+RST segment between the two client namespaces, routed by the host (which lets their traffic
    through with a rule after DOCKER-USER), is INVALID for conntrack; tcprouter's rules let it pass."""
    routed(backends, start_router)
    spec = ("-s", f"{client_host.client_ip}/32", "-d", f"{second_client.client_ip}/32", "-j", "ACCEPT")
    with host_rule(host_tables, *spec, chain="FORWARD"):
        assert invalid_segment_crosses(
            client_host.name, client_host.client_ip, second_client.name, second_client.client_ip
        )


def refused_total(router, reason: str) -> float:
    for line in router.metrics_text().splitlines():
        if line.startswith("tcprouter_refused_connections_total{") and f'reason="{reason}"' in line:
            return float(line.split()[-1])
    return 0.0


def test_allow_lets_exactly_the_listed_client_namespace_in(backends, start_router, client_host, second_client):
    router = routed(backends, start_router, allow=f"{client_host.client_ip}/24")
    assert outcome(client_host) == "answered"
    assert outcome(second_client) == "refused"  # a reset at once, not a timeout
    assert refused_total(router, "allow") >= 1


def test_maxconn_refuses_the_third_concurrent_connection_with_a_reset(
    backends, start_router, client_host, second_client
):
    router = routed(backends, start_router, maxconn="2")
    address = (client_host.host_ip, FRONT)
    held = in_netns(client_host.name, lambda: [socket.create_connection(address, timeout=2) for _ in range(2)])
    try:
        assert outcome(client_host) == "refused"
        assert outcome(second_client) == "answered"  # per client address
        assert refused_total(router, "maxconn") >= 1
    finally:
        for conn in held:
            conn.close()
    wait_until(lambda: outcome(client_host) == "answered", 10, what="a slot to free up")


def test_rate_refuses_above_the_rate_and_recovers(backends, start_router, client_host, second_client):
    router = routed(backends, start_router, rate="1/s", burst="2")
    wait_until(lambda: outcome(client_host) == "refused", 5, what="the rate to refuse")  # a burst, then refusals
    assert outcome(second_client) == "answered"  # per client address
    assert refused_total(router, "rate") >= 1
    wait_until(lambda: outcome(client_host) == "answered", 5, what="the rate to allow a connection again")


TCP_LOOSE = "/proc/sys/net/netfilter/nf_conntrack_tcp_loose"


def tracked_to_front() -> int:
    out = sh("conntrack", "-L", "-p", "tcp", "--orig-port-dst", str(FRONT), check=False)
    return len(out.splitlines())


def test_synproxy_routes_in_exact_rotation_and_a_spoofed_syn_burst_leaves_no_conntrack_entry(
    backends, start_router, client_host
):
    loose_before = Path(TCP_LOOSE).read_text().strip()
    labels = {"tcp.port": str(FRONT), "tcp.synproxy": "true"}
    pool = [backends.start(labels) for _ in range(2)]
    order = [backends.ip(c) for c in pool]
    start_router("--check-interval", "0.2", "--resync-interval", "1")
    assert Path(TCP_LOOSE).read_text().strip() == "0"  # set before the rules that need it
    assert greetings(client_host.name, client_host.host_ip, FRONT, 4) == order * 2

    # Spoofed SYNs from an unused address of the client's subnet (the host's SYN/ACKs stay on that link),
    # each from another source port: without synproxy, one conntrack entry each.
    client_host.forget_flows()
    spoofed = f"{CLIENT_SUBNET}.77"
    hping = ("hping3", "-q", "-S", "-a", spoofed, "-p", str(FRONT), "-i", "u200", "-c", "500", client_host.host_ip)
    sh("ip", "netns", "exec", client_host.name, *hping, check=False)  # exits 1: no replies reach it
    assert tracked_to_front() == 0
    assert greetings(client_host.name, client_host.host_ip, FRONT, 2) == order

    # Once no frontend has synproxy, the daemon gives nf_conntrack_tcp_loose its earlier value back.
    backends.remove_all()
    wait_until(lambda: Path(TCP_LOOSE).read_text().strip() == loose_before, 10, what="tcp_loose given back")
