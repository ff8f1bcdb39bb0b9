"""The data that flows through the pipeline: Docker snapshots in, desired state out.

Everything here is immutable and free of I/O, so each stage can be tested on its own.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple

_FRACTION_DIGITS = re.compile(r"[0-9]{1,9}")  # a fraction of a second, to the nanosecond


class Protocol(StrEnum):
    """A frontend is a (protocol, port): TCP and UDP frontends on one port number are independent."""

    TCP = "tcp"
    UDP = "udp"


class Family(StrEnum):
    """An address family: tcprouter writes the iptables rules of IPv4 and the ip6tables rules of IPv6 apart."""

    IPV4 = "ipv4"
    IPV6 = "ipv6"


def family_of(address: str) -> Family:
    """The family of an address or network in text form."""
    return Family.IPV6 if ":" in address else Family.IPV4


class Balance(StrEnum):
    ROUNDROBIN = "roundrobin"
    RANDOM = "random"


class FrozenMap(dict):
    """A dict that cannot change, and so can be hashed: the maps that snapshots share (labels, subnets...), which the
    caches of their readings take as keys as they are (a tuple of a map's items, made per container to look a reading
    up, cost about as much as the reading)."""

    __slots__ = ("_hash",)

    def __hash__(self) -> int:  # type: ignore[override]
        try:
            return self._hash
        except AttributeError:
            self._hash: int = hash(frozenset(self.items()))
            return self._hash

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise TypeError("a shared map cannot change")

    def __reduce__(self) -> tuple[type[FrozenMap], tuple[dict]]:
        return FrozenMap, (dict(self),)  # copied and pickled through the constructor, not item by item

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse  # type: ignore


EMPTY: Mapping = FrozenMap()


# How many distinct maps the caches of shared maps and of their readings keep: replicas come one after the other
# (Docker lists them together; a frontend's containers are read as a group), so a thousand find each repeat. Each
# entry holds its map and its key: at 4096 the caches held ~7 MB at 10,000 x 10, at 1024 ~2 MB.
MAPS_KEPT = 1024


@functools.lru_cache(maxsize=MAPS_KEPT)
def _shared(items: tuple[tuple[object, object], ...]) -> FrozenMap:
    return FrozenMap(items)


def shared(mapping: Mapping) -> Mapping:
    """A FrozenMap equal to `mapping`, the same object for every equal one (a bounded cache)."""
    if isinstance(mapping, FrozenMap):
        return mapping
    return _shared(tuple(mapping.items())) if mapping else EMPTY


class Addresses(Mapping[str, str]):
    """A container's network -> address map (`networks`, `networks6`), immutable: its network names are a tuple
    shared with every container on the same networks, its addresses its own (one string for one network). A dict
    each was ~180 bytes, 18 MB at 10,000 x 10; this is ~50."""

    __slots__ = ("_addresses", "_names")

    def __init__(self, names: tuple[str, ...], addresses: str | tuple[str, ...]) -> None:
        self._names, self._addresses = names, addresses

    def __getitem__(self, name: str) -> str:
        if self._names and name == self._names[0]:
            return self._addresses if isinstance(self._addresses, str) else self._addresses[0]
        if not isinstance(self._addresses, str) and name in self._names:
            return self._addresses[self._names.index(name)]
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    @property
    def names(self) -> tuple[str, ...]:
        """Its networks' names, in order (the tuple its replicas share)."""
        return self._names

    def __len__(self) -> int:
        return len(self._names)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Addresses):
            return self._names == other._names and self._addresses == other._addresses
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]  # a map: unhashable, as a dict

    def __repr__(self) -> str:
        return repr(dict(self.items()))


@functools.lru_cache(maxsize=MAPS_KEPT)
def _names(names: tuple[str, ...]) -> tuple[str, ...]:
    return names


def network_names(networks: Mapping[str, str]) -> tuple[str, ...]:
    """The names of a container's networks (`networks`, `networks6`), in order."""
    return networks.names if isinstance(networks, Addresses) else tuple(networks)


def addresses(mapping: Mapping[str, str]) -> Mapping[str, str]:
    """`mapping` (network -> address) as Addresses, its names shared (EMPTY if it is empty)."""
    if isinstance(mapping, Addresses) or not mapping:
        return mapping if mapping else EMPTY
    names = _names(tuple(mapping))
    values = tuple(mapping.values())
    return Addresses(names, values[0] if len(values) == 1 else values)


def no_entries() -> Any:
    """The default of a map field: the shared empty map."""
    return field(default_factory=lambda: EMPTY)


# The maps that the containers of one network, or the replicas of one service, have in common (their labels too,
# as the providers keep only the ones tcprouter reads).
SHARED_FIELDS = (
    "labels",
    "subnets",
    "network_drivers",
    "networks6",
    "subnets6",
    "published_tcp_ports",
    "published_udp_ports",
)
ADDRESS_FIELDS = ("networks", "networks6")  # a container's own addresses, by network (Addresses)


@dataclass(frozen=True, slots=True)
class ContainerSnapshot:
    """What tcprouter needs to know about one container (or Swarm task), whatever provider found it.

    A local container is reached at its address on a Docker network (`networks`) and a container port. A
    remote one (`host_address` set: another engine, or a Swarm node) is reached at that host address and the
    host port its container port is published on (`published_tcp_ports`).
    """

    id: str
    name: str
    created: int  # when Docker created it, ns since the epoch (timestamp_ns of its RFC 3339 text; 0: unknown)
    labels: Mapping[str, str]
    running: bool
    health: str | None = None  # None: no HEALTHCHECK; else "starting" | "healthy" | "unhealthy"
    draining: bool = False  # a stop/kill was seen: leave the rotation before the process exits
    started_at: int = 0  # when its run started (timestamp_ns of State.StartedAt): tells one run from the next
    networks: Mapping[str, str] = no_entries()  # network name -> IPv4 address ("" if none)
    subnets: Mapping[str, str] = no_entries()  # network name -> IPv4 subnet (CIDR), if known
    network_drivers: Mapping[str, str] = no_entries()  # network name -> its driver, if known
    networks6: Mapping[str, str] = no_entries()  # network name -> IPv6 address (networks with --ipv6)
    subnets6: Mapping[str, str] = no_entries()  # network name -> IPv6 subnet (CIDR), if known
    internal_networks: frozenset[str] = frozenset()  # the names of its networks created with --internal
    exposed_tcp_ports: tuple[int, ...] = ()
    exposed_udp_ports: tuple[int, ...] = ()
    stop_signal: str = "SIGTERM"  # what `docker stop` sends it (Config.StopSignal): its kill event means it is ending
    node: str = ""  # the host it runs on, for status, logs and metrics ("": this host)
    host_address: str = ""  # remote only: the address of that host, where its published ports are reached
    published_tcp_ports: Mapping[int, int] = no_entries()  # remote only: container port -> host port
    published_udp_ports: Mapping[int, int] = no_entries()  # remote only: the same for UDP
    malformed: str = ""  # why Docker's data for it could not be read: it is rejected, nothing else is affected

    def __post_init__(self) -> None:
        # The containers of one network share one copy of its maps (100,000 snapshots at 10,000 x 10).
        for name in SHARED_FIELDS:
            object.__setattr__(self, name, shared(getattr(self, name)))
        for name in ADDRESS_FIELDS:
            object.__setattr__(self, name, addresses(getattr(self, name)))

    @property
    def age_order(self) -> tuple[int, str]:
        """Oldest first (then by id, for equal times)."""
        return self.created, self.id

    def exposed_ports(self, protocol: Protocol) -> tuple[int, ...]:
        return self.exposed_udp_ports if protocol is Protocol.UDP else self.exposed_tcp_ports

    def published_ports(self, protocol: Protocol) -> dict[int, int]:
        return self.published_udp_ports if protocol is Protocol.UDP else self.published_tcp_ports

    @property
    def serving(self) -> bool:
        """A container is a backend only while it runs, is not stopping, and is healthy if it has a check."""
        return self.running and not self.draining and self.health in (None, "healthy")


class Backend(NamedTuple):
    """One container as a pool's member. A named tuple: immutable, and built four times faster than a frozen
    dataclass (a full sync at 10,000 x 10 builds 100,000)."""

    container_id: str
    name: str
    ip: str
    port: int
    weight: int = 1
    subnet: str | None = None  # the backend network's subnet, for hairpin SNAT
    node: str = ""  # the host it runs on ("": this host)
    ip6: str = ""  # its IPv6 address on the same network ("": none, it is not in the pool's IPv6 rules)
    subnet6: str | None = None  # that network's IPv6 subnet, for hairpin SNAT over IPv6

    @property
    def endpoint(self) -> tuple[str, int]:
        return self.ip, self.port

    def of_family(self, family: Family) -> Backend | None:
        """This backend as the rules of `family` reach it (`ip` and `subnet` that family's), None if it has no
        address of that family. Idempotent: the IPv6 form keeps `ip6`."""
        if family is Family.IPV4:
            return self
        return self._replace(ip=self.ip6, subnet=self.subnet6) if self.ip6 else None


@dataclass(frozen=True)
class Access:
    """Who may open connections to a frontend (labels tcp.allow, tcp.maxconn, tcp.rate, tcp.burst).

    Checked on new connections only; a refused client gets a TCP reset.
    """

    allow: tuple[str, ...] = ()  # client networks (CIDR, normalised); empty: every client
    maxconn: int | None = None  # concurrent connections per client address
    rate: int | None = None  # new connections per second per client address
    burst: int | None = None  # with rate: how many may come at once (hashlimit's default, 5, if unset)

    def __bool__(self) -> bool:
        return bool(self.allow) or self.maxconn is not None or self.rate is not None


OPEN = Access()


@dataclass(frozen=True)
class Frontend:
    port: int
    balance: Balance
    backends: tuple[Backend, ...]  # in rotation order (oldest container first)
    access: Access = OPEN  # TCP only: a UDP frontend is open to every client
    synproxy: bool = False  # TCP only: SYN-flood protection, the kernel's SYNPROXY answers SYNs with cookies
    protocol: Protocol = Protocol.TCP
    # Frontends are dict keys at every event (compiler.pool_rules' cache): the hash of ten backends is kept.
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        fields = (self.port, self.balance, self.backends, self.access, self.synproxy, self.protocol)
        object.__setattr__(self, "_hash", hash(fields))

    def __hash__(self) -> int:
        return self._hash


@dataclass(frozen=True)
class Rejection:
    container_id: str
    name: str
    reason: str  # short machine-readable key, used as a metric label
    detail: str  # the sentence an operator reads
    protocol: Protocol = Protocol.TCP  # the labels it was rejected for (a container may carry TCP and UDP ones)

    def __str__(self) -> str:
        return f"container {self.name} ({self.container_id[:12]}) rejected: {self.detail}"


PORT_SHARDS = 64


class PortMap(Mapping[int, Frontend]):
    """Frontends by port, immutable, held in PORT_SHARDS dicts by port: `updated` copies only the dicts that change,
    so that a state that differs from the last by one frontend shares the rest with it (Pools.state gives one at
    every event: a copy of 10,000 frontends, and freeing the last one, took ~0.13 ms of a ~1.5 ms event)."""

    __slots__ = ("_shards",)

    def __init__(self, shards: tuple[dict[int, Frontend], ...] | None = None) -> None:
        self._shards = shards if shards is not None else tuple({} for _ in range(PORT_SHARDS))

    def __getitem__(self, port: int) -> Frontend:
        if not isinstance(port, int):
            raise KeyError(port)
        return self._shards[port % PORT_SHARDS][port]

    def __iter__(self) -> Iterator[int]:
        return itertools.chain.from_iterable(self._shards)

    def __len__(self) -> int:
        return sum(map(len, self._shards))

    def __repr__(self) -> str:
        return f"PortMap({dict(self.items())!r})"

    def updated(self, changes: Mapping[int, Frontend | None]) -> PortMap:
        """This map with `changes` made: port -> its frontend, None: none."""
        if not changes:
            return self
        shards = list(self._shards)
        copied: set[int] = set()
        for port, frontend in changes.items():
            index = port % PORT_SHARDS
            if index not in copied:
                shards[index] = dict(shards[index])
                copied.add(index)
            if frontend is None:
                shards[index].pop(port, None)
            else:
                shards[index][port] = frontend
        return PortMap(tuple(shards))


@dataclass(frozen=True)
class DesiredState:
    frontends: Mapping[int, Frontend]  # TCP frontends by port
    rejections: tuple[Rejection, ...] = ()
    warnings: tuple[str, ...] = ()  # pool-level conflicts resolved by the oldest container's value
    udp_frontends: Mapping[int, Frontend] = field(default_factory=dict)  # UDP frontends by port

    def pools(self, protocol: Protocol) -> Mapping[int, Frontend]:
        return self.udp_frontends if protocol is Protocol.UDP else self.frontends

    def of_family(self, family: Family) -> DesiredState:
        """The state as the rules of `family` see it: each pool with its backends of that family only (addressed
        in it). A pool without any keeps its frontend, empty: it is not routed in that family (no NAT64)."""
        if family is Family.IPV4:
            return self

        def pools(frontends: Mapping[int, Frontend]) -> dict[int, Frontend]:
            return {
                port: dataclasses.replace(
                    f, backends=tuple(v for b in f.backends if (v := b.of_family(family)) is not None)
                )
                for port, f in frontends.items()
            }

        return dataclasses.replace(self, frontends=pools(self.frontends), udp_frontends=pools(self.udp_frontends))

    def every_frontend(self) -> list[Frontend]:
        """TCP frontends, then UDP ones, each by port."""
        return [f for protocol in Protocol for _, f in sorted(self.pools(protocol).items())]


def timestamp_ns(text: object) -> int:
    """A Docker RFC 3339 timestamp (nanosecond fraction, `Z` or an offset) as ns since the epoch; 0 if missing or
    unreadable. The providers read each snapshot's times once, here: an integer is compared without parsing (the
    rotation's order) and is ~50 bytes smaller than the text. Python 3.11's fromisoformat reads `Z` and a fraction of
    any length (to the microsecond): only the fraction's digits past that are read apart."""
    if not isinstance(text, str):
        return 0
    try:
        whole = datetime.fromisoformat(text)
    except ValueError:
        return 0
    dot = text.find(".")
    fraction = _FRACTION_DIGITS.match(text, dot + 1) if dot >= 0 else None
    nanos = int(fraction.group().ljust(9, "0")) if fraction else 0
    # whole seconds, exact: the float's error is far below 0.5
    seconds = round(whole.timestamp() - whole.microsecond / 1_000_000)
    return seconds * 1_000_000_000 + nanos
