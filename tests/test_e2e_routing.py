"""End to end: real Docker containers, real kernel rules on this host, real TCP from a client namespace."""

from __future__ import annotations

import json
import math
import re
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

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


def test_random_balance_is_uniform(backends, start_router, client_host):
    _, ips = pool(backends, 3, **{"tcp.balance": "random"})
    start_router()
    counts = Counter(greetings(client_host.name, client_host.host_ip, FRONT, 600))
    assert set(counts) == set(ips)
    chi_square = sum((counts[ip] - 200) ** 2 / 200 for ip in ips)
    # With 2 degrees of freedom the chi-square tail is exp(-x/2): p > 0.001 <=> x < 2 ln 1000.
    assert chi_square < 2 * math.log(1000), counts


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
