"""The edge to Docker: container snapshots and the event stream, turned into changes.

The stream is opened before the first full list (as registrator does), so a container that starts
in between is seen by one or the other.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import docker
import docker.errors

from .model import ContainerSnapshot

log = logging.getLogger(__name__)

# The actions that can change whether or where a container is a backend.
CONTAINER_ACTIONS = frozenset(
    {"start", "restart", "die", "stop", "kill", "destroy", "pause", "unpause", "rename", "health_status", "update"}
)
NETWORK_ACTIONS = frozenset({"connect", "disconnect"})
# A kill with one of these signals ends the container: take it out of the rotation before it dies.
LETHAL_SIGNALS = frozenset({"9", "15", "SIGKILL", "SIGTERM", "KILL", "TERM"})


@dataclass(frozen=True)
class Change:
    """Something happened to one container. `snapshot` is its fresh state (None: not inspected, or gone)."""

    container_id: str
    action: str
    time_ns: int  # the Docker event's own timestamp, for event-to-rules latency
    snapshot: ContainerSnapshot | None = None
    gone: bool = False  # the container no longer exists
    drain: bool = False  # a stop or a lethal kill: leave the rotation now


@dataclass(frozen=True)
class Relist:
    """The full list of labelled containers, after (re)connecting to Docker."""

    snapshots: tuple[ContainerSnapshot, ...]


def connect(base_url: str | None, timeout: float) -> docker.APIClient:
    """A low-level client: `docker.from_env` semantics, with a timeout on every call but the stream."""
    if base_url:
        return docker.APIClient(base_url=base_url, timeout=timeout, version="auto")
    return docker.from_env(timeout=timeout).api


def snapshot_from_inspect(info: dict) -> ContainerSnapshot:
    """Build a snapshot from `docker inspect` output (a pure function)."""
    state = info.get("State") or {}
    config = info.get("Config") or {}
    networks = ((info.get("NetworkSettings") or {}).get("Networks")) or {}
    addresses: dict[str, str] = {}
    subnets: dict[str, str] = {}
    for name, net in networks.items():
        net = net or {}
        addresses[name] = net.get("IPAddress") or ""
        if net.get("IPAddress") and net.get("IPPrefixLen"):
            subnets[name] = _subnet(net["IPAddress"], int(net["IPPrefixLen"]))
    exposed = sorted(
        int(spec.split("/")[0])
        for spec in (config.get("ExposedPorts") or {})
        if spec.endswith("/tcp") and spec.split("/")[0].isdigit()
    )
    health = (state.get("Health") or {}).get("Status")
    return ContainerSnapshot(
        id=info["Id"],
        name=(info.get("Name") or info["Id"][:12]).lstrip("/"),
        created=info.get("Created") or "",
        labels=dict(config.get("Labels") or {}),
        running=bool(state.get("Running")) and not state.get("Paused") and not state.get("Restarting"),
        health=health or None,
        started_at=state.get("StartedAt") or "",
        networks=addresses,
        subnets=subnets,
        exposed_tcp_ports=tuple(exposed),
    )


def _subnet(address: str, prefix_len: int) -> str:
    return str(ipaddress.ip_interface(f"{address}/{prefix_len}").network)


def inspect(api: docker.APIClient, container_id: str) -> ContainerSnapshot | None:
    """The container's snapshot, or None if it no longer exists."""
    try:
        return snapshot_from_inspect(api.inspect_container(container_id))
    except docker.errors.NotFound:
        return None


def list_labelled(api: docker.APIClient, prefix: str) -> list[ContainerSnapshot]:
    found = []
    for summary in api.containers(filters={"label": f"{prefix}.port"}):
        snapshot = inspect(api, summary["Id"])
        if snapshot is not None:
            found.append(snapshot)
    return found


def open_events(api: docker.APIClient) -> Iterator[dict]:
    """Subscribe to the container and network events (the request is sent before this returns)."""
    return api.events(decode=True, filters={"type": ["container", "network"]})


def to_change(api: docker.APIClient, event: dict, prefix: str, known: set[str]) -> Change | None:
    """Turn one Docker event into a Change, inspecting the container when its state matters.

    `known` holds the ids of the labelled containers seen so far: network events carry no labels.
    """
    kind, action = event.get("Type"), (event.get("Action") or event.get("status") or "").split(":")[0]
    actor = event.get("Actor") or {}
    attributes = actor.get("Attributes") or {}
    if kind == "network" and action in NETWORK_ACTIONS:
        container_id = attributes.get("container", "")
        if container_id not in known:
            return None
    elif kind == "container" and action in CONTAINER_ACTIONS:
        container_id = actor.get("ID") or event.get("id") or ""
        if f"{prefix}.port" not in attributes and container_id not in known:
            return None
    else:
        return None
    time_ns = int(event.get("timeNano") or int(event.get("time", 0)) * 1_000_000_000)
    if action == "stop" or (action == "kill" and attributes.get("signal", "") in LETHAL_SIGNALS):
        return Change(container_id, action, time_ns, drain=True)
    snapshot = inspect(api, container_id)
    return Change(container_id, action, time_ns, snapshot=snapshot, gone=snapshot is None)


def parse_tcp_listeners(text: str) -> dict[int, str]:
    """Listening sockets in /proc/net/tcp or /proc/net/tcp6 format: port -> local address.

    Loopback-only listeners are left out: tcprouter never routes loopback destinations.
    """
    listeners: dict[int, str] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != "0A":  # 0A: TCP_LISTEN
            continue
        address, port = proc_net_endpoint(fields[1])
        if not address.is_loopback:
            listeners.setdefault(port, str(address))
    return listeners


def proc_net_endpoint(field: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """An `ADDRESS:PORT` field of /proc/net/tcp{,6}; an IPv4-mapped IPv6 address comes back as IPv4."""
    hex_address, hex_port = field.split(":")
    raw = bytes.fromhex(hex_address)
    # The kernel prints each 32-bit word in host (little-endian) order.
    address = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address, int(hex_port, 16)


def host_tcp_listeners() -> dict[int, str]:
    """The host's TCP listeners that a frontend on the same port would hijack."""
    listeners: dict[int, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                listeners.update(parse_tcp_listeners(f.read()))
        except OSError:
            continue
    return listeners
