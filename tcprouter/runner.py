"""The sync runner: when to sync, and how much. It owns the queue the providers and the prober feed.

A change is batched with whatever follows within `settle` of the last one, up to `max_delay` (docker-gen's
min/max wait), so a burst of 50 starts is one write; an urgent item (a stop, a kill, a task leaving, a
probe verdict) ends the batch at once, so a dying backend leaves the rotation without waiting. Timers, on
an injectable clock: a cheap drift check every `check_interval`, a full resync every `resync_interval`
and one second after a failed write (kube-proxy's bounded-frequency runner plays the same part).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .metrics import Metrics
from .sync import Syncer
from .tracker import ChangeTracker, Item, Relist, causes

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
        self.queue: queue.Queue[Item] = queue.Queue()
        self.stopping = threading.Event()
        self.ready = threading.Event()  # set after the first successful sync
        self.failed: str | None = None  # why the daemon cannot go on (it then exits non-zero)
        self.heartbeat = clock()  # when the loop last turned (for /healthz)
        self.last_synced = 0.0  # wall time of the last successful sync (for /healthz)

    def submit(self, item: Item) -> None:
        """The sink every provider and the prober write to (thread-safe)."""
        self.queue.put(item)

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
        """One turn of the loop: wait for items or a timer, fold them in, sync if needed; whether a full sync is
        still owed."""
        ready = self.tracker.ready(self.timing.sources_grace)
        batch = self._next_batch(self.schedule.timeout(self.clock()) if ready else self.timing.check_interval)
        if self.stopping.is_set():
            return need_full  # after SIGTERM nothing more is written: the rules in force stay as they are
        event_times = [self.tracker.apply(item) for item in batch]
        if not self.tracker.ready(self.timing.sources_grace):
            return need_full  # never write before the sources' state is known: an empty state would wipe live rules
        if not ready and self.tracker.missing():
            log.warning("writing without %s, which could not be listed yet", ", ".join(self.tracker.missing()))
        now = self.clock()
        if self.schedule.resync_due(now):
            need_full = True
        elif self.schedule.check_due(now) and not need_full:
            need_full = self.syncer.drifted()
        if self.schedule.check_due(now):
            self.schedule.checked(now)
        if not (batch or need_full):
            return need_full
        ok = self.syncer.sync(self.tracker.view(), self.tracker.unreachable, full=need_full, causes=causes(batch))
        if need_full:
            self.schedule.resynced(now, ok)
        if ok:
            written = time.time_ns()
            for stamp in filter(None, event_times):
                self.metrics.event_to_rules.observe(max(0, written - stamp) / 1e9)
            self.last_synced = time.time()
            self.ready.set()
            if self.on_synced:
                self.on_synced(self.syncer)
        return not ok

    def _next_batch(self, timeout: float) -> list[Item]:
        """One item, then whatever follows within `settle` of the last one, up to `max_delay`; an urgent item
        ends the batch at once."""
        try:
            batch = [self.queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        deadline = self.clock() + self.timing.max_delay
        while not batch[-1].urgent and (left := deadline - self.clock()) > 0:
            try:
                batch.append(self.queue.get(timeout=min(self.timing.settle, left)))
            except queue.Empty:
                break
        return batch

    def fail(self, reason: str) -> None:
        """Stop with an error: the process exits non-zero rather than live on without working."""
        log.critical("%s: exiting so that the restart policy restarts tcprouter", reason)
        self.failed = reason
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        self.queue.put(Relist((), source=""))  # wake the loop; it stops before applying anything
