"""The label contract: container labels -> backends and frontends (the desired state).

Pure functions only. A container whose labels are wrong is rejected with a reason; it never
affects another container or another frontend.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from .model import (
    MAPS_KEPT,
    OPEN,
    Access,
    Backend,
    Balance,
    ContainerSnapshot,
    DesiredState,
    Frontend,
    Protocol,
    Rejection,
    network_names,
)
from .policy import DEFAULT_POLICY, Policy, owner_text

DEFAULT_PREFIX = "tcp"
DEFAULT_UDP_PREFIX = "udp"
# Network drivers whose container addresses this host cannot route to: an overlay lives in its own namespace
# (reached through VXLAN, not from the host), and a macvlan or ipvlan parent cannot talk to its own children.
UNROUTABLE_DRIVERS = frozenset({"overlay", "macvlan", "ipvlan"})
_DECIMAL = re.compile(r"[0-9]{1,6}")
_RATE = re.compile(r"([0-9]{1,6})/s")
MAX_ALLOW = 64  # CIDRs in tcp.allow: each is a rule that a new connection may traverse
MAX_RATE = 100_000  # new connections per second (hashlimit takes up to 1,000,000)
MAX_BURST = 10_000  # hashlimit's own limit
_BOOLEANS = {"true": True, "false": False}
T = TypeVar("T")


def port_labels(prefix: str, udp_prefix: str) -> tuple[str, ...]:
    """The labels that make a container a backend: `<prefix>.port` (TCP), `<udp_prefix>.port` (UDP)."""
    return f"{prefix}.port", f"{udp_prefix}.port"


def has_port_label(labels: Mapping[str, str], prefix: str, udp_prefix: str) -> bool:
    """Whether a container carries a TCP or a UDP frontend label."""
    return any(label in labels for label in port_labels(prefix, udp_prefix))


@dataclass(frozen=True)
class LabelKeys:
    """The labels tcprouter reads: its TCP and UDP prefixes' and the owner label, the only ones a provider keeps.

    A Compose container carries a dozen others (its project's paths and config hash, its image's OCI labels); at
    100,000 containers they would be a large part of the daemon's memory. Without them the replicas of one service
    have equal labels, and their snapshots share one map (model.SHARED_FIELDS)."""

    prefix: str = DEFAULT_PREFIX
    udp_prefix: str = DEFAULT_UDP_PREFIX
    owner: str = ""

    def port_labels(self) -> tuple[str, ...]:
        return port_labels(self.prefix, self.udp_prefix)

    def has_port_label(self, labels: Mapping[str, str]) -> bool:
        return has_port_label(labels, self.prefix, self.udp_prefix)

    def kept(self, labels: Mapping[str, str]) -> dict[str, str]:
        """The labels of `labels` that tcprouter reads."""
        namespaces = (f"{self.prefix}.", f"{self.udp_prefix}.")
        return {key: value for key, value in labels.items() if key.startswith(namespaces) or key == self.owner}


def kept_labels(labels: object, keys: LabelKeys | None) -> dict[str, str]:
    """What a snapshot keeps of a Docker object's labels (None: none): those of `keys`, or all without it.
    TypeError for labels of another shape, which the provider reports as malformed data."""
    if not labels:
        return {}
    if not isinstance(labels, Mapping):
        raise TypeError(f"labels must be a map, not {type(labels).__name__}")
    return keys.kept(labels) if keys else dict(labels)


def labels_if_map(labels: object) -> Mapping[str, str] | None:
    """The labels of data already found malformed, if they at least are a map (for the rejection's report)."""
    return labels if isinstance(labels, Mapping) else None


class LabelError(ValueError):
    """A label value that breaks the contract; `reason` is a stable key for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class BackendSpec(NamedTuple):
    """One container's validated labels, before pooling."""

    frontend_port: int
    backend: Backend
    balance: Balance | None  # None: the label was not set
    access: Access = OPEN
    synproxy: bool | None = None  # None: the label was not set


def _integer(labels: dict[str, str], key: str, low: int, high: int) -> int | None:
    raw = labels.get(key)
    if raw is None:
        return None
    value = raw.strip()
    if not _DECIMAL.fullmatch(value) or not low <= int(value) <= high:
        raise LabelError(f"invalid_{key.rsplit('.', 1)[-1]}", f"label {key}={raw!r} is not an integer {low}-{high}")
    return int(value)


def _choose_network(
    labels: Mapping[str, str], networks: tuple[str, ...], drivers: Mapping[str, str], internal: frozenset[str], key: str
) -> str:
    """The label's network, else the first (by name) this host can route to, among the container's `networks` (their
    `drivers`; the `internal` ones). A network of an unknown driver counts as routable."""
    wanted = labels.get(key)
    if wanted is None and len(networks) == 1:  # most containers: one network, nothing to choose
        (only,) = networks
        if drivers.get(only) not in UNROUTABLE_DRIVERS and only not in internal:
            return only
    unroutable = {n for n in networks if drivers.get(n) in UNROUTABLE_DRIVERS} if drivers else set()
    if wanted is not None:
        if wanted not in networks:
            raise LabelError(
                "unknown_network",
                f"label {key}={wanted!r} names a network the container is not attached to "
                f"(attached: {', '.join(sorted(networks)) or 'none'})",
            )
        _refuse_internal(internal, {wanted}, key)
        if wanted in unroutable:
            raise LabelError(
                "network_unroutable",
                f"label {key}={wanted!r} names a {drivers[wanted]} network, which this host "
                "cannot route to; attach the container to a bridge network and name that one",
            )
        return wanted
    if not networks:
        raise LabelError("no_address", "the container is attached to no network with an address")
    routable = sorted(set(networks) - unroutable - internal)
    if not routable:
        _refuse_internal(internal, set(networks), key)
        listed = ", ".join(f"{n} ({drivers[n]})" for n in sorted(unroutable))
        raise LabelError(
            "network_unroutable",
            f"the container's only networks are ones this host cannot route to: {listed}; "
            "attach it to a bridge network as well",
        )
    return routable[0]


def _refuse_internal(internal_networks: frozenset[str], networks: set[str], key: str) -> None:
    """An --internal network is cut off from the outside world by Docker: routing to it would open it."""
    internal = sorted(networks & internal_networks)
    if internal:
        raise LabelError(
            "network_internal",
            f"its network {', '.join(internal)} is internal (docker network create --internal): Docker keeps it "
            f"away from the outside world, and tcprouter does not open it; attach the container to another "
            f"network (and name it with {key})",
        )


def _container_port(
    candidates: list[int], wanted: int | None, fallback: int | None, prefix: str, what: str, protocol: Protocol
) -> int:
    """The container port to send to: the label's, else the only candidate, else `fallback`."""
    if wanted is not None:
        return wanted
    kind = protocol.upper()
    if len(candidates) > 1:
        raise LabelError(
            "ambiguous_backend_port",
            f"the container {what} several {kind} ports {candidates}; set {prefix}.backend_port",
        )
    if candidates:
        return candidates[0]
    if fallback is None:
        raise LabelError("not_published", f"the container {what} no {kind} port")
    return fallback


def _local_endpoint(
    container: ContainerSnapshot, prefix: str, port: int, wanted: int | None, protocol: Protocol
) -> tuple[str, int, str]:
    """A container of this host: a container port and the Docker network it is reached on, where it has an IPv4
    address (and, on a network created with --ipv6, an IPv6 one)."""
    backend_port, network = _local_choice(
        container.labels,
        container.exposed_ports(protocol),
        network_names(container.networks),
        container.network_drivers,
        container.internal_networks,
        prefix,
        port,
        wanted,
        protocol,
    )
    address = container.networks[network]
    if not address:
        raise LabelError("no_address", f"the container has no IPv4 address on network {network!r}")
    return address, backend_port, network


@functools.lru_cache(maxsize=MAPS_KEPT)
def _local_choice(
    labels: Mapping[str, str],
    exposed: tuple[int, ...],
    networks: tuple[str, ...],
    drivers: Mapping[str, str],
    internal: frozenset[str],
    prefix: str,
    port: int,
    wanted: int | None,
    protocol: Protocol,
) -> tuple[int, str]:
    """The container port and the network of a local container, from what its replicas share (its labels, exposed
    ports, networks and their drivers): read once per shape, not per container (an error is not kept)."""
    backend_port = _container_port(sorted(exposed), wanted, port, prefix, "exposes", protocol)
    return backend_port, _choose_network(labels, networks, drivers, internal, f"{prefix}.network")


def _remote_endpoint(
    container: ContainerSnapshot, prefix: str, wanted: int | None, protocol: Protocol
) -> tuple[str, int]:
    """A container of another host: that host's address, the host port its container port is published on."""
    try:
        ipaddress.IPv4Address(container.host_address)
    except ValueError:
        raise LabelError(
            "no_address", f"its host's address {container.host_address!r} is not an IPv4 address"
        ) from None
    published = container.published_ports(protocol)
    target = _container_port(sorted(published), wanted, None, prefix, "publishes", protocol)
    if target not in published:
        suffix = "" if protocol is Protocol.TCP else f",protocol={protocol}"
        raise LabelError(
            "not_published",
            f"label {prefix}.backend_port={target}: the container does not publish that {protocol.upper()} port on "
            f"its host (published: {sorted(published) or 'none'}; publish it with "
            f"--publish mode=host,target={target}{suffix})",
        )
    return container.host_address, published[target]


def parse_backend(
    container: ContainerSnapshot, prefix: str = DEFAULT_PREFIX, protocol: Protocol = Protocol.TCP
) -> BackendSpec:
    """Validate one container's labels for a frontend of `protocol`. Raises LabelError naming the label and why.

    The access labels (allow, maxconn, rate, burst) are read for TCP only: a UDP frontend is open to every client.
    """
    # The replicas of a service share their labels: each label map is read once (_frontend_labels, _access_labels).
    labels = container.labels
    port, wanted_port, weight, balance, synproxy = _frontend_labels(labels, prefix, protocol)
    network = ""
    if container.host_address:
        ip, backend_port = _remote_endpoint(container, prefix, wanted_port, protocol)
    else:
        ip, backend_port, network = _local_endpoint(container, prefix, port, wanted_port, protocol)
    backend = Backend(  # positional: 100,000 of these in a full sync at 10,000 x 10
        container.id,
        container.name,
        ip,
        backend_port,
        weight,
        container.subnets.get(network),
        container.node,
        container.networks6.get(network, ""),
        container.subnets6.get(network),
    )
    if protocol is not Protocol.TCP:
        return BackendSpec(frontend_port=port, backend=backend, balance=balance)
    return BackendSpec(port, backend, balance, _access_labels(labels, prefix), synproxy)


# A label map's reading is kept per map (an error is not kept: wrong labels are read again, and rare).
@functools.lru_cache(maxsize=MAPS_KEPT)
def _frontend_labels(
    labels: Mapping[str, str], prefix: str, protocol: Protocol
) -> tuple[int, int | None, int, Balance | None, bool | None]:
    """The frontend port, backend port (None: not set), weight, balance and synproxy (None: not set) that `labels`
    (a snapshot's, hashable: model.FrozenMap) give; LabelError for the first wrong one."""
    port = _integer(labels, f"{prefix}.port", 1, 65535)
    if port is None:
        raise LabelError("missing_port", f"label {prefix}.port is missing")
    wanted_port = _integer(labels, f"{prefix}.backend_port", 1, 65535)
    weight = _integer(labels, f"{prefix}.weight", 1, 100)

    balance_raw = labels.get(f"{prefix}.balance")
    balance = None
    if balance_raw is not None:
        try:
            balance = Balance(balance_raw.strip())
        except ValueError:
            raise LabelError(
                "invalid_balance",
                f"label {prefix}.balance={balance_raw!r} is not one of {', '.join(b.value for b in Balance)}",
            ) from None

    synproxy_raw = labels.get(f"{prefix}.synproxy") if protocol is Protocol.TCP else None
    synproxy = None
    if synproxy_raw is not None:
        synproxy = _BOOLEANS.get(synproxy_raw.strip().lower())
        if synproxy is None:
            raise LabelError("invalid_synproxy", f"label {prefix}.synproxy={synproxy_raw!r} is not true or false")
    return port, wanted_port, weight or 1, balance, synproxy


@functools.lru_cache(maxsize=MAPS_KEPT)
def _access_labels(labels: Mapping[str, str], prefix: str) -> Access:
    return parse_access(labels, prefix)


def _allow(labels: Mapping[str, str], key: str) -> tuple[str, ...]:
    raw = labels.get(key)
    if raw is None:
        return ()
    entries = [entry.strip() for entry in raw.split(",")]
    if not 1 <= len(entries) <= MAX_ALLOW:
        raise LabelError("invalid_allow", f"label {key}={raw!r}: give 1 to {MAX_ALLOW} client networks")
    networks = []
    for entry in entries:
        try:
            networks.append(str(ipaddress.ip_network(entry, strict=False)))
        except ValueError:
            raise LabelError(
                "invalid_allow",
                f"label {key}={raw!r}: {entry!r} is not a network like 192.0.2.0/24 or 2001:db8::/32",
            ) from None
    if "0.0.0.0/0" in networks or "::/0" in networks:
        return ()  # every client (and iptables-save would print `-s 0.0.0.0/0` as no match at all)
    return tuple(dict.fromkeys(networks))  # in order, once each


def parse_access(labels: Mapping[str, str], prefix: str = DEFAULT_PREFIX) -> Access:
    """The access labels of a container (tcp.allow, tcp.maxconn, tcp.rate, tcp.burst), validated."""
    maxconn = _integer(labels, f"{prefix}.maxconn", 1, 65535)
    rate_raw = labels.get(f"{prefix}.rate")
    rate = None
    if rate_raw is not None:
        match = _RATE.fullmatch(rate_raw.strip())
        if not match or not 1 <= int(match.group(1)) <= MAX_RATE:
            raise LabelError(
                "invalid_rate", f"label {prefix}.rate={rate_raw!r} is not N/s with N an integer 1-{MAX_RATE}"
            )
        rate = int(match.group(1))
    burst = _integer(labels, f"{prefix}.burst", 1, MAX_BURST)
    if burst is not None and rate is None:
        raise LabelError("invalid_burst", f"label {prefix}.burst={labels[f'{prefix}.burst']!r} needs {prefix}.rate")
    access = Access(allow=_allow(labels, f"{prefix}.allow"), maxconn=maxconn, rate=rate, burst=burst)
    return OPEN if access == OPEN else access


def _pool_access(port: int, specs: list[BackendSpec], warnings: list[str]) -> Access:
    """The oldest backend's access settings, as a whole (none set: open), win; a backend that disagrees
    is warned about. A newer container cannot loosen (or tighten) a frontend it joins."""
    if not specs:
        return OPEN
    oldest = specs[0]
    for other in specs[1:]:
        if other.access != oldest.access:
            warnings.append(
                f"frontend {port}: container {other.backend.name} asks for access {other.access}, "
                f"the oldest container {oldest.backend.name} sets {oldest.access}, which wins"
            )
    return oldest.access


def _pool_setting(
    frontend: str,
    specs: list[BackendSpec],
    name: str,
    value: Callable[[BackendSpec], T | None],
    default: T,
    warnings: list[str],
) -> T:
    """A pool-level label (balance, synproxy): the oldest container that sets it wins; one that disagrees
    is warned about."""
    settings = [(spec, setting) for spec in specs if (setting := value(spec)) is not None]
    if not settings:
        return default
    (oldest, chosen), *others = settings
    for other, setting in others:
        if setting != chosen:
            warnings.append(
                f"{frontend}: container {other.backend.name} asks for {name} {setting}, "
                f"the oldest container {oldest.backend.name} sets {chosen}, which wins"
            )
    return chosen


def desired_state(
    containers: Iterable[ContainerSnapshot],
    prefix: str = DEFAULT_PREFIX,
    busy_ports: Mapping[int, str] | None = None,
    policy: Policy = DEFAULT_POLICY,
    udp_prefix: str = DEFAULT_UDP_PREFIX,
    udp_busy_ports: Mapping[int, str] | None = None,
) -> DesiredState:
    """Group the serving, valid containers into frontends; report the rest.

    Pools are ordered by container creation time (oldest first) so the rotation is stable, and a
    pool-level setting that disagrees within a pool takes the oldest container's value. A frontend
    port that the host already uses (`busy_ports`: port -> who uses it; `udp_busy_ports` for UDP) is refused:
    routing it would hijack that service. So is a port outside the policy's, or one that another owner's
    container holds. A container labelled `<udp_prefix>.port` is a backend of that UDP frontend too (or only).
    """
    ordered = sorted(containers, key=lambda c: c.age_order)
    rejections = [Rejection(c.id, c.name, "malformed", c.malformed) for c in ordered if c.malformed]
    readable = [c for c in ordered if not c.malformed]
    tcp, udp = (
        protocol_frontends(
            [c for c in readable if protocol in claims(c.labels, prefix, udp_prefix)],
            udp_prefix if protocol is Protocol.UDP else prefix,
            protocol,
            (udp_busy_ports if protocol is Protocol.UDP else busy_ports) or {},
            policy,
        )
        for protocol in (Protocol.TCP, Protocol.UDP)
    )
    return DesiredState(
        frontends=tcp.frontends,
        rejections=(*rejections, *tcp.rejections, *udp.rejections),
        warnings=(*tcp.warnings, *udp.warnings),
        udp_frontends=udp.frontends,
    )


def claims(labels: Mapping[str, str], prefix: str, udp_prefix: str) -> tuple[Protocol, ...]:
    """The protocols whose frontends weigh a container of these labels: UDP if it has the UDP port label, TCP if it
    has the TCP one or no UDP one (so that a container with neither is rejected as a TCP backend without a port)."""
    udp = f"{udp_prefix}.port" in labels
    tcp = f"{prefix}.port" in labels or not udp
    return (Protocol.TCP,) * tcp + (Protocol.UDP,) * udp


def protocol_frontends(
    containers: list[ContainerSnapshot], prefix: str, protocol: Protocol, busy_ports: Mapping[int, str], policy: Policy
) -> DesiredState:
    """The frontends of one protocol (in `frontends`, whatever the protocol) from readable containers oldest
    first: what desired_state does per protocol."""
    rejections: list[Rejection] = []
    pools: dict[int, list[BackendSpec]] = defaultdict(list)
    owners: dict[int, ContainerSnapshot] = {}  # frontend port -> its oldest backend, whose owner it belongs to
    # Frontends are keyed by the label even when no container serves: status shows them empty.
    declared_ports: set[int] = set()
    for container in containers:
        if not container.running:
            continue  # a stopped container has no address to validate: it is simply not a backend
        try:
            spec = parse_backend(container, prefix, protocol)
            _check_claim(container, spec.frontend_port, prefix, busy_ports, policy, owners)
        except LabelError as error:
            rejections.append(Rejection(container.id, container.name, error.reason, error.detail, protocol))
            continue
        declared_ports.add(spec.frontend_port)
        if container.serving:
            pools[spec.frontend_port].append(spec)

    frontends: dict[int, Frontend] = {}
    warnings: list[str] = []
    for port in sorted(declared_ports):
        name = f"frontend {port}" if protocol is Protocol.TCP else f"{protocol.upper()} frontend {port}"
        specs = pools.get(port, [])
        frontends[port] = Frontend(
            port,
            _pool_setting(name, specs, "balance", lambda s: s.balance, Balance.ROUNDROBIN, warnings),
            tuple(s.backend for s in specs),
            _pool_access(port, specs, warnings),
            _pool_setting(name, specs, "synproxy", lambda s: s.synproxy, False, warnings),
            protocol,
        )
    return DesiredState(frontends=frontends, rejections=tuple(rejections), warnings=tuple(warnings))


def _check_claim(
    container: ContainerSnapshot,
    port: int,
    prefix: str,
    busy_ports: Mapping[int, str],
    policy: Policy,
    owners: dict[int, ContainerSnapshot],
) -> None:
    """Raise LabelError if the container may not claim `port`; else it joins, and owns the port if it is the
    first (the oldest) to claim it. Containers must come oldest first, so that the owner never depends on the
    order Docker lists them in."""
    if policy.allowed_ports is not None and port not in policy.allowed_ports:
        raise LabelError(
            "port_not_allowed",
            f"label {prefix}.port={port}: not among the ports tcprouter may route (--ports {policy.allowed_ports})",
        )
    if port in busy_ports:
        raise LabelError("port_in_use", f"label {prefix}.port={port}: {busy_ports[port]}")
    holder = owners.setdefault(port, container)
    owner, mine = policy.owner(holder.labels), policy.owner(container.labels)
    if mine != owner:
        raise LabelError(
            "port_owned",
            f"label {prefix}.port={port}: frontend {port} belongs to {policy.owner_label}={owner_text(owner)} "
            f"(its oldest backend {holder.name}); this container's {policy.owner_label} is {owner_text(mine)}",
        )


def reachable_only(state: DesiredState, unreachable: Collection[tuple[str, int]]) -> DesiredState:
    """The state without the TCP backends whose endpoint (address, port) failed its reachability probes (the
    probes are TCP connections: UDP backends are not probed)."""
    if not unreachable:
        return state
    frontends = {
        port: dataclasses.replace(f, backends=tuple(b for b in f.backends if b.endpoint not in unreachable))
        for port, f in state.frontends.items()
    }
    return dataclasses.replace(state, frontends=frontends)
