"""Prometheus metrics. Event-driven figures are plain instruments; everything that describes the current
state (frontends, backends, rejected containers, rules and connection counts in the kernel) comes from one
published snapshot and one `iptables-save -c`, so a scrape never sees a half-updated state and never holds a lock
a sync needs. The kernel is read at most once per read interval, whoever scrapes, and the text of that state
(120,000 series at 10,000 frontends x 10) is built then, in the background, not at each scrape.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import socket
import threading
import time
import zlib
from collections import Counter as Tally
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Generic, NamedTuple, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .compiler import Tables, frontend_of, refusal, rule_comment
from .diff import SavedRule, owned
from .model import EMPTY, DesiredState, Family, Protocol
from .netfilter import Flavour, Iptables
from .nftnat_read import Counted, FrontendCounts, by_protocol, frontend_counts

log = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# A scrape gives up on iptables-save after this long (Prometheus' own default scrape timeout is 10 s).
KERNEL_READ_TIMEOUT = 5.0
# The counters of a backend that left (connections, probe failures) stay this long, so that scrapes still see
# their final values (and one back within it continues its count), then leave the exposition: label sets of
# backends long gone do not pile up. Gauges describe the present: a backend's leave with it.
SERIES_GRACE = 300.0
# The daemon reads the kernel's counters at most this often (`iptables-save -c` of 110,000 rules takes seconds).
KERNEL_READ_INTERVAL = 10.0
# The first scrape waits this long at most for the first text (Prometheus' default scrape timeout is 10 s).
FIRST_BUILD_WAIT = 5.0
K = TypeVar("K", bound=Hashable)


class KernelRead(NamedTuple):
    """One read of the kernel: the nat and filter tables (chains and rules) and their rules with packet counters, as
    Iptables.read returns them, and what the slots of tcprouter's nftables tables counted (--nat nftables), a
    frontend at a time (nftnat_read.frontend_counts: it may read them as they are taken)."""

    tables: Tables
    rules: list[tuple[str, SavedRule]]
    slots: Iterable[FrontendCounts] = ()


KernelReader = Callable[[], KernelRead | tuple[Tables, list[tuple[str, SavedRule]]]]


def kernel_reader(
    flavour: Flavour,
    netns: str | None = None,
    timeout: float = KERNEL_READ_TIMEOUT,
    family: Family = Family.IPV4,
    nat_tables: bool = False,
) -> Callable[[], KernelRead]:
    """Reads the tables with counters by a bounded `iptables-save -c` (`ip6tables-save -c` for IPv6); with
    `nat_tables` (--nat nftables), what the slots of tcprouter's nftables tables counted too, over netlink
    (nftnat_read.frontend_counts: ~1 s at 10,000 x 10, where `nft -j list` takes ~19 s)."""
    iptables = Iptables(flavour, netns=netns, timeout=timeout, family=family)

    def read() -> KernelRead:
        tables, rules = iptables.read(counters=True)
        return KernelRead(tables, rules, frontend_counts(family, netns, timeout) if nat_tables else ())

    return read


def backend_connections(
    rules: list[tuple[str, SavedRule]], protocol: Protocol = Protocol.TCP
) -> dict[tuple[str, str], int]:
    """New connections (UDP: flows) per (frontend port, backend name) of the frontends of `protocol`, from the DNAT
    rules' packet counters.

    Only a connection's first packet traverses the nat table, so packets counted there are connections.
    A backend with several rotation slots (a weight) sums them.
    """
    totals: Tally[tuple[str, str]] = Tally()
    ports: dict[str, str | None] = {}  # chain -> its frontend's port, worked out once per chain
    for table, rule in rules:
        if table != "nat" or "-j DNAT" not in rule.spec:
            continue
        if rule.chain not in ports:
            port = _frontend_port(rule.chain, protocol)
            ports[rule.chain] = None if port is None else str(port)
        port_text = ports[rule.chain]
        name = rule_comment(rule.spec) if port_text is not None else None
        if name is not None:
            totals[(port_text, name)] += rule.packets
    return dict(totals)


def refused_connections(rules: list[tuple[str, SavedRule]]) -> Counted:
    """(frontend port, reason) -> the packet count of its REJECT rule (a new connection's first packet each:
    only those are checked), with the digest of the chain it is in (a rewritten chain restarts its counts)."""
    chains = _chain_digests(rules, "filter")
    found = Counted({}, {})
    for table, rule in rules:
        refused = refusal(rule.spec) if table == "filter" else None
        if refused is not None:
            port, reason = str(refused[0]), refused[1]
            found.counts.setdefault(port, {})[reason] = rule.packets
            found.digests[(port, reason)] = chains[rule.chain]  # a frontend's refusals are in two chains: per key
    return found


def _chain_digests(rules: list[tuple[str, SavedRule]], table: str) -> dict[str, int]:
    """chain -> a digest of the rule texts of one table's chains (counters excluded): what tells a rewritten chain
    from the same one between reads, without holding 110,000 rule texts at 10,000 frontends until the next."""
    chains: dict[str, list[str]] = {}
    for in_table, rule in rules:
        if in_table == table:
            chains.setdefault(rule.chain, []).append(rule.spec)
    return {chain: hash(tuple(specs)) for chain, specs in chains.items()}


def _frontend_port(chain: str, protocol: Protocol) -> int | None:
    """The port of a frontend chain of `protocol`; None for any other chain."""
    found = frontend_of(chain)
    return found[1] if found and found[0] is protocol else None


def _frontend_rules(rules: list[tuple[str, SavedRule]]) -> dict[Protocol, list[tuple[str, SavedRule]]]:
    """The rules of each protocol's frontend chains in the nat table: one walk of every rule, where each protocol's
    totals would walk them all again (110,000 rules at 10,000 x 10 with the nat side in iptables)."""
    found: dict[Protocol, list[tuple[str, SavedRule]]] = {protocol: [] for protocol in Protocol}
    protocols: dict[str, Protocol | None] = {}  # chain -> the protocol of its frontend, worked out once per chain
    for table, rule in rules:
        if table != "nat":
            continue
        if rule.chain not in protocols:
            frontend = frontend_of(rule.chain)
            protocols[rule.chain] = frontend[0] if frontend else None
        protocol = protocols[rule.chain]
        if protocol is not None:
            found[protocol].append((table, rule))
    return found


def _frontend_chains(rules: list[tuple[str, SavedRule]], protocol: Protocol) -> dict[str, int]:
    """frontend port -> the digest of its chain of `protocol` (_chain_digests)."""
    chains = _chain_digests(rules, "nat")
    return {
        str(port): digest for chain, digest in chains.items() if (port := _frontend_port(chain, protocol)) is not None
    }


class Lingering(Generic[K]):
    """Label sets that left, each kept `grace` seconds from when it left (on an injectable clock)."""

    def __init__(self, grace: float = SERIES_GRACE, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace = grace
        self.clock = clock
        self._left: dict[K, float] = {}

    def update(self, before: Iterable[K], now_present: Iterable[K]) -> None:
        """Note what left between two sightings; what is present again no longer lingers."""
        present = set(now_present)
        self.left(set(before) - present, present.__contains__)

    def left(self, gone: Iterable[K], present: Callable[[K], bool]) -> None:
        """As update, given what left and what is present (for sightings too large to make sets of)."""
        for key in [key for key in self._left if present(key)]:
            del self._left[key]
        for key in gone:
            self._left.setdefault(key, self.clock())

    def __contains__(self, key: object) -> bool:
        return key in self._left

    def expired(self) -> list[K]:
        """The label sets whose grace is over; they are forgotten."""
        now = self.clock()
        gone = [key for key, since in self._left.items() if now - since >= self.grace]
        for key in gone:
            del self._left[key]
        return gone


class CarriedTotals:
    """Monotonic totals from kernel packet counters, which restart at 0 whenever what holds them is written again
    (restore rewrites a chain only when its content changes; a pool's slots map is declared anew). Each read's counts,
    per (frontend, backend or reason), come with digests, per frontend or per (frontend, key) (`digest_per_key`): a
    count that went down, or whose digest changed, was reset, and what it had counted is carried. A key
    whose counter is gone keeps its total, exported as it was, while `lingering` holds it: back within it, it
    continues from there; after it, its series leaves."""

    def __init__(self, lingering: Lingering[tuple[str, str]], digest_per_key: bool = False) -> None:
        """`digest_per_key`: Counted.digests are kept per (frontend, key), not per frontend."""
        self.lingering, self.digest_per_key = lingering, digest_per_key
        self.carried: Tally[tuple[str, str]] = Tally()
        self._last = Counted({}, {})

    def fold(self, current: Counted) -> Totals:
        """The totals after one more read."""
        counts, digests, last = current.counts, current.digests, self._last
        reset: list[tuple[tuple[str, str], int]] = []
        gone: list[tuple[str, str]] = []
        for port, before in last.counts.items():
            now = counts.get(port, EMPTY)
            rewritten = not self.digest_per_key and digests.get(port) != last.digests.get(port)
            for name, was in before.items():
                count = now.get(name)
                if count is None:
                    gone.append((port, name))
                if (
                    count is None
                    or count < was
                    or rewritten
                    or (self.digest_per_key and digests.get((port, name)) != last.digests.get((port, name)))
                ):
                    reset.append(((port, name), was))
        self.lingering.left(gone, lambda key: key[1] in counts.get(key[0], EMPTY))
        expired = self.lingering.expired()
        carried = self.carried.copy() if reset or expired else self.carried  # the totals given keep theirs
        for key, last in reset:
            carried[key] += last
        for key in expired:
            del carried[key]
        self._last, self.carried = current, carried
        lingering = {
            key: total
            for key, total in carried.items()
            if key in self.lingering and key[1] not in counts.get(key[0], EMPTY)
        }
        return Totals(counts, carried, lingering)


class Totals(Mapping[tuple[str, str], int]):
    """A read's totals by (frontend, key): each counter's count plus what was carried for its key, then the totals
    of the keys that linger without a counter. A view of the read's counts (Counted.counts), not a copy of them
    (100,000 keys at 10,000 x 10: ~5 MB); the counts and carried totals it is given are never changed afterwards."""

    __slots__ = ("_carried", "_counts", "_lingering")

    def __init__(
        self,
        counts: Mapping[str, Mapping[str, int]],
        carried: Mapping[tuple[str, str], int],
        lingering: Mapping[tuple[str, str], int],
    ) -> None:
        self._counts, self._carried, self._lingering = counts, carried, lingering

    def __getitem__(self, key: tuple[str, str]) -> int:
        count = self._counts.get(key[0], EMPTY).get(key[1])
        return self._lingering[key] if count is None else count + self._carried.get(key, 0)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for port, names in self._counts.items():
            for name in names:
                yield port, name
        yield from self._lingering

    def __len__(self) -> int:
        return sum(map(len, self._counts.values())) + len(self._lingering)

    def in_order(self) -> Iterator[tuple[tuple[str, str], int]]:
        """items() sorted by key, a frontend at a time (not a list of 110,000 pairs to sort), without looking each key
        up again."""
        lingering: dict[str, list[str]] = {}
        for port, name in self._lingering:
            lingering.setdefault(port, []).append(name)
        carried = self._carried
        for port in sorted(self._counts.keys() | lingering.keys()):
            counts = self._counts.get(port, EMPTY)
            for name in sorted([*counts, *lingering.get(port, ())]):
                key = (port, name)
                count = counts.get(name)
                yield key, self._lingering[key] if count is None else count + carried.get(key, 0)

    def __repr__(self) -> str:
        return repr(dict(self.items()))


@dataclass(frozen=True)
class Exposition:
    """The state's text as one build made it, from `states` (the published dict it read). Kept gzipped only
    (Prometheus asks for gzip; the plain text of 120,000 series would hold ~15 MB more)."""

    states: Mapping[Family, DesiredState]
    gzipped: bytes

    @property
    def text(self) -> bytes:
        return gzip.decompress(self.gzipped)


def _label_value(value: str) -> str:
    """A label value as the text format writes it: backslash, newline and double quote escaped."""
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


class SeriesFamily(NamedTuple):
    """A metric family of the state's exposition, its series made as they are written: each row is its label values
    (in the order of `labels`) and its value. A text of 110,000 series is written from these without a
    prometheus_client sample (a tuple and a dict) for each; the registry's collect() makes them into Metric families.
    """

    name: str
    documentation: str
    type: str  # "gauge" or "counter"
    labels: tuple[str, ...]
    rows: Iterable[tuple[Sequence[str], float]]

    def metric(self) -> Metric:
        """The family as prometheus_client's (its rows are used up)."""
        kind = GaugeMetricFamily if self.type == "gauge" else CounterMetricFamily
        family = kind(self.name, self.documentation, labels=list(self.labels))
        for values, value in self.rows:
            family.add_metric(list(values), value)
        return family


def exposition_lines(families: Iterable[SeriesFamily]) -> Iterator[str]:
    """What generate_latest writes of these families as Metric families (SeriesFamily.metric), a line at a time
    (tests/test_metrics.py checks the two equal). It does not check and escape every name of every sample, as
    generate_latest does: the names are tcprouter's own, valid Prometheus names."""
    for family in families:
        name = f"{family.name}_total" if family.type == "counter" else family.name  # a counter's series too
        documentation = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        yield f"# HELP {name} {documentation}\n# TYPE {name} {family.type}\n"
        order = sorted(range(len(family.labels)), key=family.labels.__getitem__)  # labels are written sorted
        for values, value in family.rows:
            labels = ",".join(f'{family.labels[i]}="{_label_value(values[i])}"' for i in order)
            yield f"{name}{{{labels}}} {floatToGoString(value)}\n" if labels else f"{name} {floatToGoString(value)}\n"


def exposition_text(families: Iterable[SeriesFamily]) -> bytes:
    return "".join(exposition_lines(families)).encode()


EXPOSITION_BATCH = 4096  # lines gzipped at a time


def exposition_gzipped(families: Iterable[SeriesFamily], level: int = 1) -> bytes:
    """exposition_text gzipped as it is written, EXPOSITION_BATCH lines at a time: the text of 110,000 series is never
    whole in memory, nor are its lines (a build's peak at 10,000 x 10 is ~60 MB lower, BENCHMARKS.md "Seventh
    pass")."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16: with gzip's header and trailer
    lines, parts = exposition_lines(families), []
    while batch := list(itertools.islice(lines, EXPOSITION_BATCH)):
        parts.append(compressor.compress("".join(batch).encode()))
    parts.append(compressor.flush())
    return b"".join(parts)


@dataclass(frozen=True)
class KernelFigures:
    """What one read of the kernel (every family's rules) gives the exposition."""

    rules: dict[tuple[str, str, Family], int]  # (table, owned chain, family) -> its rule count
    # (protocol, family) -> (frontend, backend) -> monotonic total
    connections: dict[tuple[Protocol, Family], Totals]
    refusals: dict[Family, Totals]  # family -> (frontend, reason) -> monotonic total


class StateCollector(Collector):
    """Reads the published desired states (one per address family routed) when Prometheus scrapes, and the kernel's
    owned rules (iptables, and ip6tables with `read_kernel6`) at most once per `interval` (on `clock`): a scrape that
    finds the last read older starts a fresh one in the background (one at a time) and answers at once with the
    last, so its time does not grow with the rules; no scrape waits for a read (the first text is the state's
    alone). With `interval` 0 every scrape reads, and waits."""

    def __init__(
        self,
        read_kernel: KernelReader,
        lingering: Lingering[tuple[str, str]] | None = None,
        interval: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        read_kernel6: KernelReader | None = None,
    ) -> None:
        self._readers = {Family.IPV4: read_kernel} | ({Family.IPV6: read_kernel6} if read_kernel6 else {})
        self._states: dict[Family, DesiredState] = {}
        self._lingering = lingering or Lingering()
        # (protocol, family) -> connection (UDP: flow) totals per (frontend, backend); ("refused", family) ->
        # refusal totals per (frontend, reason)
        self._carried: dict[tuple[str, Family], CarriedTotals] = {}
        self.interval, self.clock = interval, clock
        self._figures: KernelFigures | None = None
        self._read_at = 0.0
        self._built: Exposition | None = None
        self._first_text = threading.Event()  # set once there is a text to serve
        self.first_wait = FIRST_BUILD_WAIT
        self._refreshing: threading.Thread | None = None
        # Serialises reads (read and fold together: a stale read folded after a newer one would look like
        # a reset). The reconciler never takes it; nor does a scrape that is served the last read.
        self._lock = threading.RLock()
        self._cache_lock = threading.Lock()  # the last read and the background one, held briefly

    def carried(self, kind: str, family: Family = Family.IPV4, digest_per_key: bool = False) -> CarriedTotals:
        """The totals of one kind (a protocol's connections, or "refused") in one family's rules; `digest_per_key`:
        how their digests are kept (CarriedTotals), when they are first folded."""
        if (kind, family) not in self._carried:
            lingering = Lingering(self._lingering.grace, self._lingering.clock)
            self._carried[(kind, family)] = CarriedTotals(lingering, digest_per_key)
        return self._carried[(kind, family)]

    def publish(self, state: DesiredState, family: Family = Family.IPV4) -> None:
        """The state a family's rules were written from (DesiredState.of_family): one reference swap, so a scrape
        sees the old or the new state, whole. The first one starts the first build of the text (with an interval),
        so that the first scrape does not wait for a read of every rule."""
        self._states = {**self._states, family: state}
        if self.interval > 0 and self._built is None:
            self._start_build()

    def connection_totals(
        self,
        rules: list[tuple[str, SavedRule]],
        protocol: Protocol = Protocol.TCP,
        family: Family = Family.IPV4,
        slots: Counted | None = None,
    ) -> Totals:
        """Monotonic connection (UDP: flow) counts per (frontend, backend) of the frontends of `protocol`, from
        successive reads of one family's rules and (--nat nftables) what its slots counted (KernelRead.slots)."""
        held = self._held(family, protocol)
        counts = {port: held(port, names) for port, names in Counted.nest(backend_connections(rules, protocol)).items()}
        digests = _frontend_chains(rules, protocol)
        if slots is not None:
            for port, names in slots.counts.items():
                counts.setdefault(port, {}).update(names)
            digests.update(slots.digests)
        with self._lock:
            return self.carried(str(protocol), family).fold(Counted(counts, digests))

    def _held(self, family: Family, protocol: Protocol) -> Callable[[str, dict[str, int]], dict[str, int]]:
        """A frontend's counts per backend name -> the same, keyed by the published state's own strings of those names
        where it holds them: one string per name in the daemon, not one more per read (~6 MB at 10,000 x 10)."""
        states = self._states
        pools = states[family].pools(protocol) if family in states else EMPTY

        def held(port: str, counts: dict[str, int]) -> dict[str, int]:
            frontend = pools.get(int(port))
            if frontend is None:
                return counts
            names = {backend.name: backend.name for backend in frontend.backends}
            return {names.get(name, name): count for name, count in counts.items()}

        return held

    def _slot_counts(self, slots: Iterable[FrontendCounts], family: Family) -> dict[Protocol, Counted]:
        """What the slots counted, per protocol, each frontend's names made the state's as it is read (_held)."""
        held = {protocol: self._held(family, protocol) for protocol in Protocol}
        return by_protocol(found._replace(counts=held[found.protocol](found.port, found.counts)) for found in slots)

    def refused_totals(self, rules: list[tuple[str, SavedRule]], family: Family = Family.IPV4) -> Totals:
        """Monotonic refusal counts per (frontend, reason); those of a frontend that dropped the label stay for
        the grace period."""
        with self._lock:  # refused_connections keeps a digest per key: a frontend's refusals are in two chains
            return self.carried("refused", family, digest_per_key=True).fold(refused_connections(rules))

    def _read(self) -> KernelFigures | None:
        """One read of every family's rules, folded into the totals; None (and a warning) if none could be read."""
        with self._lock:
            started = self.clock()
            figures = KernelFigures({}, {}, {})
            read = False
            for family, read_kernel in self._readers.items():
                try:
                    tables, rules, slots = KernelRead(*read_kernel())
                    counted = self._slot_counts(slots, family)
                except Exception as error:  # a scrape must answer even when iptables does not
                    log.warning("metrics: cannot read the kernel's %s rules: %s", family, error)
                    continue
                read = True
                figures.rules.update(
                    ((table, chain, family), len(specs))
                    for table, chains in tables.items()
                    for chain, specs in chains.items()
                    if owned(chain)
                )
                frontend_rules = _frontend_rules(rules)
                for protocol in Protocol:
                    figures.connections[(protocol, family)] = self.connection_totals(
                        frontend_rules[protocol], protocol, family, counted[protocol]
                    )
                figures.refusals[family] = self.refused_totals(rules, family)
            if not read:
                return None
            with self._cache_lock:
                self._figures, self._read_at = figures, started
            return figures

    def kernel_figures(self) -> KernelFigures | None:
        """The last read of the kernel, refreshed as the class says."""
        with self._cache_lock:
            figures, stale = self._figures, self.clock() - self._read_at >= self.interval
            if figures is not None and self.interval > 0:
                if stale and not (self._refreshing and self._refreshing.is_alive()):
                    self._refreshing = threading.Thread(target=self._read, name="metrics-read", daemon=True)
                    self._refreshing.start()
                return figures
        return self._read()

    def collect(self) -> Iterator[Metric]:
        states = self._states
        yield from (family.metric() for family in self._series(states, self.kernel_figures))

    def exposition(self) -> Exposition:
        """What collect() yields, as text. With a read interval, the last build is served at once: a new one (a
        kernel read if one is due, then the text) starts in the background when the published states changed or
        the read is due, one at a time; only the first scrape waits for a text, the state's alone (see _build), at
        most `first_wait` seconds (then it answers with nothing of the state rather than time out). Without an
        interval, the text is built now."""
        if self.interval <= 0:
            return self._build(read=True)
        with self._cache_lock:
            built = self._built
            due = built is None or built.states is not self._states or self.clock() - self._read_at >= self.interval
        refreshing = self._start_build() if due else None
        if built is None and refreshing is not None:
            self._first_text.wait(self.first_wait)
            built = self._built
            if built is None:
                return Exposition({}, gzip.compress(b""))
        return built or self._build(read=False)

    def settle(self, timeout: float | None = None) -> None:
        """Wait for the background build (or read) under way, if any, to end: for benchmarks that time other work
        apart from it."""
        with self._cache_lock:
            refreshing = self._refreshing
        if refreshing is not None:
            refreshing.join(timeout)

    def _start_build(self) -> threading.Thread | None:
        """A background _build, unless one is running (then that one)."""
        with self._cache_lock:
            if not (self._refreshing and self._refreshing.is_alive()):
                self._refreshing = threading.Thread(target=self._build, name="metrics-build", daemon=True)
                self._refreshing.start()
            return self._refreshing

    def _build(self, read: bool = False) -> Exposition:
        """The text of the published states and the kernel's figures (read first if due, or if `read`). The first
        build serves the state's series before its first read (110,000 rules take seconds to read, as long as a
        scrape may wait): the kernel's series come with the next text, a read later."""
        states = self._states
        with self._cache_lock:
            figures = None if read or self.clock() - self._read_at >= self.interval else self._figures
        if figures is None and self._built is None and not read:
            self._serve(states, None)
        if figures is None:
            figures = self._read()
        return self._serve(states, figures)

    def _serve(self, states: Mapping[Family, DesiredState], figures: KernelFigures | None) -> Exposition:
        """The text of `states` and `figures` (None: the state's series only), served from now on."""
        built = Exposition(states, exposition_gzipped(self._series(states, lambda: figures)))
        with self._cache_lock:
            self._built = built
        self._first_text.set()
        return built

    def _series(
        self, states: Mapping[Family, DesiredState], kernel_figures: Callable[[], KernelFigures | None]
    ) -> Iterator[SeriesFamily]:
        """The metric families of `states`, then those of kernel_figures() (none if the kernel cannot be read)."""
        # Frontends and rejections are the same in every family's state; backends are each family's own.
        state = next((states[f] for f in Family if f in states), DesiredState(frontends={}))
        yield SeriesFamily(
            "tcprouter_frontends",
            "Frontends (public ports) declared by labels",
            "gauge",
            ("protocol",),
            [((str(protocol),), len(state.pools(protocol))) for protocol in Protocol],
        )
        yield SeriesFamily(
            "tcprouter_backends",
            "Backends in the rotation, by the node they run on and the address family they are reached in",
            "gauge",
            ("frontend", "node", "protocol", "family"),
            _backend_rows(states),
        )
        rejected = [((reason,), n) for reason, n in sorted(Tally(r.reason for r in state.rejections).items())]
        yield SeriesFamily(
            "tcprouter_rejected_containers", "Labelled containers left out, by reason", "gauge", ("reason",), rejected
        )

        figures = kernel_figures()
        if figures is None:
            return
        yield SeriesFamily(
            "tcprouter_rules",
            "Rules in owned chains, as the kernel holds them",
            "gauge",
            ("table", "chain", "family"),
            [((table, chain, str(family)), n) for (table, chain, family), n in sorted(figures.rules.items())],
        )
        yield SeriesFamily(
            "tcprouter_backend_connections",
            "New connections (UDP: flows) sent to each backend (DNAT packet counters)",
            "counter",
            ("frontend", "backend", "protocol", "family"),
            (
                ((port, name, str(protocol), str(family)), total)
                for (protocol, family), per_backend in sorted(figures.connections.items())
                for (port, name), total in per_backend.in_order()
            ),
        )
        yield SeriesFamily(
            "tcprouter_refused_connections",
            "New connections refused with a reset by a frontend's access labels (allow, maxconn, rate), "
            "from the kernel's rule counters",
            "counter",
            ("frontend", "reason", "family"),
            (
                ((port, reason, str(family)), total)
                for family, refused in sorted(figures.refusals.items())
                for (port, reason), total in refused.in_order()
            ),
        )


def _backend_rows(states: Mapping[Family, DesiredState]) -> Iterator[tuple[tuple[str, ...], int]]:
    """tcprouter_backends: each frontend's backends per node, in each family's state (an empty pool shows, at 0)."""
    for protocol in Protocol:
        for family, routed in states.items():
            for port, frontend in sorted(routed.pools(protocol).items()):
                nodes = Tally(b.node for b in frontend.backends) or Tally({"": 0})
                for node, count in sorted(nodes.items()):
                    yield (str(port), node, str(protocol), str(family)), count


class Metrics:
    """Every metric tcprouter exports, in a registry of its own."""

    def __init__(
        self,
        read_kernel: KernelReader,
        grace: float = SERIES_GRACE,
        clock: Callable[[], float] = time.monotonic,
        read_interval: float = 0.0,
        read_kernel6: KernelReader | None = None,
    ) -> None:
        """`read_interval`: how often at most the kernel's counters are read (StateCollector); 0: at every scrape.
        `registry` holds every metric; a scrape formats `instruments` and is served the state's last text."""
        self.instruments = CollectorRegistry()
        r = self.instruments
        self.grace, self.clock = grace, clock  # how long the counters of a backend that left stay
        self.state = StateCollector(read_kernel, Lingering(grace, clock), read_interval, clock, read_kernel6)
        self.registry = CollectorRegistry()
        self.registry.register(self.instruments)
        self.registry.register(self.state)
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
        self.docker_connected = Gauge(
            "tcprouter_docker_connected", "1 while the source's Docker API is followed", ["source"], registry=r
        )
        self.docker_reconnects = Counter(
            "tcprouter_docker_reconnects",
            "Times the connection to a source's Docker API was reopened",
            ["source"],
            registry=r,
        )
        self.probe_up = Gauge(
            "tcprouter_backend_probe_up",
            "1 while a remote backend answers the gateway's TCP probes, 0 once out of the rotation for failing them",
            ["node", "address"],
            registry=r,
        )
        self.probe_failures = Counter(
            "tcprouter_backend_probe_failures", "Failed TCP probes of a remote backend", ["node", "address"], registry=r
        )
        self.leader = Gauge(
            "tcprouter_leader",
            "1 while this instance owns the host's tables and keeps them; 0 while it waits as a hot standby",
            registry=r,
        )
        self.flows_forgotten = Counter(
            "tcprouter_flows_forgotten",
            "Conntrack entries deleted because their backend left (UDP) or is gone (TCP)",
            ["protocol"],
            registry=r,
        )
        self.drift_repairs = Counter(
            "tcprouter_drift_repairs", "Full resyncs triggered by rules changed behind tcprouter's back", registry=r
        )
        self.internal_errors = Counter(
            "tcprouter_internal_errors",
            "Unexpected errors caught in a thread and logged with their traceback (a bug, or data no one expected)",
            ["thread"],
            registry=r,
        )
        build = Gauge("tcprouter_build_info", "tcprouter version", ["version"], registry=r)
        build.labels(package_version()).set(1)
        # Labelled series exist from the start at 0, so that rate() and alerts see the first increment.
        for kind in ("full", "partial"):
            self.sync_duration.labels(kind)
        for protocol in Protocol:
            self.flows_forgotten.labels(str(protocol))

    def exposition(self, gzipped: bool = False) -> bytes:
        """A scrape's body (Prometheus text format 0.0.4): the instruments, formatted now, then the state's last
        text (StateCollector.exposition). Gzipped, it is two gzip members, which a reader decompresses as one."""
        live = generate_latest(self.instruments)
        state = self.state.exposition()
        return gzip.compress(live, compresslevel=1) + state.gzipped if gzipped else live + state.text

    def serve(self, address: str, health: Callable[[], tuple[bool, str]] | None = None) -> None:
        """Serve /metrics (any other path too), and /healthz (200 while `health()` says so, else 503), on
        `host:port` (`:port` or `[::]:port` too) in a daemon thread."""
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"

        def app(environ: dict, start_response: Callable) -> list[bytes]:
            if environ.get("PATH_INFO") != "/healthz":
                gzipped = "gzip" in environ.get("HTTP_ACCEPT_ENCODING", "")
                body = self.exposition(gzipped)
                start_response(
                    "200 OK", [("Content-Type", CONTENT_TYPE_LATEST)] + ([("Content-Encoding", "gzip")] * gzipped)
                )
                return [body]
            ok, detail = health() if health else (True, "ok")
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [f"{detail}\n".encode()]

        family = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][0]
        server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
        server = make_server(host, int(port), app, server_class, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes and health checks are not worth a log line each."""


def package_version() -> str:
    try:
        return version("tcprouter")
    except PackageNotFoundError:
        return "unknown"
