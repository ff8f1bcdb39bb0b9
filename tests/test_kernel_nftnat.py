"""The nftables nat layout (tcprouter/nftnat.py) in a real kernel: loaded with `nft -f` into a private router
namespace, real TCP connections from a client namespace, each backend a listener that greets with its name."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import pytest

from tcprouter import sync
from tcprouter.compiler import Options
from tcprouter.metrics import Metrics, backend_connections
from tcprouter.model import Backend, Balance, ContainerSnapshot, DesiredState, Family, Frontend
from tcprouter.netfilter import Iptables, Nft, detect_flavour
from tcprouter.nf_tables import NFT_MSG_DELTABLE
from tcprouter.nftnat import nat_pools, pick_chain, ruleset_text, table_of
from tcprouter.nftnat_netlink import NatSocket, Request
from tcprouter.sync import Syncer

from .nft_listing import listing, rules_of_listing
from .strategies import container
from .support import greeter, greetings, in_netns, private_netns, sh, unique

ROUTER, CLIENT = "10.99.0.1", "10.99.0.2"


@pytest.fixture
def nat_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The syncers' nat writes over netlink, each as the number of tables it replaces whole (64: a full load; 0: a
    change)."""
    writes: list[int] = []

    class RecordingNatSocket(NatSocket):
        def send_each(self, batches: Iterable[Sequence[Request]]) -> None:
            batches = [list(batch) for batch in batches]
            writes.append(sum(m.type == NFT_MSG_DELTABLE for batch in batches for m in batch))
            super().send_each(batches)

        def send(self, messages: Sequence[Request]) -> dict[str, int]:
            writes.append(sum(m.type == NFT_MSG_DELTABLE for m in messages))
            return super().send(messages)

    monkeypatch.setattr(sync, "NatSocket", RecordingNatSocket)
    return writes


SERVERS = ("10.99.0.11", "10.99.0.12", "10.99.0.13")  # the router's other addresses, where its backends listen


@contextmanager
def router_and_client() -> Iterator[tuple[str, str]]:
    with private_netns() as router, private_netns() as client:
        here, there = unique("tcpr"), unique("tcpr")
        sh("ip", "link", "add", here, "netns", router, "type", "veth", "peer", "name", there, "netns", client)
        for ns, dev, addresses in ((router, here, (ROUTER, *SERVERS)), (client, there, (CLIENT,))):
            for address in addresses:
                sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", router, "link", "set", "lo", "up")  # the router's connections to itself go over loopback
        yield router, client


def load(ns: str, state: DesiredState) -> None:
    options = Options()
    sh("ip", "netns", "exec", ns, "nft", "-f", "-", input=ruleset_text(nat_pools(state, options).values(), options))


def slot_counts(ns: str, port: int) -> list[int]:
    """The packets counted by each slot of the frontend's map, in slot order."""
    listed = sh("ip", "netns", "exec", ns, "nft", "-j", "list", "map", "ip", table_of(port), f"slots-tcp-{port}")
    (found,) = [item["map"] for item in json.loads(listed)["nftables"] if "map" in item]
    keys = [key["elem"] for key, _ in found["elem"]]  # [{"elem": {"val": slot, "counter": {...}}}, address . port]
    return [key["counter"]["packets"] for key in sorted(keys, key=lambda key: key["val"])]


@contextmanager
def weighted_pool(router: str) -> Iterator[tuple[Backend, ...]]:
    """Backends a, b (weight 2) and c: greeters on the router's SERVERS addresses."""
    with ExitStack() as stack:
        ports = [
            stack.enter_context(greeter(router, address, name)) for address, name in zip(SERVERS, "abc", strict=True)
        ]
        yield (
            Backend("a" * 64, "a", SERVERS[0], ports[0]),
            Backend("b" * 64, "b", SERVERS[1], ports[1], weight=2),
            Backend("c" * 64, "c", SERVERS[2], ports[2]),
        )


def nft_syncer(router: str) -> Syncer:
    """The daemon's Syncer of `router`, the nat side in its nft tables."""
    options = Options(nat_tables=True, forward_parent="FORWARD")
    return Syncer(
        Iptables(detect_flavour(), netns=router), options, "tcp", Metrics(lambda: ({}, [])), nat_writer=Nft(router)
    )


def containers(port: int, backends: Sequence[Backend], first: int = 0) -> list[ContainerSnapshot]:
    """A container per backend (numbered from `first`), labelled for frontend `port`, on the greeters' subnet."""
    return [
        container(
            first + i,
            name=f"{backend.name}-{port}",
            labels={
                "tcp.port": str(port),
                "tcp.backend_port": str(backend.port),
                **({"tcp.weight": str(backend.weight)} if backend.weight != 1 else {}),
            },
            networks={"n": backend.ip},
            subnets={"n": "10.99.0.0/24"},
        )
        for i, backend in enumerate(backends)
    ]


def test_connections_follow_the_weighted_rotation_exactly_and_each_slot_counts_its_own():
    with router_and_client() as (router, client), weighted_pool(router) as pool:
        load(router, DesiredState({27017: Frontend(27017, Balance.ROUNDROBIN, pool)}))
        seen = greetings(client, ROUTER, 27017, 8)
        assert seen == ["b", "a", "c", "b"] * 2  # compiler.rotation's smooth order, strictly, twice
        assert slot_counts(router, 27017) == [2, 2, 2, 2]
        # what the metrics and `status` read: the slots as the DNAT rules iptables would hold, with their counts
        read = rules_of_listing(listing(router, Family.IPV4))
        assert backend_connections(read) == {("27017", "a"): 2, ("27017", "b"): 4, ("27017", "c"): 2}
        assert greetings(router, ROUTER, 27017, 4) == ["b", "a", "c", "b"]  # from the host itself: the output hook


def test_a_backend_s_own_connection_goes_to_another_backend_without_moving_the_rotation():
    with router_and_client() as (router, client), ExitStack() as stack:
        own = stack.enter_context(greeter(client, CLIENT, "own"))
        other = stack.enter_context(greeter(router, SERVERS[0], "other"))
        pool = (Backend("a" * 64, "own", CLIENT, own), Backend("b" * 64, "other", SERVERS[0], other))
        load(router, DesiredState({27018: Frontend(27018, Balance.ROUNDROBIN, pool)}))
        assert greetings(client, ROUTER, 27018, 3) == ["other"] * 3
        assert slot_counts(router, 27018) == [0, 0]
        assert greetings(router, ROUTER, 27018, 2) == ["own", "other"]  # anyone else: the rotation


def test_a_port_without_a_frontend_is_left_to_the_host_and_a_reload_replaces_the_tables():
    with router_and_client() as (router, client), ExitStack() as stack:
        a = stack.enter_context(greeter(router, ROUTER, "a"))
        b = stack.enter_context(greeter(router, ROUTER, "b"))
        first = Frontend(27019, Balance.ROUNDROBIN, (Backend("a" * 64, "a", ROUTER, a),))
        load(router, DesiredState({27019: first}))
        assert greetings(client, ROUTER, 27019, 2) == ["a", "a"]
        moved = Frontend(27083, Balance.ROUNDROBIN, (Backend("b" * 64, "b", ROUTER, b),))  # same table, 27019 gone
        load(router, DesiredState({27083: moved}))
        assert greetings(client, ROUTER, 27083, 2) == ["b", "b"]
        refused = in_netns(client, lambda: socket.socket())
        with refused:
            refused.settimeout(3)
            assert refused.connect_ex((ROUTER, 27019)) != 0  # nothing listens there: the host's reset


def test_the_syncer_routes_through_the_nft_tables_and_writes_a_change_over_netlink(nat_writes: list[int]):
    """Options.nat_tables: the iptables nat table keeps only masquerade and the canary; the dispatch and the DNAT
    are the nft tables', loaded whole; a backend leaving is one transaction about its frontend alone."""
    with router_and_client() as (router, client), ExitStack() as stack:
        a, b = (
            stack.enter_context(greeter(router, address, name)) for address, name in zip(SERVERS, "ab", strict=False)
        )
        view = containers(27017, (Backend("a" * 64, "a", SERVERS[0], a), Backend("b" * 64, "b", SERVERS[1], b)))
        syncer = nft_syncer(router)
        assert syncer.sync(view, full=True)
        assert sorted(greetings(client, ROUTER, 27017, 4)) == ["a", "a", "b", "b"]
        nat = Iptables(detect_flavour(), netns=router).read()[0]["nat"]
        assert not [chain for chain in nat if chain.startswith(("TCPR-FE-", "TCPR-FRONTENDS"))]
        assert nat_writes == [64]
        assert syncer.sync(view[1:])  # a leaves
        assert greetings(client, ROUTER, 27017, 3) == ["b"] * 3
        assert nat_writes == [64, 0]  # a change, not a reload


def test_a_change_of_a_frontend_leaves_its_pick_chain_neighbour_and_its_rotation_alone(nat_writes: list[int]):
    """27017 and 27529 share a table and a pick chain (27529 = 27017 + 512). 27529 loses a backend and gets it back:
    its rule is replaced twice (found by the handle read from its chain after the load, then by the one the kernel
    echoed), in one transaction each; 27017's rule stays, and its rotation goes on where it was."""
    with router_and_client() as (router, client), weighted_pool(router) as pool:
        assert pick_chain(27017) == pick_chain(27529) and table_of(27017) == table_of(27529)

        rotating, neighbour = containers(27017, pool), containers(27529, (pool[0], pool[2]), 10)
        syncer = nft_syncer(router)
        assert syncer.sync([*rotating, *neighbour], full=True)
        assert greetings(client, ROUTER, 27017, 1) == ["b"]
        with NatSocket(router) as sock:
            kept = sock.chain_handles(Family.IPV4, table_of(27017), pick_chain(27017))["tcp-27017"]
        assert syncer.sync([*rotating, *neighbour[:1]])  # the neighbour's size changes: its rule is replaced
        assert greetings(client, ROUTER, 27529, 2) == ["a", "a"]
        assert syncer.sync([*rotating, *neighbour])
        assert sorted(greetings(client, ROUTER, 27529, 2)) == ["a", "c"]
        assert nat_writes == [64, 0, 0]  # changes, not reloads
        assert greetings(client, ROUTER, 27017, 3) == ["a", "c", "b"]  # the rotation's next slots
        with NatSocket(router) as sock:
            handles = sock.chain_handles(Family.IPV4, table_of(27017), pick_chain(27017))
        assert handles["tcp-27017"] == kept and set(handles) == {"tcp-27017", "tcp-27529"}


def test_switching_the_nat_side_between_iptables_and_nftables_keeps_routing_and_leaves_one_of_them():
    """A restart with the other --nat: the new side is written first (the nft chains come before iptables' nat
    chains), the old one removed after; each time only one holds the frontends."""
    with router_and_client() as (router, client), ExitStack() as stack:
        (a,) = (stack.enter_context(greeter(router, SERVERS[0], "a")),)
        view = [
            container(
                0,
                name="a",
                labels={"tcp.port": "27017", "tcp.backend_port": str(a)},
                networks={"n": SERVERS[0]},
                subnets={"n": "10.99.0.0/24"},
            )
        ]
        flavour, nft = detect_flavour(), Nft(router)
        iptables = Iptables(flavour, netns=router)

        def restart(nat_tables: bool) -> None:
            options = Options(nat_tables=nat_tables, forward_parent="FORWARD")
            syncer = Syncer(iptables, options, "tcp", Metrics(lambda: ({}, [])), nat_writer=nft)
            assert syncer.sync(view, full=True)
            assert greetings(client, ROUTER, 27017, 2) == ["a", "a"]
            in_iptables = "TCPR-FE-27017" in iptables.read()[0]["nat"]
            in_nft = [name for name in nft.tables(Family.IPV4) if name.startswith("tcprouter-")]
            assert (in_iptables, len(in_nft)) == ((False, 64) if nat_tables else (True, 0))

        for nat_tables in (False, True, False, True):
            restart(nat_tables)


def test_a_change_the_kernel_refuses_is_retried_as_a_reload_of_every_table(nat_writes: list[int]):
    """Someone deletes the frontend's table: the next change fails (the objects it edits are gone), the sync's
    retry reloads all 64 tables, and the frontend routes again."""
    with router_and_client() as (router, client), weighted_pool(router) as pool:
        view = containers(27017, pool)
        syncer = nft_syncer(router)
        assert syncer.sync(view, full=True) and nat_writes == [64]
        sh("ip", "netns", "exec", router, "nft", "delete", "table", "ip", table_of(27017))
        # c0 leaves: the change needs the handle of the frontend's rule, read from the kernel (the load did not
        # echo it), which has no such rule: the write fails before it is sent, and the retry reloads every table
        assert syncer.sync(view[1:])
        assert nat_writes == [64, 64]
        assert sorted(set(greetings(client, ROUTER, 27017, 6))) == ["b", "c"]
