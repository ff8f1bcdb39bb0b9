"""Reachability of remote backends. A host can lose power, a link can be cut, an engine can hang: no event
says so, and the manager's heartbeat timeout is long. The gateway checks each remote endpoint itself with a
TCP connect, every `interval` seconds, all at once: an endpoint is out after `fall` failures in a row and
back after `rise` successes in a row (HAProxy's terms). New endpoints start in."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .metrics import Lingering, Metrics
from .tracker import Endpoint, Reachability

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbePolicy:
    interval: float = 1.0
    timeout: float = 0.5
    fall: int = 2
    rise: int = 1


@dataclass
class _Record:
    up: bool = True
    streak: int = 0  # consecutive results that disagree with `up`


class ProbeBook:
    """The pure part: results in, the set of endpoints that are out."""

    def __init__(self, policy: ProbePolicy) -> None:
        self.policy = policy
        self.records: dict[Endpoint, _Record] = {}

    def watch(self, endpoints: set[Endpoint]) -> None:
        """Probe exactly these from now on; a new endpoint starts in, a forgotten one loses its record."""
        self.records = {e: self.records.get(e) or _Record() for e in endpoints}

    def record(self, results: Mapping[Endpoint, bool]) -> list[Endpoint]:
        """Fold one round of results in; returns the endpoints whose state flipped."""
        flipped = []
        for endpoint, ok in results.items():
            entry = self.records.get(endpoint)
            if entry is None:
                continue  # forgotten while its probe ran
            entry.streak = 0 if ok == entry.up else entry.streak + 1
            if entry.streak >= (self.policy.rise if ok else self.policy.fall):
                entry.up, entry.streak = ok, 0
                flipped.append(endpoint)
        return flipped

    @property
    def down(self) -> frozenset[Endpoint]:
        return frozenset(e for e, entry in self.records.items() if not entry.up)


def tcp_connect(endpoint: Endpoint, timeout: float) -> bool:
    try:
        with socket.create_connection(endpoint, timeout=timeout):
            return True
    except OSError:
        return False


class Prober:
    """Probes the endpoints it is told to watch; sends a Reachability item to `sink` when one flips."""

    def __init__(
        self,
        sink: Callable[[Reachability], None],
        metrics: Metrics,
        policy: ProbePolicy = ProbePolicy(),
        probe: Callable[[Endpoint, float], bool] = tcp_connect,
    ) -> None:
        self.sink = sink
        self.metrics = metrics
        self.policy = policy
        self.probe = probe
        self.book = ProbeBook(policy)
        self._nodes: dict[Endpoint, str] = {}
        self._gone: Lingering[tuple[str, str]] = Lingering(metrics.grace, metrics.clock)  # counters that left
        self._lock = threading.Lock()

    def watch(self, endpoints: Mapping[Endpoint, str]) -> None:
        """The remote endpoints to probe (endpoint -> node name), after each sync. The up gauge of an endpoint no
        longer routed goes at once (it describes the present); its failure counter stays for the metrics' grace
        period, so that a scrape still sees its final value."""
        with self._lock:
            for labels in set(_labels(self._nodes)) - set(_labels(endpoints)):
                self.metrics.probe_up.remove(*labels)
            self._gone.update(_labels(self._nodes), _labels(endpoints))
            self._nodes = dict(endpoints)
            self.book.watch(set(endpoints))
            for endpoint, node in self._nodes.items():
                self.metrics.probe_up.labels(node, _address(endpoint)).set(endpoint not in self.book.down)
            self._expire()

    def _expire(self) -> None:
        for labels in self._gone.expired():
            self.metrics.probe_failures.remove(*labels)

    def run(self, stopping: threading.Event) -> None:
        with ThreadPoolExecutor(max_workers=64, thread_name_prefix="probe") as pool:
            while not stopping.is_set():
                started = time.monotonic()
                with self._lock:
                    endpoints = list(self._nodes)
                results = dict(zip(endpoints, pool.map(self._probe, endpoints), strict=True))
                self._fold(results)
                stopping.wait(max(0.0, self.policy.interval - (time.monotonic() - started)))

    def _probe(self, endpoint: Endpoint) -> bool:
        return self.probe(endpoint, self.policy.timeout)

    def _fold(self, results: Mapping[Endpoint, bool]) -> None:
        with self._lock:
            for endpoint, ok in results.items():
                node = self._nodes.get(endpoint)
                if node is not None and not ok:
                    self.metrics.probe_failures.labels(node, _address(endpoint)).inc()
            flipped = self.book.record(results)
            down = self.book.down
            self._expire()
            for endpoint in flipped:
                node = self._nodes.get(endpoint, "")
                self.metrics.probe_up.labels(node, _address(endpoint)).set(endpoint not in down)
                if endpoint in down:
                    log.warning(
                        "backend %s on node %s failed %d probes in a row: out of the rotation",
                        _address(endpoint),
                        node,
                        self.policy.fall,
                        extra={"endpoint": _address(endpoint), "node": node, "probe": "down"},
                    )
                else:
                    log.info(
                        "backend %s on node %s answers probes again: back in the rotation",
                        _address(endpoint),
                        node,
                        extra={"endpoint": _address(endpoint), "node": node, "probe": "up"},
                    )
        if flipped:
            self.sink(Reachability(down, tuple(flipped), time.time_ns()))


def _labels(endpoints: Mapping[Endpoint, str]) -> list[tuple[str, str]]:
    """The (node, address) label values of each endpoint's series."""
    return [(node, _address(endpoint)) for endpoint, node in endpoints.items()]


def _address(endpoint: Endpoint) -> str:
    return f"{endpoint[0]}:{endpoint[1]}"
