"""Metrics without Docker or the kernel: packet counters -> connections, monotonic carry, the exposition."""

from __future__ import annotations

import dataclasses
import gzip
import os
import stat
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tcprouter.compiler import Tables, compile_rules
from tcprouter.diff import SavedRule, parse_save
from tcprouter.labels import LabelKeys
from tcprouter.metrics import (
    KernelFigures,
    KernelRead,
    Lingering,
    Metrics,
    StateCollector,
    Totals,
    backend_connections,
    exposition_gzipped,
    exposition_text,
    kernel_reader,
)
from tcprouter.model import Access, Backend, Balance, DesiredState, Family, Frontend, Protocol, Rejection
from tcprouter.netfilter import Flavour
from tcprouter.nftnat_read import Counted, FrontendCounts
from tcprouter.providers.engine import EngineProvider

from .fakes import FakeClock
from .strategies import desired_states
from .support import free_port, wait_until

A = Backend("a" * 64, "web-a", "172.17.0.2", 1234)
B = Backend("b" * 64, "web-b", "172.17.0.3", 1234, weight=2)
C = Backend("c" * 64, "web-c", "172.17.0.4", 1234)
D = Backend("d" * 64, "web-d", "172.17.0.5", 1234)


def kernel(counts: dict[str, list[int]], state: DesiredState) -> tuple[Tables, list[tuple[str, SavedRule]]]:
    """The compiled rules of `state` as `iptables-save -c` lists them, with the packet counts given per chain
    (one per rule, in order; missing ones are 0)."""
    rules = compile_rules(state)
    lines = []
    for table, chains in rules.chains.items():
        lines.append(f"*{table}")
        lines += [f":{chain} - [0:0]" for chain in chains]
        for chain, specs in chains.items():
            packets = counts.get(chain, [])
            lines += [f"[{packets[i] if i < len(packets) else 0}:0] -A {chain} {spec}" for i, spec in enumerate(specs)]
        lines.append("COMMIT")
    return parse_save("\n".join(lines) + "\n")


def pool(*backends: Backend, port: int = 27017) -> DesiredState:
    return DesiredState(frontends={port: Frontend(port, Balance.ROUNDROBIN, backends)})


def test_connections_come_from_dnat_rules_only_and_sum_a_backends_slots():
    state = pool(A, B)  # rotation B, A, B: B has two DNAT slots
    chain = compile_rules(state).chains["nat"]["TCPR-FE-27017"]
    assert [("DNAT" in rule) for rule in chain] == [False, True, True, True, True]  # CONNMARK, 3 slots, fallback
    _, counted = kernel({"TCPR-FE-27017": [99, 4, 3, 5, 1], "TCPR-FRONTENDS": [99]}, state)
    # slots: B (4), A (3), B (5); the fallback rule (-s B -> A) counts for A (1); CONNMARK and dispatch are no DNAT
    assert backend_connections(counted) == {("27017", "web-b"): 9, ("27017", "web-a"): 4}


def test_connections_ignore_foreign_chains_and_the_filter_table():
    counted = [
        ("nat", SavedRule("DOCKER", "-p tcp -m comment --comment web-a -j DNAT --to-destination 1.2.3.4:1", 7)),
        ("filter", SavedRule("TCPR-FE-80", "-m comment --comment web-a -j DNAT --to-destination 1.2.3.4:1", 7)),
        ("nat", SavedRule("TCPR-FE-80", "-p tcp -m comment --comment web-a -j DNAT --to-destination 1.2.3.4:1", 2)),
    ]
    assert backend_connections(counted) == {("80", "web-a"): 2}


def totals(collector: StateCollector, state: DesiredState, **counts: list[int]) -> dict[str, int]:
    chain_counts = {f"TCPR-FE-{port.removeprefix('p')}": c for port, c in counts.items()}
    return {name: n for (_, name), n in collector.connection_totals(kernel(chain_counts, state)[1]).items()}


def test_counters_stay_monotonic_across_chain_rewrites():
    collector = StateCollector(lambda: ({}, []))
    two, three = pool(A, C), pool(A, C, D)  # rules: CONNMARK, one slot per backend, fallback (-s last -> first)
    assert totals(collector, two, p27017=[0, 2, 3]) == {"web-a": 2, "web-c": 3}
    assert totals(collector, two, p27017=[0, 4, 4]) == {"web-a": 4, "web-c": 4}
    # D joins: the chain is rewritten and the kernel counts from 0, even though a new count (5) exceeds the old (4)
    assert totals(collector, three, p27017=[0, 5, 1, 0]) == {"web-a": 9, "web-c": 5, "web-d": 0}
    # the same chain again: no reset, the kernel's counts grow
    assert totals(collector, three, p27017=[0, 6, 1, 2]) == {"web-a": 10, "web-c": 5, "web-d": 2}


def test_a_backend_that_leaves_and_returns_within_the_grace_continues_its_total():
    collector = StateCollector(lambda: ({}, []), Lingering(300, FakeClock()))
    assert totals(collector, pool(A, C), p27017=[0, 3, 3]) == {"web-a": 3, "web-c": 3}
    assert totals(collector, pool(C), p27017=[0, 1]) == {"web-a": 3, "web-c": 4}  # A left: its final count shows
    assert totals(collector, DesiredState(frontends={})) == {"web-a": 3, "web-c": 4}  # the pool emptied
    assert totals(collector, pool(A, C), p27017=[0, 1, 0]) == {"web-a": 4, "web-c": 4}


def test_the_totals_of_backends_gone_past_the_grace_leave_the_exposition():
    clock = FakeClock()
    collector = StateCollector(lambda: ({}, []), Lingering(300, clock))
    assert totals(collector, pool(A, C), p27017=[0, 3, 3]) == {"web-a": 3, "web-c": 3}
    assert totals(collector, pool(C), p27017=[0, 1]) == {"web-a": 3, "web-c": 4}
    clock.now += 299
    assert totals(collector, pool(C), p27017=[0, 1]) == {"web-a": 3, "web-c": 4}  # still inside the grace
    clock.now += 1
    assert totals(collector, pool(C), p27017=[0, 1]) == {"web-c": 4}
    assert dict(collector.carried("tcp").carried) == {("27017", "web-c"): 3}  # nothing of A is kept
    assert totals(collector, pool(A, C), p27017=[0, 2, 1]) == {"web-a": 2, "web-c": 5}  # back later: counts anew


def test_a_storm_of_short_lived_backends_keeps_only_the_recent_ones():
    clock = FakeClock()
    collector = StateCollector(lambda: ({}, []), Lingering(300, clock))
    for i in range(1000):  # a new backend every minute, each replacing the last
        backend = Backend(f"{i:064x}", f"job-{i}", "172.17.0.2", 1234)
        seen = totals(collector, pool(backend), p27017=[0, 1])
        clock.now += 60
    assert len(seen) <= 300 / 60 + 1 and len(collector.carried("tcp").carried) <= 300 / 60 + 1


def test_a_count_that_drops_is_a_reset_even_if_the_chain_text_is_unchanged():
    collector = StateCollector(lambda: ({}, []))  # e.g. rewritten to other content and back between two scrapes
    assert totals(collector, pool(A, C), p27017=[0, 5, 5]) == {"web-a": 5, "web-c": 5}
    assert totals(collector, pool(A, C), p27017=[0, 1, 7]) == {"web-a": 6, "web-c": 7}


def test_refused_connections_come_from_the_reject_rules_and_stay_monotonic_over_rewrites():
    guarded = DesiredState({27017: Frontend(27017, Balance.ROUNDROBIN, (A,), Access(allow=("10.0.0.0/8",), rate=5))})
    clock = FakeClock()
    collector = StateCollector(lambda: ({}, []), Lingering(300, clock))

    def refused(state: DesiredState, **counts: list[int]) -> dict[tuple[str, str], int]:
        return collector.refused_totals(kernel({chain.replace("_", "-"): c for chain, c in counts.items()}, state)[1])

    # TCPR-AL: RETURN, REJECT; TCPR-AC: jump to TCPR-AL, the rate's REJECT
    assert refused(guarded, TCPR_AL_27017=[50, 3], TCPR_AC_27017=[53, 2]) == {
        ("27017", "allow"): 3,
        ("27017", "rate"): 2,
    }
    assert refused(guarded, TCPR_AL_27017=[60, 4], TCPR_AC_27017=[64, 2]) == {
        ("27017", "allow"): 4,
        ("27017", "rate"): 2,
    }
    # another allowed network: TCPR-AL is rewritten and its count starts again at 0; the total goes on
    wider = DesiredState(
        {27017: Frontend(27017, Balance.ROUNDROBIN, (A,), Access(allow=("10.0.0.0/8", "192.0.2.0/24"), rate=5))}
    )
    assert refused(wider, TCPR_AL_27017=[1, 1, 1], TCPR_AC_27017=[3, 3]) == {
        ("27017", "allow"): 5,
        ("27017", "rate"): 3,
    }
    # the allowed networks change back: TCPR-AL is rewritten again, and its new count (7) is above the last (1) but
    # counted anew; TCPR-AC is not rewritten, and the rate's count goes on
    assert refused(guarded, TCPR_AL_27017=[1, 7], TCPR_AC_27017=[8, 4]) == {
        ("27017", "allow"): 12,
        ("27017", "rate"): 4,
    }
    # the labels are dropped: the totals stay for the grace period, then leave
    assert refused(pool(A)) == {("27017", "allow"): 12, ("27017", "rate"): 4}
    clock.now += 300
    assert refused(pool(A)) == {}


def test_scrape_exposes_refused_connections_by_frontend_and_reason():
    state = DesiredState({80: Frontend(80, Balance.ROUNDROBIN, (A,), Access(maxconn=2))})
    metrics = Metrics(lambda: kernel({"TCPR-AC-80": [7]}, state))
    assert scrape(metrics)["tcprouter_refused_connections"] == [
        ({"frontend": "80", "reason": "maxconn", "family": "ipv4"}, 7)
    ]


def scrape(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    families = text_string_to_metric_families(generate_latest(metrics.registry).decode())
    return {f.name: [(s.labels, s.value) for s in f.samples if not s.name.endswith("_created")] for f in families}


def test_scrape_shows_the_published_state_and_the_kernel():
    state = DesiredState(
        frontends={
            27017: Frontend(27017, Balance.ROUNDROBIN, (A, C)),
            1883: Frontend(1883, Balance.ROUNDROBIN, ()),
        },
        rejections=(
            Rejection("1" * 64, "bad-1", "invalid_port", "label tcp.port='x' is not an integer 1-65535"),
            Rejection("2" * 64, "bad-2", "invalid_port", "label tcp.port='0' is not an integer 1-65535"),
            Rejection("3" * 64, "bad-3", "unknown_network", "label tcp.network='x' names ..."),
        ),
    )
    metrics = Metrics(lambda: kernel({"TCPR-FE-27017": [0, 2, 1]}, state))
    metrics.state.publish(state)
    seen = scrape(metrics)
    assert seen["tcprouter_frontends"] == [({"protocol": "tcp"}, 2), ({"protocol": "udp"}, 0)]
    assert seen["tcprouter_backends"] == [
        ({"frontend": "1883", "node": "", "protocol": "tcp", "family": "ipv4"}, 0),
        ({"frontend": "27017", "node": "", "protocol": "tcp", "family": "ipv4"}, 2),
    ]
    assert seen["tcprouter_rejected_containers"] == [
        ({"reason": "invalid_port"}, 2),
        ({"reason": "unknown_network"}, 1),
    ]
    assert seen["tcprouter_backend_connections"] == [
        ({"frontend": "27017", "backend": "web-a", "protocol": "tcp", "family": "ipv4"}, 2),
        ({"frontend": "27017", "backend": "web-c", "protocol": "tcp", "family": "ipv4"}, 1),
    ]
    rules = {(labels["table"], labels["chain"]): value for labels, value in seen["tcprouter_rules"]}
    assert rules[("nat", "TCPR-FE-27017")] == 4  # CONNMARK, two slots, fallback
    assert rules[("filter", "TCPR-FORWARD")] == 3
    assert rules[("nat", "TCPR-CANARY")] == 0  # an owned chain without rules still counts
    assert ("nat", "TCPR-FE-1883") not in rules  # an empty pool has no chain


def test_labelled_series_exist_before_anything_happened():
    metrics = Metrics(lambda: ({}, []))
    EngineProvider(None, LabelKeys(), metrics)  # the local provider declares its series
    seen = scrape(metrics)
    kinds = {labels["kind"] for labels, _ in seen["tcprouter_sync_duration_seconds"]}
    assert kinds == {"full", "partial"}
    actions = {labels["action"] for labels, _ in seen["tcprouter_docker_events"]}
    assert {"start", "die", "stop", "kill", "destroy", "health_status", "connect", "disconnect"} <= actions
    assert seen["tcprouter_sync_failures"] == [({}, 0)]
    assert seen["tcprouter_docker_connected"] == [({"source": "local"}, 0)]
    assert [labels.keys() for labels, _ in seen["tcprouter_build_info"]] == [{"version"}]


def test_a_scrape_answers_when_iptables_fails():
    def broken() -> tuple[Tables, list[tuple[str, SavedRule]]]:
        raise OSError("iptables-nft-save: not found")

    metrics = Metrics(broken)
    metrics.state.publish(pool(A))
    seen = scrape(metrics)
    assert seen["tcprouter_backends"] == [({"frontend": "27017", "node": "", "protocol": "tcp", "family": "ipv4"}, 1)]
    assert "tcprouter_rules" not in seen and "tcprouter_backend_connections" not in seen


def test_a_scrape_answers_when_the_slots_read_fails_midway():
    """The slots are read as they are taken (frontend_counts): a netlink error after some frontends is the read's
    failure, as iptables' would be, and nothing half read is exported."""

    def slots() -> Iterator[FrontendCounts]:
        yield FrontendCounts(Protocol.TCP, "27017", 1, {"web-a": 3})
        raise OSError("netlink: interrupted dump")

    metrics = Metrics(lambda: KernelRead({}, [], slots()))
    metrics.state.publish(pool(A))
    seen = scrape(metrics)
    assert seen["tcprouter_backends"] == [({"frontend": "27017", "node": "", "protocol": "tcp", "family": "ipv4"}, 1)]
    assert "tcprouter_rules" not in seen and "tcprouter_backend_connections" not in seen


@pytest.mark.timeout(20)
def test_a_hanging_iptables_save_cannot_hang_a_scrape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake = tmp_path / "iptables-nft-save"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    metrics = Metrics(kernel_reader(Flavour.NFT, timeout=0.5))
    started = time.monotonic()
    seen = scrape(metrics)
    assert time.monotonic() - started < 3
    assert "tcprouter_frontends" in seen and "tcprouter_rules" not in seen


def test_a_slow_scrape_blocks_no_sync_and_shows_one_whole_state():
    reading, release = threading.Event(), threading.Event()

    def slow_kernel() -> tuple[Tables, list[tuple[str, SavedRule]]]:
        reading.set()
        release.wait(5)
        return {}, []

    metrics = Metrics(slow_kernel)
    metrics.state.publish(pool(A, C))
    seen: dict = {}
    scraper = threading.Thread(target=lambda: seen.update(scrape(metrics)))
    scraper.start()
    assert reading.wait(5)
    started = time.monotonic()  # what a sync does, while the scrape waits for iptables-save
    metrics.state.publish(DesiredState(frontends={1883: Frontend(1883, Balance.ROUNDROBIN, (D,))}))
    metrics.sync_duration.labels("partial").observe(0.01)
    metrics.last_sync.set_to_current_time()
    assert time.monotonic() - started < 0.1
    release.set()
    scraper.join(5)
    assert seen["tcprouter_frontends"] == [({"protocol": "tcp"}, 1), ({"protocol": "udp"}, 0)]
    assert seen["tcprouter_backends"] == [
        ({"frontend": "27017", "node": "", "protocol": "tcp", "family": "ipv4"}, 2)
    ]  # the state the scrape began with, whole


def test_connections_of_backends_whose_names_iptables_save_quotes():
    dotted = Backend("9" * 64, 'web.1"x', "172.17.0.9", 1234)  # a '.' (and any quote) makes iptables-save quote
    _, counted = kernel({"TCPR-FE-27017": [0, 2, 3]}, pool(dotted, A))
    assert backend_connections(counted) == {("27017", 'web.1"x'): 2, ("27017", "web-a"): 3}


def test_the_kernel_is_read_at_most_once_per_interval_and_a_scrape_never_waits_for_a_later_read():
    clock = FakeClock()
    state = pool(A, C)
    counts = {"TCPR-FE-27017": [0, 2, 1]}
    reads: list[float] = []
    release = threading.Event()

    def counting_kernel() -> tuple[Tables, list[tuple[str, SavedRule]]]:
        reads.append(clock.now)
        if len(reads) > 1:
            release.wait(5)  # a read that takes as long as iptables-save of 100,000 rules
        return kernel(counts, state)

    metrics = Metrics(counting_kernel, clock=clock, read_interval=10)
    connections = lambda: dict(  # noqa: E731
        (labels["backend"], value) for labels, value in scrape(metrics)["tcprouter_backend_connections"]
    )
    # the first text is the state's alone; the first read's counts come with the next
    wait_until(lambda: connections() == {"web-a": 2, "web-c": 1}, 5, what="the first read's figures")
    counts["TCPR-FE-27017"] = [0, 5, 4]
    clock.now += 9.9
    assert [connections() for _ in range(3)] == [{"web-a": 2, "web-c": 1}] * 3  # served the last read
    assert len(reads) == 1
    clock.now += 0.1
    started = time.monotonic()
    assert connections() == {"web-a": 2, "web-c": 1}  # the read is due: it starts, the scrape does not wait
    assert connections() == {"web-a": 2, "web-c": 1}  # nor does the next one start another
    assert time.monotonic() - started < 2 and len(reads) == 2
    release.set()
    wait_until(lambda: connections() == {"web-a": 5, "web-c": 4}, 5, what="the background read's figures")
    assert len(reads) == 2


def test_with_a_read_interval_of_0_every_scrape_reads():
    reads: list[int] = []
    metrics = Metrics(lambda: reads.append(1) or ({}, []), read_interval=0)
    for _ in range(3):
        scrape(metrics)
    assert len(reads) == 3


def _served(port: int, gzipped: bool) -> tuple[str | None, dict[str, list[tuple[dict[str, str], float]]]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if gzipped:
        request.add_header("Accept-Encoding", "gzip")
    with urllib.request.urlopen(request, timeout=5) as reply:
        encoding, body = reply.headers.get("Content-Encoding"), reply.read()
    text = (gzip.decompress(body) if gzipped else body).decode()  # two gzip members read as one, as Go's reader does
    families = text_string_to_metric_families(text)
    return encoding, {f.name: [(s.labels, s.value) for s in f.samples] for f in families}


@pytest.mark.parametrize("gzipped", [False, True])
def test_the_endpoint_serves_the_instruments_live_and_the_state_as_last_built(gzipped):
    clock = FakeClock()
    metrics = Metrics(lambda: kernel({"TCPR-FE-27017": [0, 2, 1]}, pool(A, C)), clock=clock, read_interval=10)
    metrics.state.publish(pool(A, C))
    port = free_port()
    metrics.serve(f"127.0.0.1:{port}")
    # The first text holds the state alone; the kernel's series come with the next, once the first read is done.
    encoding, seen = wait_until(
        lambda: (served := _served(port, gzipped)) and "tcprouter_backend_connections" in served[1] and served,
        5,
        what="the endpoint's text with the first read's series",
    )
    assert encoding == ("gzip" if gzipped else None)
    assert seen["tcprouter_backends"] == [({"frontend": "27017", "node": "", "protocol": "tcp", "family": "ipv4"}, 2)]
    assert len(seen["tcprouter_backend_connections"]) == 2
    metrics.sync_failures.inc()  # an instrument: seen at the next scrape
    metrics.state.publish(pool(A))  # the state: built again in the background, served once built
    assert ({}, 1.0) in _served(port, gzipped)[1]["tcprouter_sync_failures"]
    wait_until(lambda: _served(port, gzipped)[1]["tcprouter_backends"][0][1] == 1, 5, what="the new state's text")


def test_a_scrape_is_served_the_last_text_while_a_slow_read_runs():
    clock = FakeClock()
    release = threading.Event()
    reads: list[int] = []

    def slow_kernel() -> tuple[Tables, list[tuple[str, SavedRule]]]:
        reads.append(1)
        if len(reads) > 1:
            release.wait(5)
        return kernel({"TCPR-FE-27017": [0, 2, 1]}, pool(A, C))

    metrics = Metrics(slow_kernel, clock=clock, read_interval=10)

    def with_the_kernel_s_series() -> bytes | None:
        text = metrics.exposition()
        return text if b"tcprouter_backend_connections" in text else None

    first = wait_until(with_the_kernel_s_series, 5, what="the first read's text")
    assert len(reads) == 1
    clock.now += 10
    started = time.monotonic()
    assert metrics.exposition() == first  # the read is due: it runs in the background
    assert time.monotonic() - started < 2
    release.set()
    wait_until(lambda: len(reads) == 2, 5, what="the background read")


def test_the_first_scrape_gets_the_state_without_waiting_for_a_slow_first_read():
    """The first read of 110,000 rules takes seconds: the first text is the state's series alone, the kernel's
    come with the next text."""
    release = threading.Event()

    def slow_kernel() -> tuple[Tables, list[tuple[str, SavedRule]]]:
        release.wait(10)
        return kernel({"TCPR-FE-27017": [0, 2, 1]}, pool(A, C))

    metrics = Metrics(slow_kernel, read_interval=10)
    metrics.state.publish(pool(A, C))
    started = time.monotonic()
    first = metrics.exposition().decode()
    assert time.monotonic() - started < 2 and not release.is_set()
    assert "tcprouter_sync_failures_total" in first  # the instruments
    assert 'tcprouter_backends{family="ipv4",frontend="27017",node="",protocol="tcp"} 2.0' in first  # the state
    assert "tcprouter_backend_connections" not in first and "tcprouter_rules" not in first  # not the kernel's yet
    release.set()
    wait_until(lambda: b"tcprouter_backend_connections" in metrics.exposition(), 5, what="the kernel's series")


def test_what_the_nftables_slots_counted_is_exported_and_a_rewritten_map_carries_its_count():
    """--nat nftables: the reader gives the slots' counts (KernelRead.slots) beside the rules; a count whose map's
    digest changed restarted, and what it had counted is carried."""
    reads = iter(
        [
            [
                FrontendCounts(Protocol.TCP, "27017", 1, {"web-a": 3, "web-c": 5}),
                FrontendCounts(Protocol.UDP, "53", 7, {"dns": 2}),
            ],
            [
                FrontendCounts(Protocol.TCP, "27017", 2, {"web-a": 1, "web-c": 6}),
                FrontendCounts(Protocol.UDP, "53", 7, {"dns": 4}),
            ],
        ]
    )
    metrics = Metrics(lambda: KernelRead({}, [], next(reads)))
    first, second = (
        {
            (labels["frontend"], labels["backend"], labels["protocol"]): value
            for labels, value in scrape(metrics)["tcprouter_backend_connections"]
        }
        for _ in range(2)
    )
    assert first == {("27017", "web-a", "tcp"): 3, ("27017", "web-c", "tcp"): 5, ("53", "dns", "udp"): 2}
    assert second == {("27017", "web-a", "tcp"): 4, ("27017", "web-c", "tcp"): 11, ("53", "dns", "udp"): 4}


class _Collected:
    """Metric families already collected, as generate_latest takes them."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self) -> list:
        return self.families


texts = st.text(st.characters(codec="utf-8"), max_size=12)  # quotes, backslashes, newlines, any letter
counts = st.integers(min_value=0, max_value=10**20)  # past 2**53, and past where Go writes an exponent


@settings(max_examples=200, deadline=None)
@given(
    desired_states(udp=True),
    st.dictionaries(st.tuples(st.sampled_from(["80", "27017"]), texts), counts, max_size=6),
    st.dictionaries(st.tuples(st.sampled_from(["80", "443"]), texts), counts, max_size=4),
    st.dictionaries(st.tuples(texts, texts), counts, max_size=3),
    st.lists(st.sampled_from(["invalid_port", "port_in_use", 'we"ird\\reason\n']), max_size=4),
)
def test_the_state_s_text_is_what_generate_latest_makes_of_its_families(
    state: DesiredState, connections: dict, refusals: dict, rules: dict, reasons: list[str]
):
    state = dataclasses.replace(state, rejections=tuple(Rejection("1" * 64, "x", r, "") for r in reasons))
    totals = Totals(Counted.nest(connections), {}, {})
    figures = KernelFigures(
        {(table, chain, Family.IPV4): n for (table, chain), n in rules.items()},
        {(Protocol.TCP, Family.IPV4): totals, (Protocol.UDP, Family.IPV6): totals},
        {Family.IPV4: Totals(Counted.nest(refusals), {}, {})},
    )
    states = {Family.IPV4: state, Family.IPV6: state.of_family(Family.IPV6)}
    collector = StateCollector(lambda: ({}, []))
    text = exposition_text(collector._series(states, lambda: figures))
    families = [family.metric() for family in collector._series(states, lambda: figures)]
    assert text == generate_latest(_Collected(families))  # type: ignore[arg-type]
    assert gzip.decompress(exposition_gzipped(collector._series(states, lambda: figures), 9)) == text


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.tuples(st.sampled_from(["80", "443", "9"]), texts), counts, max_size=8),
    st.dictionaries(st.tuples(st.sampled_from(["80", "443", "9"]), texts), counts, max_size=4),
    st.dictionaries(st.tuples(st.sampled_from(["80", "443", "53"]), texts), counts, max_size=4),
)
def test_totals_read_as_the_dict_of_counts_plus_carried_then_the_lingering(counts: dict, carried: dict, left: dict):
    lingering = {key: total for key, total in left.items() if key not in counts}  # as CarriedTotals.fold makes them
    totals = Totals(Counted.nest(counts), carried, lingering)
    expected = {key: count + carried.get(key, 0) for key, count in counts.items()} | lingering
    assert dict(totals) == expected and len(totals) == len(expected)
    assert list(totals.in_order()) == sorted(expected.items())
