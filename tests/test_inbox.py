"""The runner's inbox: an event storm is coalesced per container (memory bounded by containers, not events),
the view is exactly what applying every item in order gives, and an urgent item is taken at once."""

from __future__ import annotations

import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from tcprouter.model import timestamp_ns
from tcprouter.runner import Inbox
from tcprouter.tracker import Change, ChangeTracker, Item, Reachability, Relist, causes

from .strategies import container
from .support import wait_until

RUNS = (timestamp_ns("2026-01-01T00:00:01Z"), timestamp_ns("2026-01-01T00:00:02Z"), 0)


def test_a_storm_of_events_is_coalesced_per_container():
    inbox = Inbox(ChangeTracker("tcp"), grace=10)
    inbox.put(Relist(()))
    inbox.take(0, 0, 0)
    for n in range(100_000):  # 100k events about 10 containers: starts, health flaps, one kill each at the end
        i = n % 10
        up = n < 99_990
        change = (
            Change(container(i).id, "health_status", n + 1, snapshot=container(i, health="healthy"))
            if up
            else Change(container(i).id, "kill", n + 1, drain=True)
        )
        inbox.put(change)
        assert inbox.pending() <= 10
    batch = inbox.take(0, 0, 0)
    assert batch.items == 100_000
    assert len(batch.causes) == len(batch.stamps) == 10
    assert set(batch.causes.values()) == {"kill"}  # each container's latest cause
    assert sorted(batch.stamps) == list(range(1, 11))  # each container's earliest unwritten event
    assert sorted(c.name for c in batch.view) == [f"c{i}" for i in range(10)]
    assert all(c.draining for c in batch.view)  # the final kills were not lost among the health events
    assert inbox.pending() == 0


ids = st.integers(min_value=1, max_value=4)


@st.composite
def items(draw: st.DrawFn) -> Item:
    i = draw(ids)
    kind = draw(st.sampled_from(["snapshot", "drain", "gone", "unlabelled", "relist", "probe"]))
    run = draw(st.sampled_from(RUNS))
    if kind == "snapshot":
        snapshot = container(i, started_at=run, running=draw(st.booleans()))
        return Change(snapshot.id, "start", draw(st.integers(0, 9)), snapshot=snapshot, drain=draw(st.booleans()))
    if kind == "drain":
        return Change(container(i).id, "kill", draw(st.integers(0, 9)), drain=True)
    if kind == "gone":
        return Change(container(i).id, "destroy", 3, gone=True, drain=draw(st.booleans()))
    if kind == "unlabelled":
        return Change(container(i).id, "update", 4, snapshot=container(i, labels={}, started_at=run))
    if kind == "relist":
        listed = draw(st.lists(ids, unique=True))
        return Relist(tuple(container(j, started_at=draw(st.sampled_from(RUNS))) for j in listed))
    endpoint = (f"10.9.0.{i + 1}", 80)
    return Reachability(frozenset(draw(st.sets(st.just(endpoint)))), (endpoint,), 5)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(items(), st.booleans()), max_size=40))
def test_the_coalesced_inbox_gives_the_view_of_every_item_applied_in_order(steps: list[tuple[Item, bool]]):
    """With a turn of the loop taken after any item, the views taken are those of applying each item in order,
    and the batches' causes are the items' causes, the latest per key."""
    inbox, reference = Inbox(ChangeTracker("tcp"), grace=10), ChangeTracker("tcp")
    since: list[Item] = []
    for item, take in steps:
        inbox.put(item)
        reference.apply(item)
        since.append(item)
        assert inbox.pending() <= 4 + 4 + 1  # per container, per probed endpoint, and the verdicts' time
        if take:
            batch = inbox.take(0, 0, 0)
            assert batch.view == reference.view() and batch.unreachable == reference.unreachable
            assert batch.causes == causes(since) and batch.items == len(since)
            since = []
    batch = inbox.take(0, 0, 0)
    assert batch.view == reference.view() and batch.ready == reference.ready(10)


def test_an_urgent_item_ends_the_batch_window_at_once():
    inbox = Inbox(ChangeTracker("tcp"), grace=10)
    inbox.put(Relist((container(1),)))
    started = time.monotonic()
    batch = inbox.take(timeout=5, settle=0.2, max_delay=0.2)  # not urgent: the window waits for more
    assert time.monotonic() - started >= 0.2 and batch.items == 1
    inbox.put(Change(container(1).id, "start", 0, snapshot=container(1)))
    inbox.put(Change(container(1).id, "kill", 0, drain=True))
    started = time.monotonic()
    batch = inbox.take(timeout=5, settle=5, max_delay=5)
    assert time.monotonic() - started < 1 and batch.items == 2 and batch.view[0].draining


def test_a_take_waits_for_an_item_from_another_thread_and_wake_ends_it():
    inbox = Inbox(ChangeTracker("tcp"), grace=10)
    taken: list = []
    taker = threading.Thread(target=lambda: taken.append(inbox.take(timeout=30, settle=0.01, max_delay=0.1)))
    taker.start()
    inbox.put(Relist((container(1),)))
    wait_until(lambda: taken, 5, what="the take to return the item")
    assert taken[0].items == 1
    taker = threading.Thread(target=lambda: taken.append(inbox.take(timeout=30, settle=0.01, max_delay=0.1)))
    taker.start()
    inbox.wake()
    taker.join(5)
    assert not taker.is_alive() and taken[1].items == 0
