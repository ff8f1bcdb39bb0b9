"""The control loop: Docker changes in, kernel rules out.

Two threads. The watcher holds the Docker connection: it subscribes to events, lists the labelled
containers, and turns every relevant event into a Change on a queue; when Docker goes away it
reconnects with exponential backoff and lists again. The reconciler drains the queue, coalescing a
burst into one write, and keeps the kernel equal to the desired state: partial syncs diff against
what it last wrote; full syncs (at start, periodically, on drift, after a failure) diff against what
the kernel really holds. Rules are never flushed first and stay in place when tcprouter stops.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import docker
import requests
from docker.types import CancellableStream
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from . import discovery
from .compiler import FRONTEND_CHAIN_PREFIX, Options, RuleSet, Tables, compile_rules
from .diff import believed_tables, hook_in_place, owned, restore_script
from .labels import desired_state
from .metrics import Metrics
from .model import ContainerSnapshot, DesiredState
from .netfilter import NetfilterError, Writer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    prefix: str = "tcp"
    options: Options = field(default_factory=Options)
    docker_url: str | None = None
    docker_timeout: float = 10.0
    resync_interval: float = 60.0
    check_interval: float = 1.0
    settle: float = 0.01  # wait this long for more events after one arrives...
    max_delay: float = 0.1  # ...but never delay a write longer than this


class Reconciler:
    def __init__(self, settings: Settings, iptables: Writer, metrics: Metrics) -> None:
        self.settings = settings
        self.iptables = iptables
        self.metrics = metrics
        self.changes: queue.Queue[discovery.Change | discovery.Relist] = queue.Queue()
        self.containers: dict[str, ContainerSnapshot] = {}
        self.draining: dict[str, str] = {}  # container id -> start time of the run being drained
        self.applied: Tables | None = None  # what we believe the kernel holds; None: read it first
        self.state = DesiredState(frontends={})
        self.listeners: dict[int, str] = {}  # host TCP listeners (port -> address), as last scanned
        self.stopping = threading.Event()
        self.listed = False  # a full list of Docker's containers has arrived
        self.ready = threading.Event()  # set after the first successful sync from that list

    # ---- the reconciler thread -------------------------------------------------------------

    def run(self) -> None:
        """Reconcile until `stop()`. Never raises for Docker or iptables failures."""
        next_resync = next_check = 0.0
        need_full = True
        while not self.stopping.is_set():
            timeout = max(0.0, min(next_resync, next_check) - time.monotonic())
            batch = self._next_batch(timeout if self.listed else self.settings.check_interval)
            if self.stopping.is_set():
                break  # after SIGTERM nothing more is written: the rules in force stay as they are
            event_times = [self._apply(item) for item in batch]
            if not self.listed:
                continue  # never write before Docker's state is known: an empty state would wipe live rules
            now = time.monotonic()
            if now >= next_resync:
                need_full = True
            elif now >= next_check and not need_full:
                need_full = self._drifted()
            if now >= next_check:
                next_check = now + self.settings.check_interval
            if not (batch or need_full):
                continue
            causes = {i.container_id: i.action for i in batch if isinstance(i, discovery.Change)}
            ok = self.sync(full=need_full, causes=causes)
            if need_full:
                next_resync = now + (self.settings.resync_interval if ok else 1.0)
            need_full = not ok
            if ok:
                written = time.time_ns()
                for stamp in filter(None, event_times):
                    self.metrics.event_to_rules.observe(max(0, written - stamp) / 1e9)
                self.ready.set()

    def _next_batch(self, timeout: float) -> list[discovery.Change | discovery.Relist]:
        """One change, then whatever follows within `settle` of the last one, up to `max_delay`; a stop or a
        kill ends the batch at once, so a dying backend leaves the rotation without waiting for the window."""
        try:
            batch = [self.changes.get(timeout=timeout)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.settings.max_delay
        while not getattr(batch[-1], "drain", False) and (left := deadline - time.monotonic()) > 0:
            try:
                batch.append(self.changes.get(timeout=min(self.settings.settle, left)))
            except queue.Empty:
                break
        return batch

    def _apply(self, item: discovery.Change | discovery.Relist) -> int:
        """Fold one change into the container view; returns the event time to measure latency from.

        Draining is tied to the run of the container that was stopped (its start time): a fresh snapshot of
        the same run keeps it out of the rotation, a snapshot of a later run (restarted, perhaps while
        tcprouter could not see Docker) brings it back.
        """
        if isinstance(item, discovery.Relist):
            self.containers = {s.id: s for s in item.snapshots}
            self.listed = True
        else:
            self.metrics.docker_events.labels(item.action).inc()
            if item.drain:
                known = self.containers.get(item.container_id)
                self.draining[item.container_id] = known.started_at if known else ""
            if item.gone:
                self.containers.pop(item.container_id, None)
            elif item.snapshot is not None:
                if f"{self.settings.prefix}.port" in item.snapshot.labels:
                    self.containers[item.container_id] = item.snapshot
                else:
                    self.containers.pop(item.container_id, None)
        self.draining = {
            cid: run
            for cid, run in self.draining.items()
            if cid in self.containers and self.containers[cid].started_at in (run, "")
        }
        return 0 if isinstance(item, discovery.Relist) else item.time_ns

    def _desired(self, full: bool) -> DesiredState:
        views = [
            dataclasses.replace(c, draining=True) if c.id in self.draining else c for c in self.containers.values()
        ]
        state = desired_state(views, self.settings.prefix, self.listeners)
        if full or set(state.frontends) - set(self.state.frontends):
            # The listener scan reads every socket of the host (TIME_WAIT included): only at full syncs
            # and when a frontend port appears, not on every event.
            self.listeners = discovery.host_tcp_listeners()
            state = desired_state(views, self.settings.prefix, self.listeners)
        return state

    def sync(self, full: bool, causes: Mapping[str, str] | None = None) -> bool:
        """Write the difference between the desired rules and the kernel (full) or our last write."""
        kind = "full" if full else "partial"
        state = self._desired(full)
        started = time.perf_counter()
        try:
            for attempt in Retrying(
                stop=stop_after_attempt(3),
                wait=wait_exponential(multiplier=0.05, max=1),
                retry=retry_if_exception_type(NetfilterError),
                before_sleep=self._log_retry,
                reraise=True,
            ):
                with attempt:
                    rules = self._write(state, full=full or attempt.retry_state.attempt_number > 1)
        except NetfilterError as error:
            self.metrics.sync_failures.inc()
            self.applied = None
            log.error("sync failed, the rules in force stay as they were: %s", error)
            return False
        self.metrics.sync_duration.labels(kind).observe(time.perf_counter() - started)
        self.metrics.last_sync.set_to_current_time()
        self._log_changes(self.state, state, causes or {})
        self.state = state
        self.metrics.state.publish(state)
        log.debug("%s sync: %d owned rules", kind, rules.rule_count())
        return True

    def _write(self, state: DesiredState, full: bool) -> RuleSet:
        current = self.iptables.read()[0] if full or self.applied is None else self.applied
        parent = "DOCKER-USER" if "DOCKER-USER" in current.get("filter", {}) else "FORWARD"
        rules = compile_rules(state, dataclasses.replace(self.settings.options, forward_parent=parent))
        script = restore_script(current, rules)
        if script:
            self.iptables.restore(script)
        self.applied = believed_tables(rules)
        return rules

    @staticmethod
    def _log_retry(retry_state: RetryCallState) -> None:
        log.warning(
            "rule write failed (attempt %d), retrying from the kernel's state: %s",
            retry_state.attempt_number,
            retry_state.outcome.exception() if retry_state.outcome else "",
        )

    def _drifted(self) -> bool:
        """Cheap check of the chains every flow crosses; a per-frontend edit waits for the full resync."""
        assert self.applied is not None
        try:
            for table, chains in self.applied.items():
                for chain, rules in chains.items():
                    if chain.startswith(FRONTEND_CHAIN_PREFIX):
                        continue
                    found = self.iptables.list_chain(table, chain)
                    in_place = found == rules if owned(chain) else found is not None and hook_in_place(found, rules[0])
                    if not in_place:
                        log.warning("drift: %s chain %s was changed by someone else; resyncing", table, chain)
                        self.metrics.drift_repairs.inc()
                        return True
        except NetfilterError as error:
            log.warning("drift check failed: %s", error)
            return True
        return False

    @staticmethod
    def _log_changes(before: DesiredState, after: DesiredState, causes: Mapping[str, str]) -> None:
        """One line per backend that joined or left, with the Docker event that caused it."""
        for port in sorted(set(before.frontends) | set(after.frontends)):
            old = set(before.frontends[port].backends) if port in before.frontends else set()
            new = set(after.frontends[port].backends) if port in after.frontends else set()
            for sign, moved in (("+", new - old), ("-", old - new)):
                for b in sorted(moved, key=lambda b: b.name):
                    cause = causes.get(b.container_id, "resync")
                    log.info(
                        "frontend %d: %sbackend %s %s:%d (%s)",
                        port,
                        sign,
                        b.name,
                        b.ip,
                        b.port,
                        cause,
                        extra={"frontend": port, "backend": b.name, "change": sign, "cause": cause},
                    )
        for rejection in set(after.rejections) - set(before.rejections):
            log.warning("%s", rejection, extra={"container": rejection.name, "reason": rejection.reason})
        for warning in set(after.warnings) - set(before.warnings):
            log.warning("%s", warning)

    def stop(self) -> None:
        self.stopping.set()
        self.changes.put(discovery.Relist(()))  # wake the loop; it stops before applying anything

    # ---- the watcher thread ----------------------------------------------------------------

    def watch(self) -> None:
        """Follow Docker until `stop()`: connect and list with backoff, then stream; never raises.

        The backoff restarts after every stream that was healthy, so an outage hours later starts
        again from a short wait.
        """
        while not self.stopping.is_set():
            try:
                api, stream, known = self._connect_and_list()
            except _Stopping:
                return
            healthy = threading.Event()
            threading.Thread(target=self._ping, args=(api, stream, healthy), name="docker-ping", daemon=True).start()
            try:
                self._follow(api, stream, known)
            except (docker.errors.DockerException, requests.RequestException, OSError) as error:
                log.warning("Docker event stream lost: %s", error)
            finally:
                healthy.set()
                stream.close()
                self.metrics.docker_connected.set(0)
            if not self.stopping.is_set():
                self.metrics.docker_reconnects.inc()

    def _connect_and_list(self) -> tuple[docker.APIClient, CancellableStream, set[str]]:
        for attempt in Retrying(
            wait=wait_exponential(multiplier=0.2, max=3),  # short: routes must follow Docker soon after it returns
            retry=retry_if_exception_type((docker.errors.DockerException, requests.RequestException, OSError)),
            before_sleep=lambda s: log.warning(
                "Docker unreachable (%s); retrying in %.1fs",
                s.outcome.exception() if s.outcome else "",
                s.upcoming_sleep,
            ),
        ):
            with attempt:
                if self.stopping.is_set():
                    raise _Stopping
                api = discovery.connect(self.settings.docker_url, self.settings.docker_timeout)
                stream = discovery.open_events(api)  # subscribe first: nothing falls between list and stream
                try:
                    labelled = discovery.list_labelled(api, self.settings.prefix)
                except BaseException:
                    stream.close()
                    raise
                self.changes.put(discovery.Relist(tuple(labelled)))
                self.metrics.docker_connected.set(1)
                log.info("Docker connected: %d labelled containers", len(labelled))
                return api, stream, {s.id for s in labelled}
        raise AssertionError("unreachable: Retrying retries forever")

    def _ping(self, api: docker.APIClient, stream: CancellableStream, done: threading.Event) -> None:
        """Liveness: a daemon that hangs keeps the stream open but silent. If it stops answering pings,
        close the stream so that the watcher reconnects (and relists) instead of waiting forever."""
        while not done.wait(self.settings.docker_timeout):
            try:
                api.ping()
            except (docker.errors.DockerException, requests.RequestException, OSError) as error:
                log.warning("Docker does not answer pings (%s): reopening the connection", error)
                stream.close()
                return

    def _follow(self, api: docker.APIClient, stream: CancellableStream, known: set[str]) -> None:
        for event in stream:
            if self.stopping.is_set():
                return
            change = discovery.to_change(api, event, self.settings.prefix, known)
            if change is None:
                continue
            if change.gone:
                known.discard(change.container_id)
            else:
                known.add(change.container_id)
            self.changes.put(change)
        raise ConnectionError("the Docker event stream ended")


class _Stopping(Exception):
    pass
