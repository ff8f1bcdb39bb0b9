"""End to end: who may claim a port (--ports, pool ownership, --internal networks, Docker's published ports),
with real containers, the real kernel and a client namespace."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from .support import (
    BACKEND_IMAGE,
    BACKEND_PORT,
    connect_outcome,
    free_port,
    greetings,
    owned_rules_in_host,
    tcprouter,
    unique,
    wait_until,
)

pytestmark = pytest.mark.e2e
FRONT = 27017
MQTT = 1883
PROJECT = "com.docker.compose.project"


def rejections(*flags: str) -> list[tuple[str, str, str]]:
    """(container, reason, detail) of every rejected container, as `tcprouter status --json` reports them."""
    report = json.loads(tcprouter("status", "--json", *flags).stdout)
    return [(r["container"], r["reason"], r["detail"]) for r in report["rejected"]]


def name(container) -> str:
    return container.get_wrapped_container().name


def test_a_rogue_of_another_project_gets_no_connection_and_is_reported(
    backends, start_router, client_host, host_tables
):
    """The owner of a frontend is its oldest backend's Compose project: a later container of another project,
    however heavy its weight, is rejected, never in the kernel, and named in status, metrics and the log."""
    shop = [backends.start({"tcp.port": str(FRONT), PROJECT: "shop"}) for _ in range(2)]
    router = start_router()
    rogue = backends.start({"tcp.port": str(FRONT), "tcp.weight": "100", PROJECT: "rogue"})
    wait_until(
        lambda: 'tcprouter_rejected_containers{reason="port_owned"} 1.0' in router.metrics_text(),
        5,
        what="the rogue to be rejected",
    )

    answers = greetings(client_host.name, client_host.host_ip, FRONT, 20)
    assert set(answers) == {backends.ip(c) for c in shop}
    assert not [rule for rule in owned_rules_in_host(host_tables) if backends.ip(rogue) + ":" in rule]
    [(rejected, reason, detail)] = rejections()
    assert (rejected, reason) == (name(rogue), "port_owned")
    assert "'shop'" in detail and "'rogue'" in detail and name(shop[0]) in detail
    assert re.search(rf"container {name(rogue)} \(\w+\) rejected: .*belongs to", router.log())


def test_a_port_outside_the_allowed_ports_is_refused(backends, start_router, client_host):
    allowed = backends.start({"tcp.port": str(MQTT)})
    outside = backends.start({"tcp.port": str(FRONT)})
    router = start_router("--ports", f"{MQTT},8000-8100")

    assert greetings(client_host.name, client_host.host_ip, MQTT, 2) == [backends.ip(allowed)] * 2
    assert connect_outcome(client_host.name, client_host.host_ip, FRONT) == "refused"
    [(rejected, reason, detail)] = rejections("--ports", f"{MQTT},8000-8100")
    assert (rejected, reason) == (name(outside), "port_not_allowed")
    assert f"--ports {MQTT},8000-8100" in detail
    assert 'tcprouter_rejected_containers{reason="port_not_allowed"} 1.0' in router.metrics_text()


@pytest.fixture
def internal_network(docker_api, backends) -> Iterator[docker.models.networks.Network]:
    """A Docker --internal bridge network, removed (with its containers) after the test."""
    network = docker_api.networks.create(unique("tcpr-internal-"), internal=True)
    try:
        yield network
    finally:
        backends.remove_all()
        network.remove()


def test_a_backend_only_on_an_internal_network_is_rejected(backends, start_router, client_host, internal_network):
    """Docker cuts an --internal network off from the world: tcprouter must not open a way in."""
    hidden = backends.start({"tcp.port": str(FRONT)}, wait=False, network=internal_network)
    plain = backends.start({"tcp.port": str(FRONT)})
    router = start_router()

    assert greetings(client_host.name, client_host.host_ip, FRONT, 4) == [backends.ip(plain)] * 4
    [(rejected, reason, detail)] = rejections()
    assert (rejected, reason) == (name(hidden), "network_internal")
    assert internal_network.name in detail
    assert 'tcprouter_rejected_containers{reason="network_internal"} 1.0' in router.metrics_text()


@pytest.fixture
def published(docker_api) -> Iterator[tuple[int, str]]:
    """A container published with `docker run -p <port>:1234` (Docker's DNAT rule, and its userland proxy's
    listener if the daemon runs one): (the host port, the container's address); removed after the test."""
    port = free_port()
    container = docker_api.containers.run(
        BACKEND_IMAGE, detach=True, name=unique("tcpr-published-"), ports={f"{BACKEND_PORT}/tcp": port}
    )
    try:
        container.reload()
        yield port, container.attrs["NetworkSettings"]["IPAddress"]
    finally:
        container.remove(force=True)


def test_a_port_docker_publishes_is_protected(backends, start_router, client_host, published):
    port, address = published
    squatter = backends.start({"tcp.port": str(port), "tcp.weight": "100"})
    router = start_router()

    [(rejected, reason, detail)] = rejections()
    assert (rejected, reason) == (name(squatter), "port_in_use")
    assert f"Docker publishes it (DNAT to {address}:{BACKEND_PORT})" in detail  # read from Docker's nat chain
    assert 'tcprouter_rejected_containers{reason="port_in_use"} 1.0' in router.metrics_text()
    assert greetings(client_host.name, client_host.host_ip, port, 4) == [address] * 4  # Docker's mapping still works


def test_with_route_localhost_a_service_on_127_0_0_1_keeps_its_port(backends, start_router):
    """A host service bound to 127.0.0.1 only is hijacked by a 127.0.0.1 route: its port is in use then."""
    route_localnet = Path("/proc/sys/net/ipv4/conf/all/route_localnet")
    saved = route_localnet.read_text()
    with socket.create_server(("127.0.0.1", 0)) as service:
        port = service.getsockname()[1]
        squatter = backends.start({"tcp.port": str(port)})
        try:
            router = start_router("--route-localhost")
            [(rejected, reason, detail)] = rejections("--route-localhost")
            assert (rejected, reason) == (name(squatter), "port_in_use")
            assert f"127.0.0.1:{port}" in detail
            assert 'tcprouter_rejected_containers{reason="port_in_use"} 1.0' in router.metrics_text()
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                conn, _ = service.accept()  # the connection reached the host's service, not the container
                conn.close()
        finally:
            route_localnet.write_text(saved)
