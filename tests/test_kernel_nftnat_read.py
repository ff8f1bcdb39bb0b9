"""slot_rules and slot_counts (tcprouter/nftnat_read.py) in a real kernel: the slots of nftnat's layout read over
netlink are rules_of_listing of `nft -j list ruleset`, rule for rule, in the same order, and what the metrics count
of those rules. Each state is loaded
with `nft -f` into a private namespace (both families side by side); one gets real connections first, so that the
slots' counters count."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from tcprouter import nftnat_read
from tcprouter.compiler import Options
from tcprouter.metrics import backend_connections
from tcprouter.model import Backend, Balance, DesiredState, Family, Frontend, Protocol
from tcprouter.nftnat import nat_pools, ruleset_text, table_of
from tcprouter.nftnat_netlink import NatSocket, change_batch
from tcprouter.nftnat_read import slot_counts, slot_rules

from .nft_listing import listing, rules_of_listing
from .support import greetings, private_netns, sh, unique
from .test_kernel_nftnat import ROUTER, router_and_client, weighted_pool

pytestmark = pytest.mark.kernel

A = Backend("a" * 64, "web-a", "10.0.0.2", 80, ip6="fd00::2")
B = Backend("b" * 64, "web.b", "10.0.0.3", 8080, weight=3, ip6="2001:db8::1:0:0:3")  # a dot: quoted, as iptables
C = Backend("c" * 64, 'we"b c/ü', "10.0.0.4", 53, ip6="::ffff:10.0.0.4")  # nftnat makes the name safe
D = Backend("d" * 64, "", "10.0.0.5", 65535, ip6="fe80::5")  # no name: the container id's first 12 characters
E = Backend("e" * 64, "x" * 80, "192.168.255.254", 1, weight=2, ip6="fd00::ffff")  # longer than a comment may be


def rr(*backends: Backend, port: int, protocol: Protocol = Protocol.TCP) -> Frontend:
    return Frontend(port, Balance.ROUNDROBIN, backends, protocol=protocol)


def rnd(*backends: Backend, port: int, protocol: Protocol = Protocol.TCP) -> Frontend:
    return Frontend(port, Balance.RANDOM, backends, protocol=protocol)


def state(*frontends: Frontend) -> DesiredState:
    tcp = {f.port: f for f in frontends if f.protocol is Protocol.TCP}
    return DesiredState(tcp, udp_frontends={f.port: f for f in frontends if f.protocol is Protocol.UDP})


STATES = {
    "weights, random pools, odd names, several tables": state(
        rr(A, B, C, port=8000), rr(C, D, port=8064), rnd(A, B, E, port=9001), rr(E, port=27017), rnd(D, port=1)
    ),
    "tcp and udp on one port": state(
        rr(A, B, port=8000), rr(C, D, port=8000, protocol=Protocol.UDP), rnd(B, C, port=53, protocol=Protocol.UDP)
    ),
    "many frontends in one table": state(*(rr(A, B, C, D, E, port=5 + 64 * n) for n in range(40))),
    "nothing routed": state(),
}
# a map named like a slots map outside tcprouter's tables: neither reader takes it
FOREIGN = {
    Family.IPV4: "table ip other { map slots-tcp-80 { typeof numgen inc mod 1 : ip daddr . tcp dport; counter; "
    'elements = { 0 comment "x" : 10.9.9.9 . 80 }; }; }\n',
    Family.IPV6: "table ip6 other { map slots-tcp-80 { typeof numgen inc mod 1 : ip6 daddr . tcp dport; counter; "
    'elements = { 0 comment "x" : fd09::9 . 80 }; }; }\n',
}


def load(ns: str, desired: DesiredState, family: Family) -> None:
    options = Options(family=family)
    text = ruleset_text(nat_pools(desired, options).values(), options)
    sh("ip", "netns", "exec", ns, "nft", "-f", "-", input=text)


def listed(ns: str, family: Family) -> list:
    """What the metrics read before slot_rules."""
    return rules_of_listing(listing(ns, family))


def generic_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every element parsed attribute by attribute: the fast path never matches."""
    monkeypatch.setattr(nftnat_read._Shape, "fields", lambda self, element: None)


def fast_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path must read every element of nftnat's maps: the generic parser fails the test if called."""

    def refuse(element: bytes) -> None:
        raise AssertionError(f"an element the fast path did not read: {element!r}")

    monkeypatch.setattr(nftnat_read, "_parsed", refuse)


PATHS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {"fast path": fast_only, "generic parser": generic_only}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", STATES)
def test_slot_rules_are_the_rules_of_the_nft_listing(name: str, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    PATHS[path](monkeypatch)
    with private_netns() as ns:
        for family in Family:
            load(ns, STATES[name], family)
            sh("ip", "netns", "exec", ns, "nft", "-f", "-", input=FOREIGN[family])
        for family in Family:
            expected = listed(ns, family)
            assert (expected == []) == (name == "nothing routed")
            assert slot_rules(family, ns) == expected
            assert counts(family, ns) == {p: backend_connections(expected, p) for p in Protocol}


def counts(family: Family, ns: str) -> dict[Protocol, dict[tuple[str, str], int]]:
    """slot_counts without the digests."""
    return {
        p: {(port, name): n for port, names in counted.counts.items() for name, n in names.items()}
        for p, counted in slot_counts(family, ns).items()
    }


@pytest.mark.parametrize("path", PATHS)
def test_counters_count_real_connections(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    PATHS[path](monkeypatch)
    with router_and_client() as (router, client), weighted_pool(router) as pool:
        load(router, state(rr(*pool, port=27017), rnd(*pool, port=27081)), Family.IPV4)
        assert greetings(client, ROUTER, 27017, 8) == ["b", "a", "c", "b"] * 2
        assert len(greetings(client, ROUTER, 27081, 5)) == 5
        read = slot_rules(Family.IPV4, router)
        assert read == listed(router, Family.IPV4)
        rotation = {key: count for key, count in backend_connections(read).items() if key[0] == "27017"}
        assert rotation == {("27017", "a"): 2, ("27017", "b"): 4, ("27017", "c"): 2}
        assert counts(Family.IPV4, router)[Protocol.TCP] == backend_connections(read)
        assert sum(rule.packets for _, rule in read if rule.chain == "TCPR-FE-27081") == 5


def test_maps_come_in_the_kernel_s_order_after_a_netlink_change() -> None:
    """A map declared anew (its pool's size changed) moves after its table's other maps, in the kernel's list and so
    in nft's: slot_rules follows."""
    before = state(rr(A, B, C, port=8000), rr(C, D, port=8064))  # one table: 8000 % 64 == 8064 % 64
    after = state(rr(A, C, port=8000), rr(C, D, port=8064))
    with private_netns() as ns:
        load(ns, before, Family.IPV4)
        options = Options()
        old, new = (nat_pools(s, options)[(Protocol.TCP, 8000)] for s in (before, after))
        unchanged = slot_counts(Family.IPV4, ns)[Protocol.TCP].digests
        with NatSocket(ns) as sock:
            handle = sock.chain_handles(Family.IPV4, table_of(8000), old.pick_chain)[old.name]
            sock.send(change_batch(old, new, Family.IPV4, handle))
        read = slot_rules(Family.IPV4, ns)
        assert read == listed(ns, Family.IPV4)
        assert [rule.chain for _, rule in read] == ["TCPR-FE-8064"] * 2 + ["TCPR-FE-8000"] * 2
        # a map written again has a new digest (its counters restarted), the others keep theirs
        changed = slot_counts(Family.IPV4, ns)[Protocol.TCP].digests
        assert changed.keys() == {"8000", "8064"}
        assert changed["8064"] == unchanged["8064"] and changed["8000"] != unchanged["8000"]


def test_a_table_or_map_gone_meanwhile_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    found = nftnat_read._slots_maps

    def with_gone_ones(dumper: nftnat_read._Dumper, layout: nftnat_read._Layout) -> list[nftnat_read._SlotsMap]:
        gone = [
            nftnat_read._SlotsMap.named(table, name)
            for table, name in (
                ("tcprouter-00", "slots-tcp-64"),  # no such map in a table that exists
                ("tcprouter-64", "slots-tcp-8000"),  # no such table
            )
        ]
        return [*gone, *found(dumper, layout), *gone]  # type: ignore[list-item]

    monkeypatch.setattr(nftnat_read, "_slots_maps", with_gone_ones)
    with private_netns() as ns:
        load(ns, STATES["tcp and udp on one port"], Family.IPV4)
        assert slot_rules(Family.IPV4, ns) == listed(ns, Family.IPV4) != []


def test_a_missing_namespace_is_an_error_and_is_not_created() -> None:
    name = unique("tcpr-k-missing-")
    with pytest.raises(OSError):
        slot_rules(Family.IPV4, name)
    assert not os.path.exists(f"/run/netns/{name}")


def test_a_namespace_without_tables_has_no_slots() -> None:
    with private_netns() as ns:
        assert slot_rules(Family.IPV4, ns) == slot_rules(Family.IPV6, ns) == []
        assert counts(Family.IPV4, ns) == {Protocol.TCP: {}, Protocol.UDP: {}}
