"""Reachability probing of remote backends: the fall/rise book (pure), and the prober against real sockets
on loopback (a listening port answers, a closed one refuses)."""

from __future__ import annotations

import socket
import threading

from tcprouter.metrics import Metrics
from tcprouter.probe import ProbeBook, ProbePolicy, Prober, tcp_connect
from tcprouter.tracker import Reachability

from .fakes import FakeClock
from .support import wait_until

A, B = ("198.18.99.11", 30001), ("198.18.99.12", 30002)


def test_out_after_fall_failures_in_a_row_back_after_rise_successes():
    book = ProbeBook(ProbePolicy(fall=2, rise=2))
    book.watch({A, B})
    assert book.record({A: False, B: True}) == [] and book.down == frozenset()  # one failure is not enough
    assert book.record({A: True, B: True}) == []  # a success resets the streak
    assert book.record({A: False}) == [] and book.record({A: False}) == [A]
    assert book.down == {A}
    assert book.record({A: True}) == [] and book.record({A: False}) == []  # rise needs 2 in a row
    assert book.record({A: True}) == [] and book.record({A: True}) == [A] and book.down == frozenset()


def test_a_new_endpoint_starts_in_and_a_forgotten_one_loses_its_record():
    book = ProbeBook(ProbePolicy(fall=1, rise=1))
    book.watch({A})
    assert book.record({A: False}) == [A]
    book.watch({B})
    assert book.down == frozenset() and book.record({A: False}) == []  # a late result for A is ignored
    book.watch({A})
    assert book.down == frozenset()  # A came back as a new endpoint: in until it fails


def test_prober_reports_a_closed_port_and_its_recovery_with_metrics():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    endpoint = ("127.0.0.1", port)
    verdicts: list[Reachability] = []
    clock = FakeClock()
    metrics = Metrics(lambda: ({}, []), grace=300, clock=clock)
    prober = Prober(verdicts.append, metrics, ProbePolicy(interval=0.05, timeout=0.5, fall=2, rise=1))
    prober.watch({endpoint: "node1"})
    stopping = threading.Event()
    thread = threading.Thread(target=prober.run, args=(stopping,), daemon=True)
    thread.start()
    try:
        assert tcp_connect(endpoint, 0.5)
        listener.close()  # the backend's host goes away: connections are refused from now on
        wait_until(lambda: verdicts, 5, what="the endpoint to be declared down")
        assert verdicts[0].down == {endpoint} and verdicts[0].flipped == (endpoint,)
        up = metrics.probe_up.labels("node1", f"127.0.0.1:{port}")._value.get()
        failures = metrics.probe_failures.labels("node1", f"127.0.0.1:{port}")._value.get()
        assert (up, failures >= 2) == (0, True)

        listener = socket.socket()  # it comes back on the same port
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(endpoint)
        listener.listen(16)
        wait_until(lambda: len(verdicts) == 2, 5, what="the endpoint to come back")
        assert verdicts[1].down == frozenset()
        labels = {"node": "node1", "address": f"127.0.0.1:{port}"}
        prober.watch({})  # no longer routed: its up gauge goes, its failure counter stays for the grace period
        assert metrics.registry.get_sample_value("tcprouter_backend_probe_up", labels) is None
        assert metrics.registry.get_sample_value("tcprouter_backend_probe_failures_total", labels) >= 2
        clock.now += 299
        prober.watch({})
        assert metrics.registry.get_sample_value("tcprouter_backend_probe_failures_total", labels) >= 2
        clock.now += 1
        prober.watch({})
        assert metrics.registry.get_sample_value("tcprouter_backend_probe_failures_total", labels) is None
    finally:
        stopping.set()
        thread.join(5)
        listener.close()
