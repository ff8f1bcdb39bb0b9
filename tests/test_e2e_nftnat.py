"""End to end, `--nat nftables`: the real daemon on this host, real Docker containers, real TCP and UDP from a client
namespace; the frontends' dispatch and DNAT in tcprouter's own nftables tables (`ip tcprouter-00` .. `-63`), the
FORWARD lock, the masquerade and the canary still in iptables."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tcprouter.model import Family
from tcprouter.nftnat_read import slot_rules

from .support import (
    BACKEND_PORT,
    CLIENT_SUBNET,
    Load,
    Router,
    connect_outcome,
    greetings,
    owned_rules_in_host,
    private_netns,
    sh,
    tcprouter,
    udp_ask,
    udp_flow,
    udp_greetings,
    wait_until,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def nft_host(flavour: str) -> None:
    """--nat nftables runs on nft hosts only (the daemon refuses it on a legacy one)."""
    if flavour != "nft":
        pytest.skip("--nat nftables runs on nft hosts only")


FRONT = 27017
COAP = 5683
TABLES = 64
NFT_FAMILIES = ("ip", "ip6")
# The iptables nat side of `--nat iptables`: the dispatch (flat, or the tree's buckets) and the frontend chains.
IPTABLES_NAT_CHAIN = re.compile(r"^:(TCPR-FRONTENDS|TCPR-FE-\d+|TCPR-UDP-\d+|TCPR-D[TU]\d+x\d+) ", re.M)


def table_name(port: int) -> str:
    """The nft table of a frontend port, as the brief states it (port % 64, two digits): not taken from the code."""
    return f"tcprouter-{port % TABLES:02d}"


def nft_tables(family: str = "ip") -> list[str]:
    """The host's tcprouter-* nftables tables of `family` ("ip" or "ip6")."""
    names = [line.split()[-1] for line in sh("nft", "list", "tables", family).splitlines() if line.startswith("table")]
    return sorted(name for name in names if name.startswith("tcprouter-"))


def nft_table(port: int, family: str = "ip") -> dict[str, dict[str, dict]]:
    """The objects of the table of `port` (`nft -j`): {"chain": {name: ...}, "map": {name: ...}}."""
    listing = json.loads(sh("nft", "-j", "list", "table", family, table_name(port)))
    objects: dict[str, dict[str, dict]] = {"chain": {}, "map": {}, "rule": {}}
    for item in listing["nftables"]:
        for kind in ("chain", "map"):
            if kind in item:
                objects[kind][item[kind]["name"]] = item[kind]
    return objects


def slot_addresses(port: int, protocol: str = "tcp") -> list[str]:
    """The backend addresses of the frontend's slot map, in slot order."""
    slots = nft_table(port)["map"][f"slots-{protocol}-{port}"]
    addresses = []
    for element in sorted(slots.get("elem", []), key=_slot_number):
        target = element[1]  # [key, "address . port" as {"concat": [address, port]}]
        addresses.append(target["concat"][0])
    return addresses


def _slot_number(element: list) -> int:
    key = element[0]
    return key["elem"]["val"] if isinstance(key, dict) else key


def slot_counters(port: int, protocol: str = "tcp") -> list[int]:
    """The packet counter of each slot (one packet per new connection: only its first one walks the nat hooks)."""
    slots = nft_table(port)["map"][f"slots-{protocol}-{port}"]
    return [e[0]["elem"]["counter"]["packets"] for e in sorted(slots.get("elem", []), key=_slot_number)]


def iptables_nat_frontends(flavour: str) -> list[str]:
    """The iptables nat chains of the `--nat iptables` frontends (and their dispatch) now on this host."""
    return IPTABLES_NAT_CHAIN.findall(sh(f"iptables-{flavour}-save", "-t", "nat"))


def strict_rotation(answers: list[str], members: list[str]) -> bool:
    """Whether `answers` go round `members` one after another, each in turn, whatever the starting point."""
    n = len(members)
    first = answers[:n]
    return sorted(first) == sorted(members) and all(a == first[i % n] for i, a in enumerate(answers))


def answered_by(ns: str, address: str, port: int, count: int, ip: str) -> bool:
    """Whether `ip` answers one of `count` connections (False, not an error, while a connection fails)."""
    try:
        return ip in greetings(ns, address, port, count, timeout=1)
    except OSError:
        return False


@pytest.fixture(autouse=True)
def nft_tables_removed(host_tables: str) -> Iterator[None]:
    """Set up before `start_router` (autouse), so torn down after it has stopped the routers and run `tcprouter
    cleanup`: a tcprouter-* table that the test's daemons made and cleanup left is deleted here (only those absent
    before the test), and the test errors."""
    before = {family: set(nft_tables(family)) for family in NFT_FAMILIES}
    yield
    left = {family: sorted(set(nft_tables(family)) - before[family]) for family in NFT_FAMILIES}
    for family, names in left.items():
        for name in names:
            sh("nft", "delete", "table", family, name, check=False)
    assert left == {family: [] for family in NFT_FAMILIES}, "tcprouter cleanup left nftables tables"


@pytest.fixture
def start_nat_router(start_router, request: pytest.FixtureRequest) -> Callable[..., Router]:
    """`start_router` with `--nat <nat>` first: each router is put in the list that start_router's teardown stops
    *before* it is started, so one whose first sync never comes is stopped too."""

    def start(nat: str = "nftables", *args: str) -> Router:
        router = Router("--nat", nat, *args)
        request.node.routers.append(router)  # start_router's list (conftest): stopped, and logged on failure
        return router.start()

    return start


def pool(backends, count: int, port: int = FRONT, **labels: str) -> tuple[list, list[str]]:
    containers = [backends.start({"tcp.port": str(port), **labels}) for _ in range(count)]
    return containers, [backends.ip(c) for c in containers]


def udp_pool(backends, count: int, port: int = COAP) -> tuple[list, list[str]]:
    containers = [backends.start({"udp.port": str(port)}) for _ in range(count)]
    ips = [backends.ip(c) for c in containers]
    for ip in ips:  # the TCP greeter is up (Backends.start waited for it); the UDP one starts beside it

        def answers(ip: str = ip) -> bool:
            with udp_flow(None) as flow:
                try:
                    return udp_ask(flow, ip, BACKEND_PORT, 0.2) == ip
                except TimeoutError:
                    return False

        wait_until(answers, 5, what=f"{ip} answering datagrams")
    return containers, ips


def docker_stop(container, timeout: int = 5) -> threading.Thread:
    """`docker stop` in the background (the backend's shell ignores SIGTERM: it returns after `timeout` s)."""
    stopping = threading.Thread(target=container.get_wrapped_container().stop, kwargs={"timeout": timeout})
    stopping.start()
    return stopping


def more_outcomes(load: Load, count: int, what: str) -> None:
    """Wait for `count` more connections of `load`."""
    target = len(load.outcomes) + count
    wait_until(lambda: len(load.outcomes) >= target, 30, what=what)


def test_three_backends_rotate_exactly_through_the_nft_tables(
    backends, start_nat_router, client_host, host_tables, foreign_rules
):
    _, ips = pool(backends, 3)
    before = foreign_rules()
    start_nat_router("nftables")
    assert greetings(client_host.name, client_host.host_ip, FRONT, 6) == ips + ips

    assert iptables_nat_frontends(host_tables) == []
    assert any(":TCPR-FORWARD " in r for r in owned_rules_in_host(host_tables))  # the filter side stays
    assert nft_tables("ip") == [f"tcprouter-{n:02d}" for n in range(TABLES)]
    table = nft_table(FRONT)
    assert f"slots-tcp-{FRONT}" in table["map"]
    assert {"prerouting", "output", "route"} <= set(table["chain"])
    assert slot_addresses(FRONT) == ips
    assert slot_counters(FRONT) == [2, 2, 2]  # the 6 connections went through these slots
    assert all(f"slots-tcp-{FRONT}" not in nft_table(port)["map"] for port in (FRONT + 1, FRONT - 1))
    assert foreign_rules() == before


def test_a_stopped_backend_leaves_and_a_started_one_joins(backends, start_nat_router, client_host, host_tables):
    containers, ips = pool(backends, 3)
    start_nat_router("nftables")
    ns, host = client_host.name, client_host.host_ip
    assert greetings(ns, host, FRONT, 6) == ips + ips

    stopping = docker_stop(containers[0])
    stopped = time.monotonic()
    try:
        # Drained at the stop's kill event, before the process ends (it ignores SIGTERM for 5 s).
        wait_until(lambda: ips[0] not in slot_addresses(FRONT), 5, 0.01, what="the stopped backend's slot to go")
        assert time.monotonic() - stopped <= 1.0
        assert strict_rotation(greetings(ns, host, FRONT, 6), ips[1:])
    finally:
        stopping.join(30)

    fourth = backends.start({"tcp.port": str(FRONT)}, wait=False)
    started = time.monotonic()
    fourth_ip = backends.ip(fourth)
    wait_until(lambda: answered_by(ns, host, FRONT, 3, fourth_ip), 5, what="the new backend to answer")
    assert time.monotonic() - started <= 1.5
    assert strict_rotation(greetings(ns, host, FRONT, 9), [*ips[1:], fourth_ip])
    assert sorted(slot_addresses(FRONT)) == sorted([*ips[1:], fourth_ip])
    assert iptables_nat_frontends(host_tables) == []  # the partial syncs wrote the nft tables only


def test_udp_flows_rotate_and_a_stopped_backend_leaves(backends, start_nat_router, client_host, host_tables):
    containers, ips = udp_pool(backends, 3)
    start_nat_router("nftables")
    ns, host = client_host.name, client_host.host_ip
    assert udp_greetings(ns, host, COAP, 6) == ips + ips
    assert f"slots-udp-{COAP}" in nft_table(COAP)["map"]
    assert iptables_nat_frontends(host_tables) == []

    stopping = docker_stop(containers[1])
    stopped = time.monotonic()
    try:
        wait_until(lambda: ips[1] not in slot_addresses(COAP, "udp"), 5, 0.01, what="the stopped backend's slot to go")
        assert time.monotonic() - stopped <= 1.0
        assert strict_rotation(udp_greetings(ns, host, COAP, 6), [ips[0], ips[2]])
    finally:
        stopping.join(30)


def test_cleanup_removes_the_nft_tables_and_owned_chains_and_leaves_dockers(
    backends, start_nat_router, client_host, host_tables, foreign_rules
):
    _, ips = pool(backends, 2)
    udp_pool(backends, 1)
    before = foreign_rules()
    docker_tables = sorted(sh("nft", "list", "tables").splitlines())
    router = start_nat_router("nftables")
    ns, host = client_host.name, client_host.host_ip
    assert greetings(ns, host, FRONT, 4) == ips * 2
    router.stop()
    assert router.process.returncode == 0, router.log()[-3000:]
    assert len(nft_tables("ip")) == TABLES  # a stopped daemon leaves its rules: the frontends still route
    assert greetings(ns, host, FRONT, 2) == ips

    tcprouter("cleanup")
    assert {family: nft_tables(family) for family in NFT_FAMILIES} == {"ip": [], "ip6": []}
    assert owned_rules_in_host(host_tables) == []
    assert foreign_rules() == before  # Docker's chains and rules, as they were
    assert sorted(sh("nft", "list", "tables").splitlines()) == docker_tables
    assert connect_outcome(ns, host, FRONT, 2) == "refused"  # nothing routes the port now: the host answers


def test_restarts_between_iptables_and_nftables_keep_routing(backends, start_nat_router, client_host, host_tables):
    _, ips = pool(backends, 3)
    ns, host = client_host.name, client_host.host_ip

    def frontends_in_iptables_only() -> None:
        assert f"TCPR-FE-{FRONT}" in iptables_nat_frontends(host_tables)
        assert {family: nft_tables(family) for family in NFT_FAMILIES} == {"ip": [], "ip6": []}

    def frontends_in_nftables_only() -> None:
        assert iptables_nat_frontends(host_tables) == []
        assert f"slots-tcp-{FRONT}" in nft_table(FRONT)["map"]
        assert slot_addresses(FRONT) == ips

    router = start_nat_router("iptables")
    assert greetings(ns, host, FRONT, 6) == ips + ips
    frontends_in_iptables_only()
    load = Load(ns, host, FRONT, interval=0.01, limit=100_000).start()
    try:
        for nat, where in (("nftables", frontends_in_nftables_only), ("iptables", frontends_in_iptables_only)):
            more_outcomes(load, 50, "load before the restart")
            router.stop()
            router = start_nat_router(nat)
            where()
            more_outcomes(load, 50, "load after the restart")
    finally:
        load.stop()
    assert load.failures == []
    assert {answer for _, answer, _ in load.outcomes} == set(ips)
    assert strict_rotation(greetings(ns, host, FRONT, 6), ips)


def test_render_prints_the_nft_tables_run_loads_then_the_iptables_side(backends, start_nat_router, client_host):
    """`render --nat nftables`: the `nft -f` text of the tables, which loaded into an empty namespace holds the slots
    the daemon wrote here, then the iptables-restore script of the filter side (no nat frontend chains)."""
    _, ips = pool(backends, 3)
    start_nat_router("nftables")
    assert greetings(client_host.name, client_host.host_ip, FRONT, 3) == ips
    rendered = tcprouter("render", "--nat", "nftables").stdout
    nat, iptables = rendered.removeprefix("# nft -f -\n").split("# iptables-restore --noflush\n")
    assert "*filter" in iptables and not IPTABLES_NAT_CHAIN.search(iptables)
    with private_netns() as ns:
        sh("ip", "netns", "exec", ns, "nft", "-f", "-", input=nat)
        loaded = [(rule.chain, rule.spec) for _, rule in slot_rules(Family.IPV4, ns)]
    written = [(rule.chain, rule.spec) for _, rule in slot_rules(Family.IPV4)]
    assert loaded == written and len(written) == 3


def test_hairpin_a_neighbour_rotates_and_a_member_never_gets_itself(backends, start_nat_router, client_host):
    """From a container of the same bridge, through the nft tables: a neighbour rotates over the pool; a member's
    own connections go to the other backend (map self), and a lone member's are not DNATed at all (set unrouted)."""
    containers, ips = pool(backends, 2)
    neighbour = backends.start({})
    start_nat_router("nftables")

    def ask_from(container, port: int = FRONT) -> list[str]:
        name = container.get_wrapped_container().name
        command = ("docker", "exec", name, "nc", "-w", "3", client_host.host_ip, str(port))
        return [sh(*command, check=False).strip().removeprefix("Hi from ") for _ in range(4)]

    assert ask_from(neighbour) == ips * 2
    assert ask_from(containers[0]) == [ips[1]] * 4
    [lone] = pool(backends, 1, FRONT + 1)[0]
    wait_until(lambda: answered_by(client_host.name, client_host.host_ip, FRONT + 1, 1, backends.ip(lone)), 5)
    assert ask_from(lone, FRONT + 1) == [""] * 4  # not sent to itself: the host answers (nothing listens there)


def host_address_towards(ip: str) -> str:
    """The host's own address on the route to `ip` (its address on a backend's bridge)."""
    return sh("ip", "-4", "-o", "route", "get", ip).split(" src ")[1].split()[0]


def test_listen_address_and_route_localhost_choose_what_the_nft_dispatch_takes(backends, start_nat_router, client_host):
    _, ips = pool(backends, 2)
    ns, host = client_host.name, client_host.host_ip
    bridge_side = host_address_towards(ips[0])
    router = start_nat_router("nftables", "--listen-address", host)
    assert greetings(ns, host, FRONT, 4) == ips * 2
    assert connect_outcome(None, bridge_side, FRONT) == "refused"  # another address of the host: not routed
    assert connect_outcome(None, "127.0.0.1", FRONT) == "refused"
    router.stop()

    route_localnet = Path("/proc/sys/net/ipv4/conf/all/route_localnet")
    saved = route_localnet.read_text()
    try:
        start_nat_router("nftables", "--route-localhost")
        assert greetings(None, "127.0.0.1", FRONT, 4) == ips * 2  # from the host itself, through the output hook
        assert greetings(None, bridge_side, FRONT, 2) == ips
        assert greetings(ns, host, FRONT, 2) == ips
    finally:
        route_localnet.write_text(saved)


def test_synproxy_answers_the_syns_and_the_nft_tables_dnat_in_exact_rotation(backends, start_nat_router, client_host):
    """SYNPROXY (iptables raw and filter) in front of the nft DNAT: the handshake the proxy completes is handed on
    to the backend the slot map picks; spoofed SYNs leave no conntrack entry."""
    order = pool(backends, 2, **{"tcp.synproxy": "true"})[1]
    start_nat_router("nftables")
    ns, host = client_host.name, client_host.host_ip
    assert greetings(ns, host, FRONT, 4) == order * 2
    assert slot_counters(FRONT) == [2, 2]
    client_host.forget_flows()
    spoofed = f"{CLIENT_SUBNET}.77"
    hping = ("hping3", "-q", "-S", "-a", spoofed, "-p", str(FRONT), "-i", "u200", "-c", "500", host)
    sh("ip", "netns", "exec", ns, *hping, check=False)  # exits 1: no replies reach it
    tracked = sh("conntrack", "-L", "-p", "tcp", "--orig-port-dst", str(FRONT), check=False)
    assert tracked.splitlines() == []
    assert greetings(ns, host, FRONT, 2) == order
