"""The daemon never runs frozen: data of an unexpected shape rejects one container, an unexpected error in a
thread is logged, counted and followed by a relist or a resync, a thread that cannot go on ends the process with
an error, and /healthz says whether it works. Fast: fakes stand in for Docker and the kernel where the claim is
about the control loop itself."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from tcprouter.compiler import Options
from tcprouter.daemon import Liveness, _guarded, serve
from tcprouter.labels import LabelKeys, desired_state
from tcprouter.metrics import Metrics
from tcprouter.ownership import TablesLock
from tcprouter.probe import ProbePolicy
from tcprouter.providers.docker_api import follow_forever
from tcprouter.providers.engine import read_inspect
from tcprouter.providers.swarm import read_task
from tcprouter.runner import MAX_ERRORS, SyncRunner, Timing
from tcprouter.sync import Syncer
from tcprouter.tracker import ChangeTracker, Relist

from .support import free_port, unique, wait_until

GOOD = {
    "Id": "a" * 64,
    "Name": "/good",
    "Created": "2026-11-27T10:00:00Z",
    "Config": {"Labels": {"tcp.port": "80"}},
    "State": {"Running": True},
    "NetworkSettings": {"Networks": {"bridge": {"IPAddress": "172.17.0.2", "IPPrefixLen": 16}}},
}


@pytest.mark.parametrize(
    "broken",
    [
        {"NetworkSettings": {"Networks": {"bridge": {"IPAddress": "172.17.0.3", "IPPrefixLen": "sixteen"}}}},
        {"NetworkSettings": {"Networks": ["bridge"]}},
        {"State": "running"},
        {"Id": None},
        {"Config": {"Labels": ["tcp.port=80"]}},
    ],
)
def test_malformed_inspect_data_rejects_that_container_and_nothing_else(broken):
    bad = read_inspect({**GOOD, "Id": "b" * 64, "Name": "/bad", **broken}, "b" * 64)
    state = desired_state([read_inspect(GOOD, GOOD["Id"]), bad])
    assert [b.name for b in state.frontends[80].backends] == ["good"]
    [rejection] = state.rejections
    assert (rejection.container_id, rejection.reason) == ("b" * 64, "malformed")
    assert "unexpected shape" in rejection.detail


def test_a_malformed_task_is_rejected_by_name():
    snapshot = read_task({"ID": "t1", "Status": "running"}, {"Spec": {"Labels": {"tcp.port": "80"}}}, None, "")
    assert snapshot.malformed and desired_state([snapshot]).rejections[0].reason == "malformed"


@pytest.mark.parametrize("keys", [None, LabelKeys()])
def test_labels_that_are_not_a_map_make_the_data_malformed_not_unlabelled(keys):
    container = read_inspect({**GOOD, "Config": {"Labels": "tcp.port=80"}}, GOOD["Id"], keys=keys)
    task = read_task({"ID": "t1", "Status": {}}, {"Spec": {"Labels": ["tcp.port=80"]}}, None, "", keys)
    assert container.malformed and task.malformed
    assert container.labels == {} and task.labels == {}


class BrokenSyncer:
    """A sync that raises something no one expected, every time."""

    def drifted(self) -> bool:
        return False

    def sync(self, *args: object, **kwargs: object) -> bool:
        raise KeyError("a bug")


def test_the_sync_loop_survives_unexpected_errors_then_gives_up_with_an_error():
    metrics = Metrics(lambda: ({}, []))
    runner = SyncRunner(ChangeTracker("tcp"), BrokenSyncer(), metrics, Timing(retry_after=0.001))  # type: ignore[arg-type]
    runner.submit(Relist(()))
    runner.run()  # returns: it does not raise, and does not loop forever either
    assert runner.failed and "sync loop" in runner.failed
    assert metrics.internal_errors.labels("sync")._value.get() == MAX_ERRORS


def test_an_unexpected_error_while_following_a_source_reconnects_and_lists_again():
    metrics = Metrics(lambda: ({}, []))
    stopping = threading.Event()
    sessions: list[int] = []

    def start() -> int:
        sessions.append(len(sessions))
        return sessions[-1]

    def follow(session: int) -> None:
        if session == 0:
            raise TypeError("an event of a shape no one expected")
        stopping.set()

    follow_forever("local", stopping, metrics, start, follow, lambda session: None)
    assert sessions == [0, 1]  # a second session: connected and listed again
    assert metrics.internal_errors.labels("local")._value.get() == 1
    assert metrics.docker_reconnects.labels("local")._value.get() == 1


def test_a_thread_that_dies_ends_the_daemon_with_an_error():
    metrics = Metrics(lambda: ({}, []))
    runner = SyncRunner(ChangeTracker("tcp"), BrokenSyncer(), metrics)  # type: ignore[arg-type]

    def crash() -> None:
        raise RuntimeError("boom")

    thread = _guarded(runner, "provider local", crash)
    thread.start()
    thread.join(5)
    assert runner.failed == "thread provider local stopped" and runner.stopping.is_set()
    assert metrics.internal_errors.labels("provider local")._value.get() == 1


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            return reply.status, reply.read().decode().strip()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode().strip()


def test_healthz_is_200_only_while_the_threads_run_and_the_loop_syncs():
    metrics = Metrics(lambda: ({}, []))
    syncer = Syncer(None, Options(), "tcp", metrics)  # type: ignore[arg-type]
    runner = SyncRunner(ChangeTracker("tcp"), syncer, metrics)
    stop_worker = threading.Event()
    worker = threading.Thread(target=stop_worker.wait, name="provider local", daemon=True)
    worker.start()
    port = free_port()
    lock = TablesLock(unique("tcpr-test-"))
    other = TablesLock(lock.name)
    assert other.acquire()
    metrics.serve(f"127.0.0.1:{port}", Liveness(runner, [worker], Timing(), lock))
    assert wait_until(lambda: healthz(port), 5) == (200, "standby: another tcprouter owns the tables")
    other.release()
    assert lock.acquire()
    assert healthz(port) == (503, "no successful sync yet")
    runner.ready.set()
    runner.last_synced = time.time()
    assert healthz(port) == (200, "ok")
    stop_worker.set()
    worker.join(5)
    assert healthz(port) == (503, "stopped: provider local")
    assert b"tcprouter_internal_errors_total" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read()


class QuitAtOnce:
    """A provider whose thread ends at once: the daemon stops with an error, so that `serve` returns."""

    source, remote = "local", False

    def follow(self, submit: object, stopping: threading.Event) -> None:
        return None


class FirstScrapeMetrics(Metrics):
    """Metrics that record what the first scrape would say about leadership instead of serving it."""

    leader_when_served: float | None = None

    def serve(self, address: str, liveness: object) -> None:
        self.leader_when_served = self.leader._value.get()


@pytest.mark.parametrize("owner", [True, False])
def test_the_first_scrape_already_tells_an_owner_from_a_standby(owner):
    """tcprouter_leader is right before the metrics endpoint opens: a starting owner never shows 0 (which would
    wake an operator's standby alert, and made the tests take a starting router for a standby)."""
    lock = TablesLock(unique("tcpr-test-"))
    other = TablesLock(lock.name)
    assert (lock if owner else other).acquire()
    metrics = FirstScrapeMetrics(lambda: ({}, []))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve([QuitAtOnce()], {}, metrics, Options, "tcp", Timing(), ProbePolicy(), lock, "127.0.0.1:0")  # type: ignore[list-item]
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        other.release()
    assert metrics.leader_when_served == (1.0 if owner else 0.0)


def test_the_tables_lock_is_held_by_one_process_of_a_network_namespace_and_freed_when_it_dies():
    name = unique("tcpr-test-")
    script = f"from tcprouter.ownership import TablesLock; import time; lock = TablesLock({name!r}); "
    holder = subprocess.Popen([sys.executable, "-c", script + "print(lock.acquire(), flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "True\n"
        mine = TablesLock(name)
        assert not mine.acquire()
        stopping = threading.Event()
        threading.Timer(5, stopping.set).start()  # a bound on the wait, should the takeover never come
        holder.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        assert mine.wait(stopping), "the lock was never freed"
        assert time.monotonic() - killed < 1.0
        assert not TablesLock(name).acquire(), "held by this process now"
        mine.release()
        assert TablesLock(name).acquire()
    finally:
        holder.kill()
        holder.wait()
