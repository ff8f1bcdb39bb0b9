"""End to end: real Docker containers, real kernel rules on this host, real TCP from a client namespace."""

from __future__ import annotations

import itertools
import json
import math
import re
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from tcprouter.diff import parse_save

from .support import (
    BACKEND_PORT,
    UNEXPOSED_PORT,
    connect_outcome,
    greetings,
    in_netns,
    owned_rules_in_host,
    peers_of,
    sh,
    tcprouter,
    unique,
    wait_until,
)

pytestmark = pytest.mark.e2e
FRONT = 27017
MQTT = 1883


def pool(backends, count: int, port: int = FRONT, **labels: str):
    containers = [backends.start({"tcp.port": str(port), **labels}) for _ in range(count)]
    return containers, [backends.ip(c) for c in containers]


def test_seed_scenario_exact_rotation(backends, start_router, client_host, foreign_rules):
    _, ips = pool(backends, 3)
    before = foreign_rules()
    start_router()
    assert greetings(client_host.name, client_host.host_ip, FRONT, 6) == ips + ips
    assert foreign_rules() == before


def test_pool_follows_start_kill_and_empties_to_refused(backends, start_router, client_host, host_tables):
    containers, ips = pool(backends, 3)
    start_router()
    ns, host = client_host.name, client_host.host_ip

    fourth = backends.start({"tcp.port": str(FRONT)}, wait=False)
    started = time.monotonic()
    fourth_ip = backends.ip(fourth)
    wait_until(lambda: fourth_ip in greetings(ns, host, FRONT, 4), 5, what="the new backend to answer")
    assert time.monotonic() - started <= 1.0
    assert Counter(greetings(ns, host, FRONT, 8)) == Counter({ip: 2 for ip in [*ips, fourth_ip]})

    containers[0].get_wrapped_container().kill()
    killed = time.monotonic()
    wait_until(
        lambda: not any(ips[0] + ":" in r for r in owned_rules_in_host(host_tables)),
        5,
        0.01,
        what="the killed backend's rule to go",
    )
    assert time.monotonic() - killed <= 1.0
    assert sorted(greetings(ns, host, FRONT, 6)) == sorted([*ips[1:], fourth_ip] * 2)

    for container in [*containers, fourth]:
        backends.remove(container)
    wait_until(lambda: connect_outcome(ns, host, FRONT, 2) != "answered", 5, what="the empty pool to stop answering")
    started = time.monotonic()
    assert connect_outcome(ns, host, FRONT, 2) == "refused"
    assert time.monotonic() - started < 0.5


def test_only_routed_flows_are_open(backends, start_router, client_host, docker_api):
    _labelled, ips = pool(backends, 1)
    unlabelled = backends.start({})
    start_router()
    ns = client_host.name
    assert greetings(ns, client_host.host_ip, FRONT, 1) == ips
    assert connect_outcome(ns, backends.ip(unlabelled), BACKEND_PORT, 1) == "timeout"
    assert connect_outcome(ns, ips[0], UNEXPOSED_PORT, 1) == "timeout"
    assert connect_outcome(ns, ips[0], BACKEND_PORT, 1) == "timeout"  # the pool only through the frontend
    assert connect_outcome(ns, client_host.host_ip, UNEXPOSED_PORT, 1) == "refused"


def stray_segment(source: str, destination: str, port: int, flags: int) -> bytes:
    """A bare TCP header (no options, no data) with a valid checksum, for a raw IPPROTO_TCP socket: the kernel
    adds the IP header. The Python standard library builds no TCP segments and none of the test dependencies
    does either, so it is packed here (RFC 793 header and pseudo-header)."""

    def checksum(data: bytes) -> int:
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return ~total & 0xFFFF

    header = struct.pack("!HHIIBBHHH", 40000, port, 1, 1, 5 << 4, flags, 64240, 0, 0)
    pseudo = socket.inet_aton(source) + socket.inet_aton(destination) + struct.pack("!BBH", 0, 6, len(header))
    return header[:16] + struct.pack("!H", checksum(pseudo + header)) + header[18:]


def invalid_drops(flavour: str) -> int:
    """Packets counted by the drops of TCPR-INVALID (INVALID packets from or to a backend network)."""
    _, counted = parse_save(sh(f"iptables-{flavour}-save", "-c", "-t", "filter"))
    return sum(r.packets for _, r in counted if r.chain == "TCPR-INVALID" and r.spec.endswith("-j DROP"))


def test_invalid_packets_are_dropped_and_counted(backends, start_router, client_host, host_tables):
    """A SYN-ACK out of nowhere belongs to no connection: conntrack calls it INVALID, and TCPR-INVALID drops it
    as it goes to a backend's network (the drop rule's counter rises by each one sent)."""
    _, ips = pool(backends, 1)
    start_router()
    before = invalid_drops(host_tables)
    syn_ack = stray_segment(client_host.client_ip, ips[0], BACKEND_PORT, 0x12)

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as raw:
            for _ in range(5):
                raw.sendto(syn_ack, (ips[0], 0))

    in_netns(client_host.name, send)
    wait_until(lambda: invalid_drops(host_tables) - before >= 5, 5, what="the 5 stray segments counted")
    assert greetings(client_host.name, client_host.host_ip, FRONT, 1) == ips  # real connections pass


def test_foreign_rules_untouched_by_run_and_cleanup(backends, start_router, client_host, foreign_rules):
    pool(backends, 2)
    before = foreign_rules()
    router = start_router("--snat", "always")
    assert len(set(greetings(client_host.name, client_host.host_ip, FRONT, 4))) == 2
    router.stop()
    from .support import tcprouter

    tcprouter("cleanup")
    assert foreign_rules() == before


def test_two_frontends_rotate_over_their_own_pools(backends, start_router, client_host):
    _, mongo = pool(backends, 2, FRONT)
    _, mqtt = pool(backends, 3, MQTT)
    start_router()
    ns, host = client_host.name, client_host.host_ip
    assert greetings(ns, host, FRONT, 4) == mongo * 2
    assert greetings(ns, host, MQTT, 6) == mqtt * 2


def test_host_itself_reaches_the_frontend(backends, start_router, client_host):
    _, ips = pool(backends, 2)
    start_router()
    assert greetings(None, client_host.host_ip, FRONT, 4) == ips * 2


def binomial_acceptance(trials: int, p: float, alpha: float) -> range:
    """The counts k whose lower and upper binomial tails both exceed `alpha`: a two-sided test whose false
    failure probability is at most 2 * alpha."""
    pmf = [math.comb(trials, k) * p**k * (1 - p) ** (trials - k) for k in range(trials + 1)]
    low = next(k for k in range(trials + 1) if sum(pmf[: k + 1]) > alpha)
    high = next(k for k in range(trials, -1, -1) if sum(pmf[k:]) > alpha)
    return range(low, high + 1)


def test_random_balance_is_uniform_and_unordered(backends, start_router, client_host):
    """Under `random`, 600 connections spread evenly *and* in no set order. Round-robin also spreads them
    evenly (200/200/200) but never sends two connections in a row to one backend: with independent uniform
    picks among 3, each of the 599 successive pairs repeats a backend with probability 1/3, independently (the
    differences of successive picks mod 3 are i.i.d. uniform), so the repeats are Binomial(599, 1/3) and fall in
    141..261 but with probability < 1.4e-7; strict rotation gives 0. The chi-square test has a false failure
    probability of 1e-7: this test fails by chance with probability < 3e-7."""
    _, ips = pool(backends, 3, **{"tcp.balance": "random"})
    start_router()
    order = greetings(client_host.name, client_host.host_ip, FRONT, 600)
    counts = Counter(order)
    assert set(counts) == set(ips)
    chi_square = sum((counts[ip] - 200) ** 2 / 200 for ip in ips)
    # With 2 degrees of freedom the chi-square tail is exp(-x/2): p > 1e-7 <=> x < 2 ln 1e7.
    assert chi_square < 2 * math.log(1e7), counts
    repeats = sum(a == b for a, b in itertools.pairwise(order))
    assert repeats in binomial_acceptance(599, 1 / 3, 1e-7), f"{repeats} repeats in {order[:30]}..."


def test_weights_in_nth_mode_are_exact(backends, start_router, client_host):
    light = backends.start({"tcp.port": str(FRONT), "tcp.weight": "1"})
    heavy = backends.start({"tcp.port": str(FRONT), "tcp.weight": "2"})
    start_router()
    counts = Counter(greetings(client_host.name, client_host.host_ip, FRONT, 30))
    assert counts == {backends.ip(light): 10, backends.ip(heavy): 20}


def _peer_seen_by_backend(backends, containers, ns: str | None, host: str) -> str:
    """Hold one connection open through the frontend and read its remote address on the backend's side."""

    def hold() -> str:
        with socket.create_connection((host, FRONT), timeout=3) as conn:
            greeting = conn.recv(256).decode().strip().removeprefix("Hi from ")
            container = next(c for c in containers if backends.ip(c) == greeting)
            peers = wait_until(lambda: peers_of(backends.pid(container), BACKEND_PORT), 3, what="the backend's socket")
            return peers[0]

    return in_netns(ns, hold)


def test_backend_sees_the_client_address_by_default(backends, start_router, client_host):
    containers, _ = pool(backends, 2)
    start_router()
    assert _peer_seen_by_backend(backends, containers, client_host.name, client_host.host_ip) == client_host.client_ip


def test_snat_always_shows_the_host_address(backends, start_router, client_host):
    containers, _ = pool(backends, 2)
    start_router("--snat", "always")
    gateway = containers[0].get_wrapped_container().attrs["NetworkSettings"]["Networks"]["bridge"]["Gateway"]
    assert _peer_seen_by_backend(backends, containers, client_host.name, client_host.host_ip) == gateway


def test_hairpin_from_a_container_on_the_same_bridge(backends, start_router, client_host):
    containers, ips = pool(backends, 2)
    neighbour = backends.start({})
    start_router()

    def ask_from(container) -> list[str]:
        name = container.get_wrapped_container().name
        command = ("docker", "exec", name, "nc", "-w", "3", client_host.host_ip, str(FRONT))
        return [sh(*command).strip().removeprefix("Hi from ") for _ in range(4)]

    assert ask_from(neighbour) == ips * 2
    # A pool member is never sent to itself (the bridge would drop the hairpin): it gets the other backend.
    assert ask_from(containers[0]) == [ips[1]] * 4


def test_localhost_is_routed_only_when_asked(backends, start_router, client_host):
    _, ips = pool(backends, 2)
    route_localnet = Path("/proc/sys/net/ipv4/conf/all/route_localnet")
    saved = route_localnet.read_text()
    try:
        router = start_router()
        assert connect_outcome(None, "127.0.0.1", FRONT) == "refused"  # loopback stays with the host by default
        router.stop()
        start_router("--route-localhost")
        assert route_localnet.read_text().strip() == "1"
        assert greetings(None, "127.0.0.1", FRONT, 4) == ips * 2
        assert greetings(client_host.name, client_host.host_ip, FRONT, 2) == ips
    finally:
        route_localnet.write_text(saved)


@pytest.fixture
def macvlan_network(docker_api, backends) -> Iterator[docker.models.networks.Network]:
    """A macvlan Docker network on a link made for the test (one end of a veth pair: this kernel has no dummy
    links), with TEST-NET-1 addresses; removed, with its containers and the link, after the test."""
    parent = unique("tcprmv")
    sh("ip", "link", "add", parent, "type", "veth", "peer", "name", f"{parent}p")
    network = None
    try:
        sh("ip", "link", "set", parent, "up")
        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet="192.0.2.0/24")])
        network = docker_api.networks.create(
            unique("tcpr-macvlan-"), driver="macvlan", options={"parent": parent}, ipam=ipam
        )
        yield network
    finally:
        backends.remove_all()
        if network is not None:
            network.remove()
        sh("ip", "link", "del", parent)


def test_a_backend_only_on_a_macvlan_network_is_rejected_and_the_others_route(
    backends, start_router, client_host, docker_api, macvlan_network
):
    """The host cannot reach its own macvlan children: such a backend would hang every connection sent to it."""
    stranded = backends.start({"tcp.port": str(FRONT)}, wait=False, network=macvlan_network)
    both = backends.start({"tcp.port": str(FRONT)})  # on the default bridge, and on the macvlan network too
    macvlan_network.connect(both.get_wrapped_container().id)
    plain = backends.start({"tcp.port": str(FRONT)})
    router = start_router()

    answers = greetings(client_host.name, client_host.host_ip, FRONT, 4)  # none hangs: none goes to `stranded`
    assert sorted(Counter(answers).values()) == [2, 2] and backends.ip(plain) in answers
    report = json.loads(tcprouter("status", "--json").stdout)
    [frontend] = report["frontends"]
    bridge = [f"{backends.ip(c)}:{BACKEND_PORT}" for c in (both, plain)]  # the bridge is each one's first network
    assert [b["address"] for b in frontend["backends"]] == bridge  # `both` is routed through its bridge address
    name = stranded.get_wrapped_container().name
    assert [(r["container"], r["reason"]) for r in report["rejected"]] == [(name, "network_unroutable")]
    assert "macvlan" in report["rejected"][0]["detail"]
    assert 'tcprouter_rejected_containers{reason="network_unroutable"} 1.0' in router.metrics_text()
    assert re.search(rf"container {name} \(\w+\) rejected: .*cannot route to", router.log())
