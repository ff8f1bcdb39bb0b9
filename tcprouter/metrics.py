"""Prometheus metrics. Event-driven figures are plain instruments; everything that describes the current
state (frontends, backends, rejected containers, rules and connection counts in the kernel) is read at
scrape time from one published snapshot and one `iptables-save -c`, so a scrape never sees a half-updated
state and never holds a lock a sync needs.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .compiler import FRONTEND_CHAIN_PREFIX
from .diff import SavedRule, owned
from .model import DesiredState

log = logging.getLogger(__name__)
_COMMENT = re.compile(r"--comment (\S+)")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

KernelReader = Callable[[], list[tuple[str, SavedRule]]]


def backend_connections(rules: list[tuple[str, SavedRule]]) -> dict[tuple[str, str], int]:
    """New connections per (frontend port, backend name), from the DNAT rules' packet counters.

    Only a connection's first packet traverses the nat table, so packets counted there are connections.
    """
    totals: Tally[tuple[str, str]] = Tally()
    for table, rule in rules:
        if table == "nat" and rule.chain.startswith(FRONTEND_CHAIN_PREFIX) and "-j DNAT" in rule.spec:
            match = _COMMENT.search(rule.spec)
            if match:
                totals[(rule.chain.removeprefix(FRONTEND_CHAIN_PREFIX), match.group(1))] += rule.packets
    return dict(totals)


class StateCollector(Collector):
    """Reads the published desired state and the kernel's owned rules when Prometheus scrapes."""

    def __init__(self, read_kernel: KernelReader) -> None:
        self._read_kernel = read_kernel
        self._state = DesiredState(frontends={})
        # Counters in the kernel restart at 0 when a frontend chain is rewritten; keep them monotonic here.
        self._carried: Tally[tuple[str, str]] = Tally()
        self._last: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def publish(self, state: DesiredState) -> None:
        self._state = state  # one reference swap: a scrape sees the old or the new state, whole

    def connection_totals(self, rules: list[tuple[str, SavedRule]]) -> dict[tuple[str, str], int]:
        with self._lock:
            current = backend_connections(rules)
            for key, value in current.items():
                if value < self._last.get(key, 0):
                    self._carried[key] += self._last[key]
            self._last = current
            return {key: self._carried[key] + value for key, value in current.items()}

    def collect(self) -> Iterator[Metric]:
        state = self._state
        frontends = GaugeMetricFamily("tcprouter_frontends", "Frontends (public ports) declared by labels")
        frontends.add_metric([], len(state.frontends))
        backends = GaugeMetricFamily("tcprouter_backends", "Backends in the rotation", labels=["frontend"])
        for port, frontend in sorted(state.frontends.items()):
            backends.add_metric([str(port)], len(frontend.backends))
        rejected = GaugeMetricFamily(
            "tcprouter_rejected_containers", "Labelled containers left out, by reason", labels=["reason"]
        )
        for reason, count in sorted(Tally(r.reason for r in state.rejections).items()):
            rejected.add_metric([reason], count)
        yield from (frontends, backends, rejected)

        try:
            rules = self._read_kernel()
        except Exception as error:  # a scrape must answer even when iptables does not
            log.warning("metrics: cannot read the kernel rules: %s", error)
            return
        counts = GaugeMetricFamily(
            "tcprouter_rules", "Rules in owned chains, as the kernel holds them", labels=["table", "chain"]
        )
        for (table, chain), count in sorted(Tally((t, r.chain) for t, r in rules if owned(r.chain)).items()):
            counts.add_metric([table, chain], count)
        connections = CounterMetricFamily(
            "tcprouter_backend_connections",
            "New connections sent to each backend (DNAT packet counters)",
            labels=["frontend", "backend"],
        )
        for (port, name), total in sorted(self.connection_totals(rules).items()):
            connections.add_metric([port, name], total)
        yield from (counts, connections)


class Metrics:
    """Every metric tcprouter exports, in a registry of its own."""

    def __init__(self, read_kernel: KernelReader) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.state = StateCollector(read_kernel)
        r.register(self.state)
        self.sync_duration = Histogram(
            "tcprouter_sync_duration_seconds",
            "Time to compute and write the rules",
            ["kind"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.sync_failures = Counter("tcprouter_sync_failures", "Rule writes that failed", registry=r)
        self.last_sync = Gauge(
            "tcprouter_last_sync_timestamp_seconds", "When the rules were last written or verified", registry=r
        )
        self.event_to_rules = Histogram(
            "tcprouter_event_to_rules_seconds",
            "From a Docker event's timestamp to its rules being in the kernel",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.docker_events = Counter("tcprouter_docker_events", "Docker events handled", ["action"], registry=r)
        self.docker_connected = Gauge("tcprouter_docker_connected", "1 while the event stream is open", registry=r)
        self.docker_reconnects = Counter(
            "tcprouter_docker_reconnects", "Times the Docker event stream was reopened", registry=r
        )
        self.drift_repairs = Counter(
            "tcprouter_drift_repairs", "Full resyncs triggered by rules changed behind tcprouter's back", registry=r
        )
        build = Gauge("tcprouter_build_info", "tcprouter version", ["version"], registry=r)
        build.labels(package_version()).set(1)

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)


def package_version() -> str:
    try:
        return version("tcprouter")
    except PackageNotFoundError:
        return "unknown"
