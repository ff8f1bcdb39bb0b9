"""A Docker Swarm as a source of backends: services labelled `tcp.port`, their running tasks reached at
their node's address and the host-mode port they publish there.

Swarm emits service and node events but no task events, so the tasks are listed (one API call, plus the
services and nodes) whenever a service or node event arrives and every `poll_interval` seconds. A task
whose desired state leaves `running` (scale-down, rolling update, node drain) drops out of that list as
soon as the manager decides it, which is before the node's engine stops its container: it leaves the
rotation at once, as a stop or kill does on one host. Swarm's ingress mesh is not used: it needs IPVS and
hides the client's address; host-mode published ports are what a kernel NAT gateway routes to.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import docker
from docker.types import CancellableStream

from ..labels import LabelKeys, kept_labels, labels_if_map
from ..metrics import Metrics
from ..model import ContainerSnapshot, timestamp_ns
from ..tracker import Change, Relist
from . import Sink
from .docker_api import DOCKER_ERRORS, connect, follow_forever

log = logging.getLogger(__name__)
SOURCE = "swarm"


def node_address(node: dict) -> str:
    """The address a node's published ports are reached at. A manager may report 0.0.0.0 as its Status.Addr:
    then its ManagerStatus.Addr (address:port of the Raft endpoint) says it."""
    address = (node.get("Status") or {}).get("Addr") or ""
    if address in ("", "0.0.0.0"):
        address = ((node.get("ManagerStatus") or {}).get("Addr") or "").rpartition(":")[0]
    return address


def published_ports(task: dict) -> dict[int, int]:
    """Container port -> host port of a task's host-mode TCP publications (listed once per address family)."""
    ports = ((task.get("Status") or {}).get("PortStatus") or {}).get("Ports") or ()
    return {
        int(p["TargetPort"]): int(p["PublishedPort"])
        for p in ports
        if p.get("Protocol", "tcp") == "tcp" and p.get("PublishMode") == "host" and p.get("PublishedPort")
    }


def node_names(nodes: Iterable[dict]) -> dict[str, str]:
    """Node ID -> the name status, logs and metrics use: its host name, or its address where several nodes
    share one host name (engines in network namespaces of one machine, cloned VMs)."""
    nodes = list(nodes)
    hostnames = Counter(_hostname(n) for n in nodes)
    return {n["ID"]: _hostname(n) if hostnames[_hostname(n)] == 1 else node_address(n) for n in nodes}


def _hostname(node: dict) -> str:
    return (node.get("Description") or {}).get("Hostname") or node.get("ID", "")[:12]


def task_snapshot(
    task: dict, service: dict, node: dict | None, node_name: str = "", keys: LabelKeys | None = None
) -> ContainerSnapshot:
    """A pure function: one task of a labelled service as a backend candidate. It serves while its state is
    `running`, it is meant to run, and its node is up. With `keys`, only the labels tcprouter reads are kept."""
    spec = service.get("Spec") or {}
    status = task.get("Status") or {}
    node = node or {}
    node_name = node_name or _hostname(node) or task.get("NodeID", "")[:12]
    slot = task.get("Slot") or task.get("NodeID", "")[:12]  # global services have no slot
    node_ready = (node.get("Status") or {}).get("State") == "ready"
    return ContainerSnapshot(
        id=task["ID"],
        name=f"{spec.get('Name', service.get('ID', '')[:12])}.{slot}",
        created=timestamp_ns(task.get("CreatedAt")),
        labels=kept_labels(spec.get("Labels"), keys),
        running=status.get("State") == "running" and task.get("DesiredState") == "running" and node_ready,
        started_at=timestamp_ns(status.get("Timestamp")),
        node=node_name,
        host_address=node_address(node),
        published_tcp_ports=published_ports(task),
    )


def swarm_snapshots(api: docker.APIClient, keys: LabelKeys) -> list[ContainerSnapshot]:
    """The tasks meant to run of every service labelled `<prefix>.port`: three list calls to the manager."""
    services = {s["ID"]: s for s in api.services(filters={"label": f"{keys.prefix}.port"})}
    if not services:
        return []
    nodes = {n["ID"]: n for n in api.nodes()}
    names = node_names(nodes.values())
    return [
        read_task(
            task,
            services[task["ServiceID"]],
            nodes.get(task.get("NodeID", "")),
            names.get(task.get("NodeID", ""), ""),
            keys,
        )
        for task in api.tasks(filters={"desired-state": "running"})
        if task.get("ServiceID") in services
    ]


def read_task(
    task: dict, service: dict, node: dict | None, node_name: str, keys: LabelKeys | None = None
) -> ContainerSnapshot:
    """task_snapshot, or, for data of an unexpected shape, a snapshot that says why it is rejected."""
    try:
        return task_snapshot(task, service, node, node_name, keys)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        return ContainerSnapshot(
            id=str(task.get("ID", "")),
            name=str(task.get("ID", ""))[:12],
            created=0,
            labels=kept_labels(labels_if_map((service.get("Spec") or {}).get("Labels")), keys),
            running=True,
            malformed=f"the manager's task data has an unexpected shape ({type(error).__name__}: {error})",
        )


def task_changes(
    before: Mapping[str, ContainerSnapshot], after: Mapping[str, ContainerSnapshot], now_ns: int
) -> list[Change]:
    """What changed between two listings (a pure function). A task gone from the list is no longer meant to run:
    it drains now. A task that stops running drains too. A new or changed task is stamped with the time of its
    state change, so that event-to-rules latency counts from the moment it ran."""
    changes = []
    for task_id, snapshot in after.items():
        old = before.get(task_id)
        if old == snapshot:
            continue
        stopped = old is not None and old.running and not snapshot.running
        action = "task running" if snapshot.running else "task stopped" if stopped else "task pending"
        stamp = snapshot.started_at or now_ns
        changes.append(Change(task_id, action, stamp, snapshot=snapshot, drain=stopped, source=SOURCE))
    for task_id in before.keys() - after.keys():
        changes.append(Change(task_id, "task shutdown", now_ns, gone=True, drain=True, source=SOURCE))
    return changes


@dataclass
class _Session:
    api: docker.APIClient
    stream: CancellableStream
    tasks: dict[str, ContainerSnapshot]
    poke: threading.Event = field(default_factory=threading.Event)  # a service or node event arrived
    lost: threading.Event = field(default_factory=threading.Event)  # the event stream ended


class SwarmProvider:
    """Follows a Swarm manager (`url`): service and node events, and a task listing at least every
    `poll_interval` seconds."""

    remote = True
    source = SOURCE

    def __init__(
        self, url: str | None, keys: LabelKeys, metrics: Metrics, timeout: float = 10.0, poll_interval: float = 0.5
    ) -> None:
        self.url = url
        self.keys = keys
        self.metrics = metrics
        self.timeout = timeout
        self.poll_interval = poll_interval
        metrics.docker_connected.labels(SOURCE)
        metrics.docker_reconnects.labels(SOURCE)

    def list(self) -> list[ContainerSnapshot]:
        return swarm_snapshots(connect(self.url, self.timeout), self.keys)

    def follow(self, sink: Sink, stopping: threading.Event) -> None:
        def start() -> _Session:
            api = connect(self.url, self.timeout)
            stream = api.events(decode=True, filters={"type": ["service", "node"]})  # subscribe before listing
            try:
                tasks = {s.id: s for s in swarm_snapshots(api, self.keys)}
            except BaseException:
                stream.close()
                raise
            sink(Relist(tuple(tasks.values()), source=SOURCE))
            log.info("swarm: manager connected: %d tasks of labelled services", len(tasks))
            session = _Session(api, stream, tasks)
            threading.Thread(target=self._read_events, args=(session,), name="swarm events", daemon=True).start()
            return session

        def follow(session: _Session) -> None:
            while not stopping.is_set():
                session.poke.wait(self.poll_interval)
                session.poke.clear()
                if stopping.is_set():
                    return
                if session.lost.is_set():
                    raise ConnectionError("the Swarm manager's event stream ended")
                current = {s.id: s for s in swarm_snapshots(session.api, self.keys)}
                for change in task_changes(session.tasks, current, time.time_ns()):
                    sink(change)
                session.tasks = current

        def close(session: _Session) -> None:
            session.stream.close()

        follow_forever(SOURCE, stopping, self.metrics, start, follow, close)

    def _read_events(self, session: _Session) -> None:
        """Wake the poller on every service or node event; flag the session lost when the stream ends."""
        try:
            for event in session.stream:
                self.metrics.docker_events.labels(f"{event.get('Type')} {event.get('Action')}").inc()
                session.poke.set()
        except DOCKER_ERRORS:
            pass
        finally:
            session.lost.set()
            session.poke.set()
