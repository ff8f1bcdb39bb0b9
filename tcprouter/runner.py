"""The sync runner: when to sync, and how much. It owns the queue the providers and the prober feed.

Items are folded into the change tracker as they arrive (kube-proxy's change tracker merges pending changes per
key the same way): what waits for the next sync is one record per container, task or probed endpoint, never one
per event, so a storm of events costs memory in proportion to the containers it is about. A change is batched
with whatever follows within `settle` of the last one, up to `max_delay` (docker-gen's min/max wait), so a burst
of 50 starts is one write; an urgent item (a stop, a kill, a task leaving, a probe verdict) ends the batch at
once, so a dying backend leaves the rotation without waiting. Timers, on an injectable clock: a cheap drift check
every `check_interval`, a full resync every `resync_interval` and one second after a failed write (kube-proxy's
bounded-frequency runner plays the same part).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from . import heap
from .metrics import Metrics
from .model import ContainerSnapshot
from .sync import Syncer
from .tracker import Change, ChangeTracker, Endpoint, Item, causes

log = logging.getLogger(__name__)
Clock = Callable[[], float]
MAX_ERRORS = 10  # unexpected errors in a row after which the sync loop gives up


@dataclass(frozen=True)
class Timing:
    resync_interval: float = 60.0
    check_interval: float = 1.0
    settle: float = 0.01  # wait this long for more events after one arrives...
    max_delay: float = 0.1  # ...but never delay a write longer than this
    retry_after: float = 1.0  # a full resync this soon after a failed one
    sources_grace: float = 10.0  # write without a source that has not listed this long after the first did


@dataclass
class Schedule:
    """The timers, as plain numbers on the runner's clock (a pure object: tested without waiting)."""

    timing: Timing
    next_resync: float = 0.0
    next_check: float = 0.0

    def timeout(self, now: float) -> float:
        return max(0.0, min(self.next_resync, self.next_check) - now)

    def resync_due(self, now: float) -> bool:
        return now >= self.next_resync

    def check_due(self, now: float) -> bool:
        return now >= self.next_check

    def checked(self, now: float) -> None:
        self.next_check = now + self.timing.check_interval

    def resynced(self, now: float, ok: bool) -> None:
        self.next_resync = now + (self.timing.resync_interval if ok else self.timing.retry_after)


@dataclass(frozen=True)
class Batch:
    """What one turn of the loop takes from the inbox: the tracker's view at that moment and what the items folded
    in since the last turn were about."""

    items: int  # how many items were folded in (0: a timer woke the loop)
    view: Sequence[ContainerSnapshot] | None = ()  # None: not taken (`changed` says what a partial sync needs)
    unreachable: frozenset[Endpoint] = frozenset()
    causes: Mapping[str | Endpoint, str] = field(default_factory=dict)  # key -> its latest cause
    stamps: Sequence[int] = ()  # per key, the time of its earliest event not yet written (ns since the epoch)
    ready: bool = False  # whether the view may be written (tracker.ready)
    missing: Sequence[str] = ()  # the sources not listed yet
    changed: Mapping[str, ContainerSnapshot | None] | None = None  # tracker.take_changes: None, any container


class Inbox:
    """The thread-safe sink of the providers and the prober, in front of the tracker.

    An item is folded into the tracker as soon as it arrives, in arrival order, so the view is exactly what
    applying every item in order gives (a stop followed by a health event of the same run stays drained); what
    the next sync still owes is kept per key (container, task or endpoint): its latest cause and its earliest
    event time. Memory is bounded by the number of distinct keys, however many events arrive.
    """

    def __init__(self, tracker: ChangeTracker, grace: float) -> None:
        self.tracker = tracker
        self.grace = grace
        self._lock = threading.Condition()
        self._causes: dict[str | Endpoint, str] = {}
        self._stamps: dict[str | Endpoint, int] = {}
        self._items = 0  # folded in since the last take
        self._urgent = False
        self._woken = False

    def put(self, item: Item) -> None:
        with self._lock:
            stamp = self.tracker.apply(item)
            self._causes.update(causes([item]))
            if stamp:
                self._stamps.setdefault(_key(item), stamp)
            self._items += 1
            self._urgent = self._urgent or item.urgent
            self._lock.notify_all()

    def pending(self) -> int:
        """How many records wait for the next sync (one per key)."""
        with self._lock:
            return len(self._causes.keys() | self._stamps.keys())

    def ready(self) -> bool:
        with self._lock:
            return self.tracker.ready(self.grace)

    def view(self) -> list[ContainerSnapshot]:
        """The tracker's view now."""
        with self._lock:
            return self.tracker.view()

    def wake(self) -> None:
        """End a wait at once (to stop)."""
        with self._lock:
            self._woken = True
            self._lock.notify_all()

    def take(self, timeout: float, settle: float, max_delay: float, with_view: bool = True) -> Batch:
        """Wait up to `timeout` for an item; then for more, until `settle` passes without one or `max_delay` since
        the first; an urgent item ends the wait at once. Returns the view and what the items were about; without
        `with_view`, the view only if the changes are not known (a copy of every container: 100,000 at 10,000
        frontends, where a partial sync needs the changed ones alone)."""
        with self._lock:
            self._lock.wait_for(lambda: self._items or self._woken, timeout)
            deadline = time.monotonic() + max_delay
            while self._items and not (self._urgent or self._woken):
                seen, left = self._items, deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(min(settle, left))  # put() and wake() notify
                if self._items == seen:
                    break  # `settle` passed without a new item
            changed = self.tracker.take_changes()
            batch = Batch(
                items=self._items,
                view=self.tracker.view() if with_view or changed is None else None,
                unreachable=self.tracker.unreachable,
                causes=self._causes,
                stamps=tuple(self._stamps.values()),
                ready=self.tracker.ready(self.grace),
                missing=self.tracker.missing(),
                changed=changed,
            )
            self._causes, self._stamps, self._items, self._urgent = {}, {}, 0, False
            return batch


def freeze_heap() -> None:
    """After the first sync: what is alive then (the modules, and every container's snapshot and backend: 100,000 of
    each at 10,000 frontends) is left out of the cyclic garbage collector's full collections, which would otherwise
    walk it all (~100 ms, during which no thread runs: a scrape, a sync waits) every few hundred thousand
    allocations. Those objects are still freed when no longer referenced; only one that later ends up in a garbage
    cycle would stay (tcprouter's data has no cycles)."""
    gc.freeze()


def _key(item: Item) -> str:
    """What an item with an event time is about: a container or task, or the prober's verdicts."""
    return item.container_id if isinstance(item, Change) else "reachability"


class SyncRunner:
    def __init__(
        self,
        tracker: ChangeTracker,
        syncer: Syncer,
        metrics: Metrics,
        timing: Timing = Timing(),
        clock: Clock = time.monotonic,
        on_synced: Callable[[Syncer], None] | None = None,
    ) -> None:
        self.tracker = tracker
        self.syncer = syncer
        self.metrics = metrics
        self.timing = timing
        self.clock = clock
        self.on_synced = on_synced
        self.schedule = Schedule(timing)
        self.inbox = Inbox(tracker, timing.sources_grace)
        self.stopping = threading.Event()
        self.ready = threading.Event()  # set after the first successful sync
        self.failed: str | None = None  # why the daemon cannot go on (it then exits non-zero)
        self.heartbeat = clock()  # when the loop last turned (for /healthz)
        self.last_synced = 0.0  # wall time of the last successful sync (for /healthz)

    def submit(self, item: Item) -> None:
        """The sink every provider and the prober write to (thread-safe)."""
        self.inbox.put(item)

    def run(self) -> None:
        """Sync until `stop()`. Never raises for Docker or iptables failures. An unexpected error is logged with
        its traceback, counted, and followed by a full resync; after `MAX_ERRORS` in a row the loop gives up and
        sets `failed`, so that the process exits non-zero and its restart policy restarts it."""
        need_full, errors = True, 0
        while not self.stopping.is_set():
            self.heartbeat = self.clock()
            try:
                need_full = self._step(need_full)
                errors = 0
            except Exception:
                errors += 1
                self.metrics.internal_errors.labels("sync").inc()
                log.exception("sync loop: unexpected error (%d in a row); the rules in force stay", errors)
                if errors >= MAX_ERRORS:
                    self.fail(f"the sync loop failed {errors} times in a row")
                    return
                need_full = True
                self.stopping.wait(self.timing.retry_after)

    def _step(self, need_full: bool) -> bool:
        """One turn of the loop: wait for items or a timer, sync if needed; whether a full sync is still owed."""
        ready = self.inbox.ready()
        timeout = self.schedule.timeout(self.clock()) if ready else self.timing.check_interval
        batch = self.inbox.take(timeout, self.timing.settle, self.timing.max_delay, with_view=need_full)
        if self.stopping.is_set():
            return need_full  # after SIGTERM nothing more is written: the rules in force stay as they are
        if not batch.ready:
            return need_full  # never write before the sources' state is known: an empty state would wipe live rules
        if not ready and batch.missing:
            log.warning("writing without %s, which could not be listed yet", ", ".join(batch.missing))
        now = self.clock()
        if self.schedule.resync_due(now):
            need_full = True
        elif self.schedule.check_due(now) and not need_full:
            need_full = self.syncer.drifted()
        if self.schedule.check_due(now):
            self.schedule.checked(now)
        if not (batch.items or need_full):
            return need_full
        view = batch.view
        if view is None:  # a full sync found due since the take: the view now (items folded in since come again)
            view = self.inbox.view() if need_full else ()
        ok = self.syncer.sync(view, batch.unreachable, need_full, batch.causes, batch.changed)
        if need_full:
            self.schedule.resynced(now, ok)
            heap.give_back()  # what the full sync's diff or load allocated (tens of MB at 10,000 frontends)
        if ok:
            written = time.time_ns()
            for stamp in batch.stamps:
                self.metrics.event_to_rules.observe(max(0, written - stamp) / 1e9)
            self.last_synced = time.time()
            if not self.ready.is_set():
                freeze_heap()
            self.ready.set()
            if self.on_synced:
                self.on_synced(self.syncer)
        return not ok

    def fail(self, reason: str) -> None:
        """Stop with an error: the process exits non-zero rather than live on without working."""
        log.critical("%s: exiting so that the restart policy restarts tcprouter", reason)
        self.failed = reason
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        self.inbox.wake()
