"""The sync runner, change tracker and sync against a real kernel (private network namespace), with the providers'
changes fed in directly: coalescing, draining, failed writes that leave the rules in force, restarts without a flush."""

from __future__ import annotations

import gc
import threading

import pytest

from tcprouter import heap
from tcprouter.compiler import Options, compile_rules
from tcprouter.diff import believed_tables, owned_only
from tcprouter.labels import desired_state
from tcprouter.metrics import Metrics, kernel_reader
from tcprouter.model import ContainerSnapshot, timestamp_ns
from tcprouter.netfilter import Flavour, Iptables, NetfilterError
from tcprouter.runner import SyncRunner, Timing
from tcprouter.sync import Syncer
from tcprouter.tracker import Change, ChangeTracker, Relist

from .strategies import container
from .support import private_netns, wait_until

pytestmark = pytest.mark.kernel


class FlakyWriter:
    """A real writer into the namespace whose next `failures` writes fail, as a busy or broken iptables would."""

    def __init__(self, real: Iptables) -> None:
        self.real = real
        self.flavour = real.flavour
        self.failures = 0
        self.writes = 0

    def read(self, counters: bool = False):
        return self.real.read(counters)

    def list_chain(self, table: str, chain: str):
        return self.real.list_chain(table, chain)

    def restore(self, script: str, test: bool = False) -> None:
        self.writes += 1
        if self.failures:
            self.failures -= 1
            raise NetfilterError("iptables-restore: simulated failure (another writer holds the table)")
        self.real.restore(script, test)


@pytest.fixture
def namespace():
    with private_netns() as ns:
        yield ns


def make(ns: str) -> tuple[SyncRunner, FlakyWriter]:
    writer = FlakyWriter(Iptables(Flavour.NFT, netns=ns))
    metrics = Metrics(kernel_reader(Flavour.NFT, ns))
    timing = Timing(settle=0.01, max_delay=0.1, resync_interval=3600, check_interval=0.2)
    return SyncRunner(ChangeTracker("tcp"), Syncer(writer, Options(), "tcp", metrics), metrics, timing), writer


def sync(runner: SyncRunner, full: bool) -> bool:
    """One sync of the tracker's current view, as the runner's loop does it."""
    return runner.syncer.sync(runner.tracker.view(), runner.tracker.unreachable, full=full)


def kernel_routes(ns: str) -> list[str]:
    tables, _ = Iptables(Flavour.NFT, netns=ns).read()
    return [rule.split("--to-destination ")[1] for rule in tables["nat"].get("TCPR-FE-80", ()) if "! -s" in rule]


def expected(containers: list[ContainerSnapshot]) -> dict:
    return believed_tables(compile_rules(desired_state(containers), Options(forward_parent="FORWARD")))


def test_failed_write_is_retried_counted_and_leaves_the_rules_in_force(namespace):
    runner, writer = make(namespace)
    runner.tracker.apply(Relist((container(1), container(2))))
    assert sync(runner, full=True)
    assert kernel_routes(namespace) == ["10.9.0.2:80", "10.9.0.3:80"]

    writer.failures = 10
    runner.tracker.apply(Change(container(2).id, "die", 0, snapshot=container(2, running=False)))
    assert sync(runner, full=False) is False  # no exception escapes
    assert writer.writes == 1 + 3  # retried twice, from a fresh read of the kernel
    assert runner.metrics.sync_failures._value.get() == 1
    assert kernel_routes(namespace) == ["10.9.0.2:80", "10.9.0.3:80"]  # the previous rules stay in force

    writer.failures = 0
    assert sync(runner, full=True)
    assert kernel_routes(namespace) == ["10.9.0.2:80"]


def test_loop_coalesces_a_burst_drains_on_kill_and_repairs_drift(namespace):
    runner, writer = make(namespace)
    loop = threading.Thread(target=runner.run, daemon=True)
    loop.start()
    try:
        runner.submit(Relist(()))
        wait_until(runner.ready.is_set, 5, what="the first sync")
        writes = writer.writes
        burst = [container(i) for i in range(1, 51)]
        for c in burst:
            runner.submit(Change(c.id, "start", 0, snapshot=c))
        wait_until(lambda: len(kernel_routes(namespace)) == 50, 5, what="the whole burst in the kernel")
        assert writer.writes - writes <= 3  # 50 starts, a handful of writes at most

        runner.submit(Change(burst[0].id, "kill", 0, drain=True))
        wait_until(lambda: "10.9.0.2:80" not in kernel_routes(namespace), 5, what="the killed backend to go")
        # Docker's later events about the dying container (health, die) must not bring it back.
        runner.submit(Change(burst[0].id, "health_status", 0, snapshot=burst[0]))
        marker = container(60)  # processed after the health event: once it shows, that event was handled
        runner.submit(Change(marker.id, "start", 0, snapshot=marker))
        wait_until(lambda: "10.9.0.61:80" in kernel_routes(namespace), 5, what="the marker backend")
        assert "10.9.0.2:80" not in kernel_routes(namespace)

        Iptables(Flavour.NFT, netns=namespace).restore("*nat\n-F TCPR-FRONTENDS\nCOMMIT\n")
        want = expected([*burst[1:], marker])
        wait_until(
            lambda: owned_only(Iptables(Flavour.NFT, netns=namespace).read()[0]) == want,
            5,
            what="the flushed dispatch chain to be repaired",
        )
        assert runner.metrics.registry.get_sample_value("tcprouter_drift_repairs_total") == 1
    finally:
        runner.stop()
        loop.join(5)


def test_the_first_sync_leaves_what_is_alive_out_of_full_collections(namespace):
    gc.unfreeze()
    runner, _ = make(namespace)
    loop = threading.Thread(target=runner.run, daemon=True)
    loop.start()
    try:
        assert gc.get_freeze_count() == 0
        runner.submit(Relist((container(1),)))
        wait_until(runner.ready.is_set, 5, what="the first sync")
        assert gc.get_freeze_count() > 0
    finally:
        runner.stop()
        loop.join(5)
        gc.unfreeze()


def test_restart_reconciles_without_rewriting_what_is_in_place(namespace):
    first, _ = make(namespace)
    first.tracker.apply(Relist((container(1), container(2))))
    assert sync(first, full=True)
    second, writer = make(namespace)  # a new process: no belief, reads the kernel
    second.tracker.apply(Relist((container(1), container(2))))
    assert sync(second, full=True)
    assert writer.writes == 0  # nothing differed: no flush, no rewrite, counters and rotation untouched


def test_draining_ends_with_the_run_it_belongs_to(namespace):
    """A kill drains that run of the container; a restart Docker did while tcprouter was away (seen only in a
    relist, with a new start time) brings it back, while a relist of the same run keeps it out."""
    runner, _ = make(namespace)
    first_run = container(1, started_at=timestamp_ns("2026-01-01T00:00:01Z"))
    runner.tracker.apply(Relist((first_run, container(2))))
    runner.tracker.apply(Change(first_run.id, "kill", 0, drain=True))

    def serving() -> list[str]:
        return [b.name for b in runner.syncer.desired(runner.tracker.view(), full=False)[0].frontends[80].backends]

    assert serving() == ["c2"]
    runner.tracker.apply(Relist((first_run, container(2))))
    assert serving() == ["c2"]
    runner.tracker.apply(Relist((container(1, started_at=timestamp_ns("2026-01-01T00:05:00Z")), container(2))))
    assert serving() == ["c1", "c2"]


def test_the_collector_is_paused_inside_and_left_as_it_was_after():
    assert gc.isenabled()
    with heap.collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with heap.collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # paused by someone else before: still paused
    finally:
        gc.enable()
