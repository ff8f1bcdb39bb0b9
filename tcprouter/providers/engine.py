"""A Docker engine as a source of backends: this host's (`local`) or another host's (`engines` mode).

The event stream is opened before the first full list (as registrator does), so a container that starts
in between is seen by one or the other. A liveness ping reopens a stream that a hung daemon keeps silent.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import signal
import socket
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import docker
import docker.errors
from docker.types import CancellableStream

from ..labels import LabelKeys, kept_labels, labels_if_map
from ..metrics import Metrics
from ..model import ContainerSnapshot, Protocol, timestamp_ns
from ..tracker import LOCAL, Change, Relist
from . import Sink
from .docker_api import DOCKER_ERRORS, connect, follow_forever, url_host

log = logging.getLogger(__name__)

# The actions that can change whether or where a container is a backend.
CONTAINER_ACTIONS = frozenset(
    {"start", "restart", "die", "stop", "kill", "destroy", "pause", "unpause", "rename", "health_status", "update"}
)
NETWORK_ACTIONS = frozenset({"connect", "disconnect"})
RELIST_WORKERS = 8  # concurrent inspects in a relist (docker-py pools 10 connections per client)
# A kill with one of these signals (or with the container's own stop signal) ends it: take it out of the rotation
# before it dies. `docker stop` sends the stop signal (SIGQUIT for nginx's image, SIGINT for postgres's), `docker
# stop -s` and `docker kill` the one given; SIGHUP, SIGUSR1... ask for a reload or a log rotation, not an end.
ENDING_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})


def signal_number(text: str) -> int | None:
    """A signal as Docker writes it ("15", "SIGTERM", "TERM", "sigquit"); None if it names no signal."""
    text = text.strip().upper()
    if text.isdigit():
        return int(text)
    try:
        return signal.Signals[text if text.startswith("SIG") else f"SIG{text}"].value
    except KeyError:
        return None


def ends_container(sent: str, stop_signal: str) -> bool:
    """Whether a kill with signal `sent` ends a container whose stop signal is `stop_signal`."""
    number = signal_number(sent)
    return number is not None and (number in ENDING_SIGNALS or number == signal_number(stop_signal or "SIGTERM"))


@dataclass(frozen=True)
class Host:
    """Where a remote engine's published ports are reached: its node name and address."""

    node: str
    address: str


class Network(NamedTuple):
    """What a container's inspect does not say about one of its networks."""

    driver: str = ""  # "": unknown
    internal: bool = False  # created with --internal: Docker cuts it off from the outside world


NetworkLookup = Callable[[str], Network]  # network ID -> what is known of it


class NetworkDrivers:
    """Network ID -> driver and internal flag, for one engine: a container's inspect names its networks but not
    those. Listed on the first lookup, again when an ID is not known (a network created since), and forgotten
    when a network is removed."""

    def __init__(self, api: docker.APIClient) -> None:
        self.api = api
        self._networks: dict[str, Network] = {}
        self._lock = threading.Lock()  # a relist's inspects look up at once: one listing serves them

    def __call__(self, network_id: str) -> Network:
        with self._lock:
            if network_id not in self._networks:
                self._networks = {
                    n["Id"]: Network(n.get("Driver") or "", bool(n.get("Internal"))) for n in self.api.networks()
                }
                self._networks.setdefault(network_id, Network())  # gone already: do not list again for it
            return self._networks[network_id]

    def forget(self) -> None:
        self._networks = {}


def _unknown_driver(network_id: str) -> Network:
    return Network()


def snapshot_from_inspect(
    info: dict, host: Host | None = None, driver_of: NetworkLookup = _unknown_driver, keys: LabelKeys | None = None
) -> ContainerSnapshot:
    """Build a snapshot from `docker inspect` output (a pure function, given `driver_of`:
    network ID -> its driver and internal flag).
    With `host`, the container is remote: reached at that host's address and the ports it publishes there.
    With `keys`, only the labels tcprouter reads are kept."""
    if not isinstance(info.get("Id"), str) or not isinstance(info.get("Created", ""), str):
        raise TypeError("Id and Created must be strings")
    state = info.get("State") or {}
    config = info.get("Config") or {}
    settings = info.get("NetworkSettings") or {}
    networks = settings.get("Networks") or {}
    addresses, subnets, addresses6, subnets6 = network_addresses(networks)
    drivers: dict[str, str] = {}
    internal: set[str] = set()
    for name, net in networks.items():
        known = driver_of(net["NetworkID"]) if net and net.get("NetworkID") else Network()
        drivers[name] = known.driver
        if known.internal:
            internal.add(name)
    exposed = {
        protocol: tuple(
            sorted(
                int(spec.split("/")[0])
                for spec in (config.get("ExposedPorts") or {})
                if spec.endswith(f"/{protocol}") and spec.split("/")[0].isdigit()
            )
        )
        for protocol in Protocol
    }
    ports = settings.get("Ports") or {}
    health = (state.get("Health") or {}).get("Status")
    return ContainerSnapshot(
        id=info["Id"],
        name=(info.get("Name") or info["Id"][:12]).lstrip("/"),
        created=timestamp_ns(info.get("Created")),
        labels=kept_labels(config.get("Labels"), keys),
        running=bool(state.get("Running")) and not state.get("Paused") and not state.get("Restarting"),
        health=health or None,
        started_at=timestamp_ns(state.get("StartedAt")),
        stop_signal=config.get("StopSignal") or "SIGTERM",
        networks=addresses,
        subnets=subnets,
        network_drivers=drivers,
        networks6=addresses6,
        subnets6=subnets6,
        internal_networks=frozenset(internal),
        exposed_tcp_ports=exposed[Protocol.TCP],
        exposed_udp_ports=exposed[Protocol.UDP],
        node=host.node if host else "",
        host_address=host.address if host else "",
        published_tcp_ports=published_tcp_ports(ports) if host else {},
        published_udp_ports=published_tcp_ports(ports, Protocol.UDP) if host else {},
    )


def network_addresses(networks: Mapping[str, dict | None]) -> tuple[dict[str, str], ...]:
    """Each network's IPv4 address ("" if none) and subnet, and its IPv6 address and subnet (networks created with
    --ipv6), from NetworkSettings.Networks as inspect and the list endpoint both give it."""
    addresses: dict[str, str] = {}
    subnets: dict[str, str] = {}
    addresses6: dict[str, str] = {}
    subnets6: dict[str, str] = {}
    for name, net in networks.items():
        net = net or {}
        addresses[name] = net.get("IPAddress") or ""
        if net.get("IPAddress") and net.get("IPPrefixLen"):
            subnets[name] = _subnet(net["IPAddress"], int(net["IPPrefixLen"]))
        if net.get("GlobalIPv6Address") and net.get("GlobalIPv6PrefixLen"):
            interface = ipaddress.IPv6Interface(f"{net['GlobalIPv6Address']}/{int(net['GlobalIPv6PrefixLen'])}")
            addresses6[name], subnets6[name] = str(interface.ip), str(interface.network)
    return addresses, subnets, addresses6, subnets6


_HEALTH_IN_STATUS = re.compile(r"\((healthy|unhealthy|health: starting)\)$")


def health_in_status(status: str) -> str | None:
    """The health a list entry's Status shows ("Up 2 minutes (healthy)"), as inspect's State.Health.Status."""
    found = _HEALTH_IN_STATUS.search(status)
    return None if found is None else found.group(1).removeprefix("health: ")


def listed_published_ports(ports: list, wanted: Protocol) -> dict[int, int]:
    """published_tcp_ports from a list entry's Ports ([{IP, PrivatePort, PublicPort, Type}])."""
    published: dict[int, int] = {}
    for port in ports:
        loopback = ipaddress.ip_address(port.get("IP") or "0.0.0.0").is_loopback
        if port.get("Type") == wanted and port.get("PublicPort") and not loopback:
            published.setdefault(int(port["PrivatePort"]), int(port["PublicPort"]))
    return published


def still_as_held(summary: dict, held: ContainerSnapshot, keys: LabelKeys | None = None) -> bool:
    """Whether a list entry shows nothing that differs from the snapshot held of the same container: labels,
    running, health, every network's addresses and subnets, and (remote) published ports. Creation time, stop
    signal and exposed ports do not change while the container exists; a restart changes its start time, which
    the list does not show: a container seen stopping (a drain) is inspected again whatever its entry says.
    `keys`: the ones the held snapshot kept of its labels."""
    try:
        settings = summary.get("NetworkSettings") or {}
        addresses = network_addresses(settings.get("Networks") or {})
        ports = summary.get("Ports") or []
        published = (
            (listed_published_ports(ports, Protocol.TCP), listed_published_ports(ports, Protocol.UDP))
            if held.host_address
            else ({}, {})
        )
        labels = kept_labels(summary.get("Labels"), keys)
    except (AttributeError, KeyError, TypeError, ValueError):  # an odd entry: inspect it
        return False
    return (
        not held.malformed
        and labels == held.labels
        and (summary.get("State") == "running") == held.running
        and health_in_status(summary.get("Status") or "") == held.health
        and addresses == (held.networks, held.subnets, held.networks6, held.subnets6)
        and published == (held.published_tcp_ports, held.published_udp_ports)
    )


def published_tcp_ports(ports: dict, wanted: Protocol = Protocol.TCP) -> dict[int, int]:
    """Container port -> host port of one protocol (TCP unless `wanted` says otherwise), from inspect's
    NetworkSettings.Ports; bindings to loopback are left out (another host cannot reach them)."""
    published: dict[int, int] = {}
    for spec, bindings in ports.items():
        port, _, protocol = spec.partition("/")
        for binding in bindings or ():
            host_ip = binding.get("HostIp") or "0.0.0.0"
            if protocol == wanted and port.isdigit() and not ipaddress.ip_address(host_ip).is_loopback:
                published.setdefault(int(port), int(binding["HostPort"]))
    return published


def _subnet(address: str, prefix_len: int) -> str:
    return str(ipaddress.ip_interface(f"{address}/{prefix_len}").network)


def inspect(
    api: docker.APIClient,
    container_id: str,
    host: Host | None = None,
    driver_of: NetworkLookup = _unknown_driver,
    keys: LabelKeys | None = None,
) -> ContainerSnapshot | None:
    """The container's snapshot, or None if it no longer exists."""
    try:
        info = api.inspect_container(container_id)
    except docker.errors.NotFound:
        return None
    return read_inspect(info, container_id, host, driver_of, keys)


def read_inspect(
    info: object,
    container_id: str,
    host: Host | None = None,
    driver_of: NetworkLookup = _unknown_driver,
    keys: LabelKeys | None = None,
) -> ContainerSnapshot:
    """snapshot_from_inspect, or, for data of an unexpected shape, a snapshot that says why it is rejected."""
    try:
        return snapshot_from_inspect(info, host, driver_of, keys)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        config = info.get("Config") if isinstance(info, dict) else None
        return ContainerSnapshot(
            id=container_id,
            name=container_id[:12],
            created=0,
            labels=kept_labels(labels_if_map(config.get("Labels")) if isinstance(config, dict) else None, keys),
            running=True,
            malformed=f"Docker's inspect data has an unexpected shape ({type(error).__name__}: {error})",
        )


def list_labelled(
    api: docker.APIClient,
    keys: LabelKeys,
    host: Host | None = None,
    driver_of: NetworkLookup | None = None,
    held: Mapping[str, ContainerSnapshot] | None = None,
    suspect: Collection[str] = (),
) -> list[ContainerSnapshot]:
    """The labelled containers (`<prefix>.port` or `<udp_prefix>.port`), with the labels of `keys` only. Local
    ones (no `host`) with their networks' drivers (listed if none is given).

    The list endpoint lacks what a snapshot needs (creation time to the nanosecond, StartedAt, StopSignal, exposed
    ports), so a container is inspected unless `held` has a snapshot of it that its list entry still agrees with
    (still_as_held) and it is not in `suspect`: a relist after a reconnect inspects only what changed. Inspects run
    RELIST_WORKERS at a time."""
    if driver_of is None:
        driver_of = _unknown_driver if host else NetworkDrivers(api)
    held = held or {}
    # Docker's label filters all have to match: one listing per label, each container once.
    listed = {s["Id"]: s for label in keys.port_labels() for s in api.containers(filters={"label": label})}
    kept = {
        cid: held[cid]
        for cid, summary in listed.items()
        if cid in held and cid not in suspect and still_as_held(summary, held[cid], keys)
    }
    unknown = [cid for cid in listed if cid not in kept]
    inspected: dict[str, ContainerSnapshot | None] = {}
    if unknown:
        with ThreadPoolExecutor(min(RELIST_WORKERS, len(unknown)), thread_name_prefix="relist") as pool:
            inspected = dict(
                zip(unknown, pool.map(lambda cid: inspect(api, cid, host, driver_of, keys), unknown), strict=True)
            )
    snapshots = (kept.get(cid) or inspected.get(cid) for cid in listed)
    return [snapshot for snapshot in snapshots if snapshot is not None]


def open_events(api: docker.APIClient) -> Iterator[dict]:
    """Subscribe to the container and network events (the request is sent before this returns)."""
    return api.events(decode=True, filters={"type": ["container", "network"]})


def to_change(
    api: docker.APIClient,
    event: dict,
    keys: LabelKeys,
    known: Mapping[str, str],
    host: Host | None = None,
    source: str = LOCAL,
    driver_of: NetworkLookup = _unknown_driver,
) -> Change | None:
    """Turn one Docker event into a Change, inspecting the container when its state matters.

    `known` maps the labelled containers seen so far to their stop signals: network events carry no labels, and a
    kill event tells the signal, not whether it is the one that stops the container.
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
        if not keys.has_port_label(attributes) and container_id not in known:
            return None
    else:
        return None
    time_ns = int(event.get("timeNano") or int(event.get("time", 0)) * 1_000_000_000)
    stop_signal = known.get(container_id) or "SIGTERM"
    if action == "stop" or (action == "kill" and ends_container(attributes.get("signal", ""), stop_signal)):
        return Change(container_id, action, time_ns, drain=True, source=source)
    snapshot = inspect(api, container_id, host, driver_of, keys)
    return Change(container_id, action, time_ns, snapshot=snapshot, gone=snapshot is None, source=source)


@dataclass
class _Session:
    api: docker.APIClient
    stream: CancellableStream
    host: Host | None
    known: dict[str, str]  # labelled container id -> its stop signal
    done: threading.Event
    drivers: NetworkDrivers | None  # local engine only: gateway mode reaches published ports, not networks


class EngineProvider:
    """One Docker engine. `url` None: this host's engine (`local`); else a remote engine (`remote=True`)."""

    def __init__(
        self,
        url: str | None,
        keys: LabelKeys,
        metrics: Metrics,
        timeout: float = 10.0,
        remote: bool = False,
    ) -> None:
        if remote and not (url and url_host(url)):
            raise ValueError(
                f"engines mode needs a tcp://, https:// or ssh:// Docker URL naming the engine's host "
                f"(its published ports are reached at that address), not {url!r}"
            )
        self.url = url
        self.keys = keys
        self.metrics = metrics
        self.timeout = timeout
        self.remote = remote
        self.source = url if remote and url else LOCAL
        # The last snapshot of each labelled container (the tracker holds the same objects), and the ones seen
        # stopping since: a relist after a reconnect inspects only what its list entries show changed.
        self._held: dict[str, ContainerSnapshot] = {}
        self._suspect: set[str] = set()
        for action in sorted(CONTAINER_ACTIONS | NETWORK_ACTIONS):
            metrics.docker_events.labels(action)  # series exist at 0, so rate() and alerts see the first event
        metrics.docker_connected.labels(self.source)
        metrics.docker_reconnects.labels(self.source)

    def _host(self) -> Host | None:
        """A remote engine's node: named as its URL names it, at that host's address (DNAT needs an address)."""
        if not self.remote:
            return None
        assert self.url is not None
        name = url_host(self.url)
        return Host(node=name, address=socket.gethostbyname(name))

    def list(self) -> list[ContainerSnapshot]:
        return list_labelled(connect(self.url, self.timeout), self.keys, self._host())

    def follow(self, sink: Sink, stopping: threading.Event) -> None:
        def start() -> _Session:
            api = connect(self.url, self.timeout)
            host = self._host()
            stream = open_events(api)  # subscribe first: nothing falls between list and stream
            drivers = None if host else NetworkDrivers(api)
            try:
                labelled = list_labelled(api, self.keys, host, drivers, self._held, self._suspect)
            except BaseException:
                stream.close()
                raise
            self._held, self._suspect = {s.id: s for s in labelled}, set()
            sink(Relist(tuple(labelled), source=self.source))
            log.info("%s: Docker connected: %d labelled containers", self.source, len(labelled))
            known = {s.id: s.stop_signal for s in labelled}
            session = _Session(api, stream, host, known, threading.Event(), drivers)
            threading.Thread(target=self._ping, args=(session,), name=f"ping {self.source}", daemon=True).start()
            return session

        def follow(session: _Session) -> None:
            for event in session.stream:
                if stopping.is_set():
                    return
                if session.drivers and event.get("Type") == "network" and event.get("Action") == "destroy":
                    session.drivers.forget()
                driver_of = session.drivers or _unknown_driver
                change = to_change(session.api, event, self.keys, session.known, session.host, self.source, driver_of)
                if change is None:
                    continue
                if change.gone:
                    session.known.pop(change.container_id, None)
                    self._held.pop(change.container_id, None)
                elif change.snapshot is not None:
                    session.known[change.container_id] = change.snapshot.stop_signal
                    self._held[change.container_id] = change.snapshot
                if change.drain:
                    self._suspect.add(change.container_id)
                self.metrics.docker_events.labels(change.action).inc()
                sink(change)
            raise ConnectionError("the Docker event stream ended")

        def close(session: _Session) -> None:
            session.done.set()
            session.stream.close()

        follow_forever(self.source, stopping, self.metrics, start, follow, close)

    def _ping(self, session: _Session) -> None:
        """Liveness: a daemon that hangs keeps the stream open but silent. If it stops answering pings, close
        the stream so that the session ends and the provider reconnects (and relists) instead of waiting forever."""
        while not session.done.wait(self.timeout):
            try:
                session.api.ping()
            except DOCKER_ERRORS as error:
                log.warning("%s: Docker does not answer pings (%s): reopening the connection", self.source, error)
                session.stream.close()
                return
