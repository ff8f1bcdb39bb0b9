"""The change tracker (several sources, draining, reachability) and the runner's schedule, on a fake clock."""

from __future__ import annotations

from tcprouter.runner import Schedule, Timing
from tcprouter.tracker import Change, ChangeTracker, Reachability, Relist, causes

from .fakes import FakeClock
from .strategies import container


def test_a_relist_replaces_only_its_own_source():
    tracker = ChangeTracker("tcp", sources=["tcp://a:2375", "tcp://b:2375"])
    tracker.apply(Relist((container(1), container(2)), source="tcp://a:2375"))
    tracker.apply(Relist((container(3),), source="tcp://b:2375"))
    tracker.apply(Relist((container(2),), source="tcp://a:2375"))  # a reconnected: c1 is gone there
    assert sorted(c.name for c in tracker.view()) == ["c2", "c3"]


def test_the_first_write_waits_for_every_source_or_the_grace_period():
    clock = FakeClock()
    tracker = ChangeTracker("tcp", sources=["a", "b"], clock=clock)
    assert not tracker.ready(grace=10)  # nothing listed: an empty view would wipe the rules in force
    tracker.apply(Relist((container(1),), source="a"))
    assert not tracker.ready(grace=10) and tracker.missing() == ["b"]
    clock.now += 10
    assert tracker.ready(grace=10)  # b stays away: it must not hold back a's changes forever
    tracker.apply(Relist((), source="b"))
    assert tracker.ready(grace=10) and tracker.missing() == []


def test_reachability_verdicts_are_kept_and_name_their_cause():
    tracker = ChangeTracker("tcp")
    verdict = Reachability(frozenset({("198.18.99.12", 30001)}), (("198.18.99.12", 30001),), 5)
    assert tracker.apply(verdict) == 5 and tracker.unreachable == verdict.down
    kill = Change(container(1).id, "kill", 6, drain=True)
    assert causes([verdict, kill]) == {("198.18.99.12", 30001): "probe", container(1).id: "kill"}
    assert verdict.urgent and kill.urgent and not Relist(()).urgent


def test_draining_a_task_that_left_forgets_it():
    tracker = ChangeTracker("tcp", sources=["swarm"])
    tracker.apply(Relist((container(1), container(2)), source="swarm"))
    tracker.apply(Change(container(1).id, "task shutdown", 0, gone=True, drain=True, source="swarm"))
    assert [c.name for c in tracker.view()] == ["c2"] and tracker.draining == {}


def test_schedule_checks_drift_every_interval_and_retries_a_failed_resync_sooner():
    clock = FakeClock()
    schedule = Schedule(Timing(resync_interval=60, check_interval=1, retry_after=1))
    assert schedule.resync_due(clock()) and schedule.check_due(clock())  # at start: a full sync at once
    schedule.resynced(clock(), ok=True)
    schedule.checked(clock())
    assert schedule.timeout(clock()) == 1
    clock.now += 1
    assert schedule.check_due(clock()) and not schedule.resync_due(clock())
    schedule.checked(clock())
    clock.now += 59
    assert schedule.resync_due(clock())
    schedule.resynced(clock(), ok=False)
    assert schedule.next_resync == clock() + 1
