"""The nat side in nftables tables of tcprouter's own: the layout that meets 10,000 frontends (BENCHMARKS.md, "Rule
layouts"), as `nft -f` text. Pure: the desired state in, text out.

In iptables every new connection's first packet walks a frontend chain of one statistic rule per rotation slot,
and a write to the nat table makes the kernel validate all 110,000 of its rules at 10,000 x 10. Here:
  - the frontends are spread over TABLES tables by port (a change validates one table, ~1/64 of the rules);
  - in each table, base chains at prerouting and output (priority PRIORITY, before the iptables nat chains) send a
    new connection to a frontend (`meta l4proto . th dport @frontends`: one lookup, whatever the number of
    frontends) to chain `route`, which returns it unless it is to a local address (`fib daddr type local`). The port
    comes first: a new connection passes the nat hook of every table until one DNATs it, and a hash lookup that
    misses costs far less than the route lookup of `fib` (BENCHMARKS.md, "Dispatch with --nat nftables"); with
    --listen-address the base chains compare the destination first instead, which is cheap;
  - `route`, the same for every frontend, marks the connection (the FORWARD lock and masquerade, in iptables, match
    the mark as before; set `access` adds the access bit), sends a backend's own connection to another backend (map
    `self`, keyed by frontend and source: a bridge drops a packet DNATed back out of the port it came in on), leaves
    a lone backend's own connections alone (set `unrouted`), then goes by the port's bits to one of GROUPS chains
    `pick-<n>`;
  - there, the frontend's one rule (a comparison per frontend of the group before it: ~20 at 10,000 frontends)
    picks a backend with `numgen` over map `slots-...`: strict round-robin (`inc`) or random, a slot per unit of
    weight; each slot's counter counts its connections.
A frontend owns no chain: the kernel's every commit visits every chain of the namespace (~0.07 ms per 10,000 chains
with warm caches, ~0.5 ms with cold ones), so the chains are a fixed number per table, not one per frontend.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

from .compiler import COMMENT_MAX, Options, access_bit, rotation
from .model import Balance, DesiredState, Family, Frontend, Protocol

TABLES = 64
GROUPS = 8  # pick chains per table: a frontend's is picked by the port's bits above those that choose its table
PRIORITY = -101  # dstnat - 1: before the iptables nat table's chains (Docker's published ports)
TABLE_PREFIX = "tcprouter-"
GROUP_MASK = (GROUPS - 1) * TABLES  # the port's bits that choose its group, both counts being powers of 2
PICK_CHAINS = tuple(f"pick-{n}" for n in range(GROUPS))  # by group: group_of(port) // TABLES
_FAMILIES = {Family.IPV4: "ip", Family.IPV6: "ip6"}
_ADDRESS_TYPES = {Family.IPV4: "ipv4_addr", Family.IPV6: "ipv6_addr"}
_LOOPBACK = {Family.IPV4: "127.0.0.0/8", Family.IPV6: "::1"}
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")  # nft strings have no escapes; Docker names are made of these
_FRONTEND = "meta l4proto . th dport"  # a frontend's key in the table's sets and maps


@dataclass(frozen=True, slots=True)
class Slot:
    """One rotation slot: the backend it sends to."""

    address: str
    port: int
    name: str  # the backend's, in the element's comment (per-backend counts sum its slots)


@dataclass(frozen=True, slots=True)
class NatPool:
    """What one routed frontend of one family is in the kernel (kept for each at 10,000 frontends: slots only)."""

    protocol: Protocol
    port: int
    access: bool  # in set `access`: its connections' mark carries the access bit
    random: bool  # numgen random rather than inc
    slots: tuple[Slot, ...]

    @property
    def name(self) -> str:
        """`<protocol>-<port>`: its slot map's name is `slots-<name>`, its rule's comment is the name."""
        return f"{self.protocol}-{self.port}"

    @property
    def pick_chain(self) -> str:
        return pick_chain(self.port)

    @property
    def fallbacks(self) -> tuple[tuple[str, Slot], ...]:
        """A backend's address -> where its own connections go: the first slot of another address."""
        return tuple((address, other) for address, other in self.own_connections() if other is not None)

    @property
    def unrouted(self) -> tuple[str, ...]:
        """The backend addresses with nowhere else to go (a pool of one address): their own connections are not
        DNATed."""
        return tuple(address for address, other in self.own_connections() if other is None)

    def own_connections(self) -> list[tuple[str, Slot | None]]:
        """Each backend address once, in slot order, with where its own connections go: the first slot of another
        address (the first slot, but for the first slot's own address), or None where there is none."""
        first = self.slots[0]
        after_first = next((slot for slot in self.slots if slot.address != first.address), None)
        addresses = dict.fromkeys([slot.address for slot in self.slots])
        return [(a, after_first if a == first.address else first) for a in addresses]


def nft_family(family: Family) -> str:
    """The nftables family of an address family's tables."""
    return _FAMILIES[family]


def table_of(port: int) -> str:
    """The table a frontend port's objects live in (TCP and UDP frontends of one port share it)."""
    return f"{TABLE_PREFIX}{port % TABLES:02d}"


def group_of(port: int) -> int:
    """The port's bits that choose its pick chain, as `th dport & GROUP_MASK` reads them (the key of map groups)."""
    return port & GROUP_MASK


def pick_chain(port: int) -> str:
    return PICK_CHAINS[group_of(port) // TABLES]


def groups() -> Iterator[tuple[int, str]]:
    """Map groups' elements: the port's group bits -> the pick chain they go to."""
    return ((n * TABLES, chain) for n, chain in enumerate(PICK_CHAINS))


def _slot_name(name: str) -> str:
    """A backend's name as an element's comment: as long as the iptables rules' comments, in Docker's characters."""
    return _NAME_UNSAFE.sub("_", name[:COMMENT_MAX])


def nat_pool(frontend: Frontend) -> NatPool:
    """The nat objects of one routed frontend (backends of the family, at least one)."""
    backends = frontend.backends
    random = frontend.balance is Balance.RANDOM
    order = [b for b in backends for _ in range(b.weight)] if random else rotation(backends)  # random: weighted
    slots = tuple(Slot(b.ip, b.port, _slot_name(b.name or b.container_id[:12])) for b in order)
    return NatPool(frontend.protocol, frontend.port, bool(frontend.access), random, slots)


def routed_frontends(state: DesiredState, options: Options) -> list[Frontend]:
    """The frontends of options.family (the state as DesiredState.of_family gives it) that are routed: an empty pool
    is not (the host answers: a reset, or ICMP port unreachable). TCP ones, then UDP ones, each by port."""
    return [f for f in state.of_family(options.family).every_frontend() if f.backends]


def nat_pools(state: DesiredState, options: Options) -> dict[tuple[Protocol, int], NatPool]:
    """The nat objects of every routed frontend."""
    return {(f.protocol, f.port): nat_pool(f) for f in routed_frontends(state, options)}


def _destination(slot: Slot) -> str:
    return f"{slot.address} . {slot.port}"


def _set(kind: str, name: str, declaration: str, elements: Iterable[str]) -> str:
    listed = ", ".join(elements)
    filled = f"\t\telements = {{ {listed} }}\n" if listed else ""
    return f"\t{kind} {name} {{\n\t\t{declaration}\n{filled}\t}}\n"


def _slots(pool: NatPool, family: Family) -> str:
    """The pool's slot map: slot number -> address . port, each with its counter and backend's name."""
    protocol_field = f"{pool.protocol} dport"
    address_field = "ip daddr" if family is Family.IPV4 else "ip6 daddr"
    elements = ", ".join(
        f'{number} comment "{slot.name}" : {_destination(slot)}' for number, slot in enumerate(pool.slots)
    )
    return (
        f"\tmap slots-{pool.name} {{\n"
        f"\t\ttypeof numgen inc mod {len(pool.slots)} : {address_field} . {protocol_field}\n"
        f"\t\tsize {len(pool.slots)}\n"
        "\t\tcounter\n"
        f"\t\telements = {{ {elements} }}\n"
        "\t}\n"
    )


def _pick(pool: NatPool, family: Family) -> str:
    """The frontend's rule in its pick chain: its port first (the comparison that fails for the group's others)."""
    generator = "random" if pool.random else "inc"
    nat = f"dnat {_FAMILIES[family]} to numgen {generator} mod {len(pool.slots)} map @slots-{pool.name}"
    return f'th dport {pool.port} meta l4proto {pool.protocol} {nat} comment "{pool.name}"'


def _key(pool: NatPool) -> str:
    return f"{pool.protocol} . {pool.port}"


def _route(options: Options) -> str:
    """Chain route: what every frontend's new connection goes through before its pick chain."""
    family = options.family
    nft_family = _FAMILIES[family]
    rules = [] if options.listen_address else ["fib daddr type != local return"]
    rules += [
        f"ct mark set ct mark | {options.mark_bit:#010x}",
        f"{_FRONTEND} @access ct mark set ct mark | {access_bit(options.mark_bit):#010x}",
        f"{_FRONTEND} . {nft_family} saddr @unrouted return",
        f"dnat {nft_family} to {_FRONTEND} . {nft_family} saddr map @self",
        f"th dport & {GROUP_MASK} vmap @groups",
    ]
    return "\tchain route {\n" + "".join(f"\t\t{rule}\n" for rule in rules) + "\t}\n"


def _dispatch(options: Options) -> str:
    """The base chains: a new connection to a frontend goes to chain route (which checks that it is to a local
    address), or with --listen-address, one to that address. From the host itself (output), loopback destinations
    stay the host's unless asked."""
    family = options.family
    nft_family = _FAMILIES[family]
    if options.listen_address:
        local = output = f"{nft_family} daddr {options.listen_address} "
    else:
        local = ""
        route_localhost = options.route_localhost and family is Family.IPV4
        output = "" if route_localhost else f"{nft_family} daddr != {_LOOPBACK[family]} "
    lookup = f"{_FRONTEND} @frontends goto route"
    return "".join(
        f"\tchain {hook} {{\n\t\ttype nat hook {hook} priority {PRIORITY}; policy accept;\n\t\t{match}{lookup}\n\t}}\n"
        for hook, match in (("prerouting", local), ("output", output))
    )


def table_names() -> list[str]:
    return [f"{TABLE_PREFIX}{n:02d}" for n in range(TABLES)]


def table_parts(state: DesiredState, options: Options, parts: int) -> Iterator[tuple[list[str], list[NatPool]]]:
    """Every table of options.family in `parts` groups of as many tables each (give or take one), each with the pools
    of its tables, made one group after the other: a full load's transactions, each sent while the next is made."""
    names = table_names()
    members: dict[str, list[Frontend]] = {name: [] for name in names}
    for frontend in routed_frontends(state, options):
        members[table_of(frontend.port)].append(frontend)
    for group in (names[n::parts] for n in range(min(parts, len(names)))):
        yield group, [nat_pool(f) for name in group for f in members[name]]


def _table(pools: list[NatPool], options: Options) -> str:
    """A table's content: its sets and maps, its chains."""
    family = options.family
    address_type = _ADDRESS_TYPES[family]
    frontend_type = "inet_proto . inet_service"
    fallbacks = [f"{_key(p)} . {address} : {_destination(slot)}" for p in pools for address, slot in p.fallbacks]
    picks: dict[str, list[str]] = {chain: [] for chain in PICK_CHAINS}
    for pool in pools:
        picks[pool.pick_chain].append(f"\t\t{_pick(pool, family)}\n")
    return "".join(
        [
            _set("set", "frontends", f"type {frontend_type}", map(_key, pools)),
            _set("set", "access", f"type {frontend_type}", (_key(p) for p in pools if p.access)),
            _set(
                "set",
                "unrouted",
                f"type {frontend_type} . {address_type}",
                (f"{_key(p)} . {address}" for p in pools for address in p.unrouted),
            ),
            _set("map", "self", f"type {frontend_type} . {address_type} : {address_type} . inet_service", fallbacks),
            *(_slots(pool, family) for pool in pools),
            *(f"\tchain {chain} {{\n{''.join(rules)}\t}}\n" for chain, rules in picks.items()),
            _set("map", "groups", "type inet_service : verdict", (f"{key} : goto {chain}" for key, chain in groups())),
            _route(options),
            _dispatch(options),
        ]
    )


def ruleset_text(pools: Iterable[NatPool], options: Options, tables: Collection[str] | None = None) -> str:
    """The `nft -f` input that replaces every table of options.family's (or those named in `tables`) with `pools`
    (all of those tables' pools), in one transaction: each table is declared, deleted and declared again with its
    content (created if missing, replaced whole if not)."""
    nft_family = _FAMILIES[options.family]
    by_table: dict[str, list[NatPool]] = {name: [] for name in (table_names() if tables is None else tables)}
    for pool in pools:
        by_table[table_of(pool.port)].append(pool)
    return "".join(
        f"table {nft_family} {table} {{}}\n"
        f"delete table {nft_family} {table}\n"
        f"table {nft_family} {table} {{\n{_table(members, options)}}}\n"
        for table, members in by_table.items()
    )
