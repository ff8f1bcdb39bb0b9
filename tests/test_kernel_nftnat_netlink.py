"""One frontend's change written over netlink (tcprouter/nftnat_netlink.py) in a real kernel: the layout of a state S1
loaded with `nft -f` into a private namespace, one change_batch sent to reach S2, then compared, object by object,
with `nft -f` of S2 in another namespace: `nft list` (declarations, elements, comments, rules as nft reads them
back) and `nft --debug=netlink list` (the rules' expressions and registers, the elements' bytes and userdata)."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import pytest

from tcprouter.compiler import Options
from tcprouter.model import Access, Backend, Balance, DesiredState, Family, Frontend, Protocol
from tcprouter.nf_tables import NFT_MSG_DELRULE, NFT_MSG_NEWRULE
from tcprouter.nftnat import NatPool, nat_pools, ruleset_text, table_names, table_of
from tcprouter.nftnat_netlink import NatSocket, Request, TransactionRefused, change_batch, pick_changes, table_batch

from .support import private_netns, sh

A = Backend("a" * 64, "web-a", "10.0.0.2", 80, ip6="fd00::2")
B = Backend("b" * 64, "web-b", "10.0.0.3", 80, ip6="fd00::3")
C = Backend("c" * 64, "web-c", "10.0.0.4", 8080, ip6="fd00::4")
D = Backend("d" * 64, "web-d", "10.0.0.5", 8080, ip6="fd00::5")
NEIGHBOUR = Frontend(8064, Balance.ROUNDROBIN, (C, D))  # 8000's table mate (8000 % 64 == 8064 % 64)
OTHER = Frontend(9001, Balance.RANDOM, (A,))  # in another table
NFT_FAMILIES = {Family.IPV4: "ip", Family.IPV6: "ip6"}


def tcp(*frontends: Frontend) -> DesiredState:
    return DesiredState({f.port: f for f in frontends})


def udp(*frontends: Frontend) -> DesiredState:
    return DesiredState({}, udp_frontends={f.port: f for f in frontends})


def rr(*backends: Backend, port: int = 8000, **kwargs: object) -> Frontend:
    return Frontend(port, Balance.ROUNDROBIN, backends, **kwargs)


@dataclass(frozen=True)
class Change:
    before: DesiredState
    after: DesiredState
    frontend: tuple[Protocol, int] = (Protocol.TCP, 8000)
    family: Family = Family.IPV4


CHANGES = {
    "new frontend": Change(tcp(NEIGHBOUR, OTHER), tcp(rr(A, B, C), NEIGHBOUR, OTHER)),
    "new frontend in an empty table": Change(tcp(OTHER), tcp(rr(A, B), OTHER)),
    "removed frontend": Change(tcp(rr(A, B, C), NEIGHBOUR, OTHER), tcp(NEIGHBOUR, OTHER)),
    "removed last frontend of its table": Change(tcp(rr(A), OTHER), tcp(OTHER)),
    "3 -> 2 backends": Change(tcp(rr(A, B, C), NEIGHBOUR), tcp(rr(A, C), NEIGHBOUR)),
    "same size, other backends": Change(tcp(rr(A, B), NEIGHBOUR), tcp(rr(C, D), NEIGHBOUR)),
    "round-robin -> random": Change(
        tcp(rr(A, B, C), NEIGHBOUR), tcp(Frontend(8000, Balance.RANDOM, (A, B, C)), NEIGHBOUR)
    ),
    "weights": Change(
        tcp(rr(A, B), NEIGHBOUR), tcp(rr(A, Backend("b" * 64, "web-b", "10.0.0.3", 80, weight=3)), NEIGHBOUR)
    ),
    "a lone backend gains a second (leaves unrouted, enters self)": Change(
        tcp(rr(A), NEIGHBOUR), tcp(rr(A, B), NEIGHBOUR)
    ),
    "two backends -> one (leaves self, enters unrouted)": Change(tcp(rr(A, B)), tcp(rr(B))),
    "access labels: the mark": Change(tcp(rr(A, B)), tcp(rr(A, B, access=Access(maxconn=5)))),
    "udp 3 -> 2 backends": Change(
        udp(rr(A, B, C, protocol=Protocol.UDP)), udp(rr(A, C, protocol=Protocol.UDP)), (Protocol.UDP, 8000)
    ),
    "udp new frontend beside a tcp one": Change(
        tcp(rr(A, B)),
        DesiredState({8000: rr(A, B)}, udp_frontends={8000: rr(C, protocol=Protocol.UDP)}),
        (Protocol.UDP, 8000),
    ),
    "ipv6 3 -> 2 backends": Change(tcp(rr(A, B, C), NEIGHBOUR), tcp(rr(B, C), NEIGHBOUR), family=Family.IPV6),
    "ipv6 new frontend": Change(tcp(NEIGHBOUR), tcp(rr(A, B), NEIGHBOUR), family=Family.IPV6),
    "ipv6 lone backend, random -> two": Change(
        tcp(Frontend(8000, Balance.RANDOM, (A,))), tcp(rr(A, B)), family=Family.IPV6
    ),
    "ipv6 removed frontend": Change(tcp(rr(A, B), NEIGHBOUR), tcp(NEIGHBOUR), family=Family.IPV6),
    "ipv6 two backends -> one": Change(tcp(rr(A, B), NEIGHBOUR), tcp(rr(B), NEIGHBOUR), family=Family.IPV6),
    "a frontend in the same pick chain as another": Change(
        tcp(rr(A, B, port=8001)), tcp(rr(A, B, port=8001), rr(C, port=8513)), (Protocol.TCP, 8513)
    ),  # 8513 = 8001 + 512: the same table and the same port bits above its table's
}


def load(ns: str, state: DesiredState, family: Family) -> None:
    options = Options(family=family)
    sh("ip", "netns", "exec", ns, "nft", "-f", "-", input=ruleset_text(nat_pools(state, options).values(), options))


def nft(ns: str, *args: str) -> str:
    return sh("ip", "netns", "exec", ns, "nft", *args)


def objects(listing: str) -> dict[tuple[str, str], str]:
    """`nft list` output as (table, `set X` / `map X` / `chain X`) -> body, counters at 0, a set's elements and a
    pick chain's rules sorted: the listing's order is the objects' creation order, which a change does not keep, and
    a change appends a frontend's rule to its pick chain, where the order of the rules does not matter (each
    compares its own port first)."""
    found, table = {}, ""
    pattern = r"^(table .+?|\t(?:set|map|chain) \S+ \{\n.*?^\t\})$"
    for block in re.findall(pattern, listing, re.MULTILINE | re.DOTALL):
        if block.startswith("table"):
            table = block
            continue
        head, body = block.split("\n", 1)
        body = re.sub(r"packets \d+ bytes \d+", "packets 0 bytes 0", body)
        if head.strip().startswith("chain pick-"):
            body = "\n".join(sorted(body.splitlines()))
        elements = re.search(r"elements = \{ (.*?) \}", body, re.DOTALL)
        if elements:
            listed = sorted(e.strip() for e in elements.group(1).split(","))
            body = body.replace(elements.group(0), f"elements = {{ {', '.join(listed)} }}")
        found[(table, head.strip())] = body
    return found


def expressions(listing: str) -> dict[str, list[str]]:
    """`nft --debug=netlink list table` output as set -> its element lines (sorted: hash order) and chain -> its
    rules' expression lines (in order), without handles."""
    found: dict[str, list[str]] = {}
    debug = re.split(r"^table ", listing, maxsplit=1, flags=re.MULTILINE)[0]  # the plain listing follows
    for head, body in re.findall(r"^(\S+ \S+ \S+)[^\n]*\n((?:(?:\t|  ).*\n?)*)", debug, re.MULTILINE):
        name = head.split()[2]
        lines = [line for line in body.splitlines() if line.strip()]
        if name.startswith("@"):
            found[name] = sorted(lines)
        else:
            found.setdefault(name, []).append("\n".join(lines))
    return {name: sorted(rules) if name.startswith("pick-") else rules for name, rules in found.items()}


def assert_same_layout(changed: str, reference: str, family: Family, table: str) -> None:
    ours, theirs = (objects(nft(ns, "list", "ruleset")) for ns in (changed, reference))
    assert len(theirs) >= 16 * 64 and ours == theirs  # each table: 5 sets and maps, 11 chains, its slot maps
    debug = ("--debug=netlink", "list", "table", NFT_FAMILIES[family], table)
    ours, theirs = (expressions(nft(ns, *debug)) for ns in (changed, reference))
    assert "prerouting" in theirs and ours == theirs


def change(sock: NatSocket, before: NatPool | None, after: NatPool | None, family: Family) -> list[Request]:
    """change_batch, with the handle of before's rule read from the kernel if the change needs it."""
    if before is None or not pick_changes(before, after):
        return change_batch(before, after, family)
    handle = sock.chain_handles(family, table_of(before.port), before.pick_chain)[before.name]
    return change_batch(before, after, family, handle)


RULES_KEPT = {"same size, other backends", "access labels: the mark"}  # the pool's size and rotation stay


@pytest.mark.parametrize("name", CHANGES.keys())
def test_a_change_replaces_the_frontend_s_rule_only_if_its_size_or_rotation_changes(name: str):
    """A commit that adds a rule makes the kernel validate its whole table: a change that leaves the rule as it
    was changes only elements of sets and maps."""
    case, options = CHANGES[name], Options(family=CHANGES[name].family)
    before = nat_pools(case.before, options).get(case.frontend)
    after = nat_pools(case.after, options).get(case.frontend)
    kinds = {request.type for request in change_batch(before, after, case.family, handle=1)}
    assert kinds.isdisjoint({NFT_MSG_NEWRULE, NFT_MSG_DELRULE}) == (name in RULES_KEPT)


@pytest.mark.parametrize("case", CHANGES.values(), ids=CHANGES.keys())
def test_a_change_written_over_netlink_leaves_what_nft_f_of_the_new_state_makes(case: Change):
    options = Options(family=case.family)
    before = nat_pools(case.before, options).get(case.frontend)
    after = nat_pools(case.after, options).get(case.frontend)
    assert before != after
    with private_netns() as changed, private_netns() as reference:
        load(changed, case.before, case.family)
        with NatSocket(changed) as sock:
            handles = sock.send(change(sock, before, after, case.family))
            if after is not None and pick_changes(before, after):  # the kernel echoed the new rule's handle
                in_chain = sock.chain_handles(case.family, table_of(after.port), after.pick_chain)
                assert list(handles) == [after.name] and handles.items() <= in_chain.items()
            else:
                assert handles == {}
        load(reference, case.after, case.family)
        assert_same_layout(changed, reference, case.family, table_of(case.frontend[1]))


def test_changes_of_several_frontends_go_in_one_transaction_and_the_socket_serves_several():
    first, second = tcp(rr(A, B, C), NEIGHBOUR, OTHER), tcp(rr(A, B), Frontend(9001, Balance.RANDOM, (A, B)))
    third = tcp(rr(A), rr(C, D, port=8128))  # 8128: another frontend of 8000's table
    pools = [nat_pools(state, Options()) for state in (first, second, third)]
    with private_netns() as changed, private_netns() as reference:
        load(changed, first, Family.IPV4)
        with NatSocket(changed) as sock:
            for old, new in itertools.pairwise(pools):
                keys = dict.fromkeys([*old, *new])
                sock.send([msg for key in keys for msg in change(sock, old.get(key), new.get(key), Family.IPV4)])
        load(reference, third, Family.IPV4)
        assert_same_layout(changed, reference, Family.IPV4, table_of(8000))


def test_a_refused_batch_raises_and_changes_nothing_and_the_socket_still_works():
    state = tcp(rr(A, B, C), NEIGHBOUR)
    pools = nat_pools(state, Options())
    ipv6 = nat_pools(state, Options(family=Family.IPV6))[(Protocol.TCP, 8064)]
    with private_netns() as ns:
        load(ns, state, Family.IPV4)  # no ip6 table at all
        listed = nft(ns, "-a", "list", "ruleset")
        with NatSocket(ns) as sock:
            valid = change(sock, pools[(Protocol.TCP, 8000)], None, Family.IPV4)  # would remove 8000
            with pytest.raises(TransactionRefused, match=r"add map ip6 tcprouter-00 slots-tcp-8064: No such file"):
                sock.send([*valid, *change_batch(None, ipv6, Family.IPV6)])
            assert nft(ns, "-a", "list", "ruleset") == listed
            with pytest.raises(TransactionRefused, match=r"add map ip tcprouter-00 slots-tcp-8064: File exists"):
                sock.send(change_batch(None, pools[(Protocol.TCP, 8064)], Family.IPV4))  # it exists: not merged
            assert nft(ns, "-a", "list", "ruleset") == listed
            with pytest.raises(TransactionRefused, match=r"delete a rule of chain ip tcprouter-00 pick-\d: No such"):
                sock.send(change_batch(pools[(Protocol.TCP, 8000)], None, Family.IPV4, handle=10**6))
            assert nft(ns, "-a", "list", "ruleset") == listed
            sock.send(valid)
        assert "tcp-8000" not in nft(ns, "list", "ruleset")


MIXED = DesiredState(
    {
        8000: rr(A, B, C),
        8064: Frontend(8064, Balance.RANDOM, (C, Backend("d" * 64, "web-d", "10.0.0.5", 8080, weight=3))),
        8128: rr(A, port=8128),  # a lone backend: in set unrouted, not in map self
        9001: rr(A, B, port=9001, access=Access(maxconn=5)),  # the access bit in the mark
    },
    udp_frontends={8000: rr(B, C, protocol=Protocol.UDP), 9002: rr(D, port=9002, protocol=Protocol.UDP)},
)
LOADS = {
    "ipv4": Options(),
    "ipv4, --listen-address": Options(listen_address="10.0.0.1"),
    "ipv4, --route-localhost": Options(route_localhost=True),
    "ipv6": Options(family=Family.IPV6),
    "ipv6, --listen-address": Options(family=Family.IPV6, listen_address="fd00::1"),
}


@pytest.mark.parametrize("options", LOADS.values(), ids=LOADS.keys())
def test_a_full_load_over_netlink_leaves_what_nft_f_makes_and_replaces_what_the_tables_held(options: Options):
    pools = nat_pools(MIXED, options).values()
    tables = sorted({table_of(port) for port in (8000, 9001, 9002)} | {"tcprouter-05"})  # and an empty one
    family = NFT_FAMILIES[options.family]
    with private_netns() as loaded, private_netns() as reference:
        load(loaded, tcp(rr(C, D, port=8000), rr(A, port=8001)), options.family)  # every table, other pools
        with NatSocket(loaded) as sock:
            sock.send(table_batch(pools, options, table_names()))
        sh("ip", "netns", "exec", reference, "nft", "-f", "-", input=ruleset_text(pools, options))
        ours, theirs = (objects(nft(ns, "list", "ruleset")) for ns in (loaded, reference))
        heads = {head for _, head in theirs}
        assert all(f"map slots-{pool.name} {{" in heads for pool in pools) and ours == theirs
        for table in tables:
            debug = ("--debug=netlink", "list", "table", family, table)
            ours, theirs = (expressions(nft(ns, *debug)) for ns in (loaded, reference))
            assert "prerouting" in theirs and ours == theirs


def test_a_full_load_of_some_tables_leaves_the_others_as_they_were():
    options = Options()
    with private_netns() as ns:
        load(ns, tcp(rr(A, B, port=8000), rr(C, port=8001)), Family.IPV4)
        untouched = nft(ns, "list", "table", "ip", table_of(8001))
        with NatSocket(ns) as sock:
            sock.send(table_batch(nat_pools(tcp(rr(D, port=8064)), options).values(), options, [table_of(8000)]))
        assert nft(ns, "list", "table", "ip", table_of(8001)) == untouched
        listed = nft(ns, "list", "table", "ip", table_of(8000))
        assert "tcp-8064" in listed and "tcp-8000" not in listed


# A table as tcprouter wrote it before the pick chains (a chain per frontend, dispatched by map ports): what a host
# upgraded from that version holds when the new daemon starts.
PREVIOUS_LAYOUT = """table ip tcprouter-00 {
	map ports {
		type inet_proto . inet_service : verdict
		elements = { tcp . 8000 : goto tcp-8000 }
	}
	map self-tcp-8000 {
		type ipv4_addr : ipv4_addr . inet_service
		elements = { 10.0.0.2 : 10.0.0.3 . 80, 10.0.0.3 : 10.0.0.2 . 80 }
	}
	map slots-tcp-8000 {
		typeof numgen inc mod 2 : ip daddr . tcp dport
		size 2
		counter
		elements = { 0 comment "web-a" : 10.0.0.2 . 80, 1 comment "web-b" : 10.0.0.3 . 80 }
	}
	chain tcp-8000 {
		fib daddr type != local return
		ct mark set ct mark | 0x00100000
		meta l4proto tcp dnat ip to ip saddr map @self-tcp-8000
		meta l4proto tcp dnat ip to numgen inc mod 2 map @slots-tcp-8000
	}
	chain prerouting {
		type nat hook prerouting priority -101; policy accept;
		meta l4proto . th dport vmap @ports
	}
	chain output {
		type nat hook output priority -101; policy accept;
		ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @ports
	}
}
"""


def test_a_full_load_replaces_tables_of_the_previous_layout_whole():
    """The first sync after an upgrade loads every table: what it leaves is what `nft -f` of the new layout makes,
    nothing of the chain per frontend."""
    options, state = Options(), tcp(rr(A, B, C), NEIGHBOUR)
    pools = nat_pools(state, options).values()
    with private_netns() as upgraded, private_netns() as reference:
        sh("ip", "netns", "exec", upgraded, "nft", "-f", "-", input=PREVIOUS_LAYOUT)
        with NatSocket(upgraded) as sock:
            sock.send(table_batch(pools, options, table_names()))
        load(reference, state, Family.IPV4)
        listed = nft(upgraded, "list", "ruleset")
        assert "chain tcp-8000" not in listed and "map ports" not in listed
        assert listed == nft(reference, "list", "ruleset")
