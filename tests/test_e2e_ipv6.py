"""End to end, dual stack: a lab engine of its own with IPv6 (daemon.json ipv6, ip6tables), tcprouter inside that
node's namespace (local mode), a client namespace on the lab bridge reaching the node over IPv6 and IPv4. Independent
of the host dockerd's configuration; the lab dockerd and tcprouter use the current iptables alternative."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from .cluster import DockerLab
from .support import (
    BACKEND_IMAGE,
    BACKEND_PORT,
    REPO,
    Router,
    connect_outcome,
    greetings,
    in_netns,
    peers_of,
    sh,
    wait_until,
)

pytestmark = pytest.mark.e2e
FRONT, V4_ONLY_FRONT = 8443, 8444
V6NET, V6NET_SUBNET, V4NET = "v6net", "fd00:20::/64", "v4net"
CLIENT = 50  # the client's host part on the lab bridge
IPV6_DAEMON = {"ipv6": True, "fixed-cidr-v6": "fd00:10::/64", "experimental": True, "ip6tables": True}


@pytest.fixture(scope="module")
def lab() -> Iterator[DockerLab]:
    """One engine with IPv6 on 198.18.97.11 / fd00:97::11, a network created with --ipv6 and an IPv4-only one."""
    lab = DockerLab(nodes=1, swarm=False, subnet="198.18.97", subnet6="fd00:97::", daemon_config=IPV6_DAEMON)
    lab.create()
    try:
        lab.docker(1, "network", "create", "--ipv6", "--subnet", V6NET_SUBNET, V6NET)
        lab.docker(1, "network", "create", V4NET)
        yield lab
    finally:
        lab.destroy()


@pytest.fixture(scope="module")
def client(lab: DockerLab) -> tuple[str, str]:
    """A client namespace on the lab bridge, with a route to the IPv6 container network through the node (to show
    that a backend's own address is not reachable): its name and IPv6 address."""
    name, _, address6 = lab.add_client(CLIENT)
    assert address6 is not None
    sh("ip", "-n", name, "-6", "route", "add", V6NET_SUBNET, "via", lab.node_address6(1))
    return name, address6


@pytest.fixture
def containers(lab: DockerLab) -> Iterator[list[str]]:
    """Containers a test starts on the lab engine (`docker run -d` arguments), removed after it."""
    started: list[str] = []
    yield started
    for container in started:
        lab.docker(1, "rm", "-f", container)


def run(lab: DockerLab, started: list[str], *args: str) -> dict:
    """Start a backend container; its inspect once it answers on its IPv4 address."""
    container = lab.docker(1, "run", "-d", *args, BACKEND_IMAGE).strip()
    started.append(container)
    info = lab.api(1).inspect_container(container)
    [network] = info["NetworkSettings"]["Networks"].values()
    address = network["IPAddress"]
    answering = lambda: connect_outcome(lab.node_ns(1), address, BACKEND_PORT, 1) == "answered"  # noqa: E731
    wait_until(answering, 10, 0.1, f"{address} answering")
    return info


class DualRouter(Router):
    """Started once both families are written: the IPv4 write, first, already counts as a sync."""

    def start(self) -> DualRouter:
        super().start()
        written = lambda: 'tcprouter_backends{family="ipv6"' in self.metrics_text()  # noqa: E731
        wait_until(written, 10, 0.05, "the IPv6 rules written")
        return self


@pytest.fixture
def router(lab: DockerLab, request: pytest.FixtureRequest) -> Iterator[Router]:
    """tcprouter in the node's namespace, following the node's engine; its rules removed after the test. Its nat
    side in iptables, or (parametrized indirectly) in nftables, on nft hosts only (the daemon refuses it on others)."""
    nat = getattr(request, "param", "iptables")
    if nat == "nftables" and not nft_lab(lab):
        pytest.skip("--nat nftables runs on nft hosts only")
    started = DualRouter("--nat", nat, "--docker-url", lab.node_url(1), netns=lab.node_ns(1))
    yield started
    started.stop()
    tcprouter_in(lab, "cleanup")


def nft_lab(lab: DockerLab) -> bool:
    return "nf_tables" in sh("ip", "netns", "exec", lab.node_ns(1), "ip6tables", "-V")


def ipv6_frontend_written(lab: DockerLab, nat: str) -> bool:
    """Whether the IPv6 nat side of FRONT is where --nat puts it: its slot map in the ip6 tcprouter table, or its
    chain in ip6tables' nat table (and not in the other)."""
    in_node = ("ip", "netns", "exec", lab.node_ns(1))
    chains = sh(*in_node, f"ip6tables-{'nft' if nft_lab(lab) else 'legacy'}-save", "-t", "nat")
    tables = sh(*in_node, "nft", "list", "tables", "ip6") if nft_lab(lab) else ""
    table = f"tcprouter-{FRONT % 64:02d}"
    in_nft = table in tables and f"map slots-tcp-{FRONT}" in sh(*in_node, "nft", "list", "table", "ip6", table)
    in_iptables = f":TCPR-FE-{FRONT} " in chains
    return (in_nft, in_iptables) == (nat == "nftables", nat == "iptables")


def tcprouter_in(lab: DockerLab, *args: str) -> str:
    done = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            lab.node_ns(1),
            sys.executable,
            "-m",
            "tcprouter",
            *args,
            "--docker-url",
            lab.node_url(1),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
        timeout=60,
    )
    return done.stdout


def addresses(info: dict) -> tuple[str, str]:
    [network] = info["NetworkSettings"]["Networks"].values()
    return network["IPAddress"], network["GlobalIPv6Address"]


@pytest.mark.parametrize("router", ["iptables", "nftables"], indirect=True)
def test_a_dual_stack_pool_rotates_exactly_on_both_families_and_an_ipv4_only_pool_is_not_offered_on_ipv6(
    lab, client, containers, router, request
):
    client, _ = client
    pool = [run(lab, containers, "--network", V6NET, "--label", f"tcp.port={FRONT}") for _ in range(3)]
    v4_only = run(lab, containers, "--network", V4NET, "--label", f"tcp.port={V4_ONLY_FRONT}")
    router.start()
    node4, node6 = lab.node_address(1), lab.node_address6(1)
    ips = [addresses(info)[0] for info in pool]  # a backend greets with its IPv4 address, whichever family
    assert greetings(client, node6, FRONT, 6) == ips * 2
    assert greetings(client, node4, FRONT, 3) == ips  # each family's rules rotate on their own
    assert greetings(client, node4, V4_ONLY_FRONT, 1) == [addresses(v4_only)[0]]
    assert connect_outcome(client, node6, V4_ONLY_FRONT) == "refused"  # no IPv6 backend: not routed (no NAT64)
    assert ipv6_frontend_written(lab, request.node.callspec.params["router"])

    metrics = router.metrics_text().splitlines()
    assert f'tcprouter_backends{{family="ipv6",frontend="{FRONT}",node="",protocol="tcp"}} 3.0' in metrics
    assert f'tcprouter_backends{{family="ipv6",frontend="{V4_ONLY_FRONT}",node="",protocol="tcp"}} 0.0' in metrics
    report = json.loads(tcprouter_in(lab, "status", "--json"))
    [frontend] = [f for f in report["frontends"] if f["port"] == FRONT]
    rows = {(b["family"], b["address"]) for b in frontend["backends"] if b["in_kernel"]}
    assert {(family, address) for family, address in rows if family == "ipv6"} == {
        ("ipv6", f"[{addresses(info)[1]}]:{BACKEND_PORT}") for info in pool
    }


def test_a_backends_ipv6_address_is_not_reachable_directly_and_the_client_address_is_preserved(
    lab, client, containers, router
):
    client, client_address = client
    pool = [run(lab, containers, "--network", V6NET, "--label", f"tcp.port={FRONT}") for _ in range(2)]
    router.start()
    _, backend6 = addresses(pool[0])
    assert connect_outcome(client, backend6, BACKEND_PORT) != "answered"  # routed to, but not forwarded
    assert connect_outcome(client, lab.node_address6(1), FRONT) == "answered"  # through the frontend it is

    def hold() -> str:
        with socket.create_connection((lab.node_address6(1), FRONT), timeout=3) as conn:
            greeting = conn.recv(256).decode().strip().removeprefix("Hi from ")
            [info] = [i for i in pool if addresses(i)[0] == greeting]
            return wait_until(lambda: peers_of(info["State"]["Pid"], BACKEND_PORT), 3, what="the backend's socket")[0]

    assert in_netns(client, hold) == client_address


def test_hairpin_over_ipv6_from_a_container_on_the_backends_network(lab, containers, router):
    pool = [run(lab, containers, "--network", V6NET, "--label", f"tcp.port={FRONT}") for _ in range(3)]
    neighbour = run(lab, containers, "--network", V6NET)
    router.start()
    ips = [addresses(info)[0] for info in pool]
    asked = [
        lab.docker(1, "exec", neighbour["Id"], "nc", "-w", "3", lab.node_address6(1), str(FRONT))
        .strip()
        .removeprefix("Hi from ")
        for _ in range(3)
    ]
    assert sorted(asked) == sorted(ips)  # three new connections: each backend once


@pytest.mark.parametrize("router", ["iptables", "nftables"], indirect=True)
def test_cleanup_removes_the_ipv6_rules_and_leaves_dockers(lab, containers, router, request):
    run(lab, containers, "--network", V6NET, "--label", f"tcp.port={FRONT}")
    router.start()
    in_node = ("ip", "netns", "exec", lab.node_ns(1))
    save = (*in_node, f"ip6tables-{'nft' if nft_lab(lab) else 'legacy'}-save")
    assert ipv6_frontend_written(lab, request.node.callspec.params["router"]), router.log()
    docker_before = [line for line in sh(*save).splitlines() if "DOCKER" in line and "TCPR" not in line]
    router.stop()
    tcprouter_in(lab, "cleanup")
    after = sh(*save)
    assert "TCPR-" not in after
    assert [line for line in after.splitlines() if "DOCKER" in line] == docker_before
    assert not nft_lab(lab) or "tcprouter-" not in sh(*in_node, "nft", "list", "tables")
