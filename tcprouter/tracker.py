"""The change tracker: what the providers reported, folded into one view of every backend candidate.

Providers send three kinds of item: a Change (one container or task), a Relist (everything one source
holds, after it (re)connected) and a Reachability verdict (from the prober). The tracker keeps the
latest snapshot of each container per source, which runs of which containers are draining, and which
remote endpoints failed their probes; the sync reads its view.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .labels import DEFAULT_UDP_PREFIX, has_port_label
from .model import ContainerSnapshot

Endpoint = tuple[str, int]  # (address, port) as the DNAT rule sends to it
LOCAL = "local"  # the source name of this host's engine


@dataclass(frozen=True)
class Change:
    """Something happened to one container or task. `snapshot` is its fresh state (None: not inspected, or gone)."""

    container_id: str
    action: str  # the Docker event ("start", "kill"...) or the Swarm task transition ("task running"...)
    time_ns: int  # when it happened (the event's or the task state's own timestamp), for event-to-rules latency
    snapshot: ContainerSnapshot | None = None
    gone: bool = False  # the container no longer exists (or the task is no longer meant to run)
    drain: bool = False  # leave the rotation now, before the process exits
    source: str = LOCAL

    @property
    def urgent(self) -> bool:
        """Written at once, without waiting for more events to batch with."""
        return self.drain


@dataclass(frozen=True)
class Relist:
    """The full list of one source's labelled containers, after (re)connecting to it."""

    snapshots: tuple[ContainerSnapshot, ...]
    source: str = LOCAL
    urgent = False


@dataclass(frozen=True)
class Reachability:
    """The prober's verdict: the remote endpoints that are out of the rotation, and what just changed."""

    down: frozenset[Endpoint]
    flipped: tuple[Endpoint, ...]  # endpoints whose state changed with this verdict
    time_ns: int
    urgent = True


Item = Change | Relist | Reachability


class ChangeTracker:
    """Folds items into the current view. Not thread-safe: the runner's Inbox calls it under its lock."""

    def __init__(
        self, prefix: str, sources: Iterable[str] = (LOCAL,), clock=time.monotonic, udp_prefix: str = DEFAULT_UDP_PREFIX
    ) -> None:
        self.prefix = prefix
        self.udp_prefix = udp_prefix
        self.expected = frozenset(sources)
        # Each source's containers by id (not one map and each id's source: a map of 100,000 ids is ~4 MB).
        self.sources: dict[str, dict[str, ContainerSnapshot]] = {}
        self.draining: dict[str, int] = {}  # container id -> start time of the run being drained
        self.unreachable: frozenset[Endpoint] = frozenset()
        self.listed: set[str] = set()
        self.dirty: set[str] | None = None  # containers changed since take_changes (None: any might have)
        self._clock = clock
        self._first_listed: float | None = None

    def apply(self, item: Item) -> int:
        """Fold one item in; returns the time it happened (ns since the epoch; 0 if not an event).

        Draining is tied to the run of the container that was stopped (its start time): a fresh snapshot of
        the same run keeps it out of the rotation, a snapshot of a later run (restarted, perhaps while
        tcprouter could not see Docker) brings it back.
        """
        stamp = 0
        if isinstance(item, Relist):
            self.sources[item.source] = {}
            for snapshot in item.snapshots:
                self._remember(snapshot, item.source)
            self.listed.add(item.source)
            self.dirty = None
            if self._first_listed is None:
                self._first_listed = self._clock()
        elif isinstance(item, Reachability):
            self.unreachable = item.down
            stamp = item.time_ns
        else:
            if self.dirty is not None:
                self.dirty.add(item.container_id)
            if item.drain:
                known = self.get(item.container_id)
                self.draining[item.container_id] = known.started_at if known else 0
            if item.gone:
                self._forget(item.container_id)
            elif item.snapshot is not None:
                if has_port_label(item.snapshot.labels, self.prefix, self.udp_prefix):
                    self._remember(item.snapshot, item.source)
                else:
                    self._forget(item.container_id)
            stamp = item.time_ns
        self.draining = {
            cid: run
            for cid, run in self.draining.items()
            if (known := self.get(cid)) is not None and known.started_at in (run, 0)
        }
        return stamp

    def get(self, container_id: str) -> ContainerSnapshot | None:
        """The container's latest snapshot, whichever source has it."""
        for held in self.sources.values():
            if container_id in held:
                return held[container_id]
        return None

    def _remember(self, snapshot: ContainerSnapshot, source: str) -> None:
        self._forget(snapshot.id)  # a container is one source's
        self.sources.setdefault(source, {})[snapshot.id] = snapshot

    def _forget(self, container_id: str) -> None:
        for held in self.sources.values():
            held.pop(container_id, None)

    def ready(self, grace: float = 10.0) -> bool:
        """Whether the view may be written: every source listed, or `grace` seconds since the first was.

        Never before any list: an empty view would wipe the rules in force. A source that stays away past the
        grace period must not hold back the others; its backends in the kernel are then dropped until it lists.
        """
        if self.listed >= self.expected:
            return True
        return self._first_listed is not None and self._clock() - self._first_listed >= grace

    def missing(self) -> list[str]:
        return sorted(self.expected - self.listed)

    def view(self) -> list[ContainerSnapshot]:
        """Every known container, the draining ones marked so."""
        view = [snapshot for held in self.sources.values() for snapshot in held.values()]
        if not self.draining:
            return view
        return [self._marked(c) for c in view]

    def _marked(self, container: ContainerSnapshot) -> ContainerSnapshot:
        return dataclasses.replace(container, draining=True) if container.id in self.draining else container

    def take_changes(self) -> dict[str, ContainerSnapshot | None] | None:
        """The containers changed since the last call, as view() shows them (None: gone); None if any might
        have (a relist, or no call yet). A sync that uses them leaves the rest of the view alone."""
        dirty, self.dirty = self.dirty, set()
        if dirty is None:
            return None
        return {cid: self._marked(known) if (known := self.get(cid)) is not None else None for cid in dirty}


def causes(batch: Iterable[Item]) -> Mapping[str | Endpoint, str]:
    """What each backend change in a batch is due to, keyed by container id or, for probes, by endpoint."""
    found: dict[str | Endpoint, str] = {}
    for item in batch:
        if isinstance(item, Change):
            found[item.container_id] = item.action
        elif isinstance(item, Reachability):
            found.update((endpoint, "probe") for endpoint in item.flipped)
    return found
