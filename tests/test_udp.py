"""UDP frontends in the pure core: labels, compiled rules, which flows go stale when a backend leaves."""

from __future__ import annotations

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from tcprouter.commands import status
from tcprouter.compiler import Options, compile_rules, frontend_chain, frontend_of, frontend_port
from tcprouter.diff import parse_save
from tcprouter.hostports import parse_listeners
from tcprouter.labels import desired_state
from tcprouter.metrics import Metrics
from tcprouter.model import Backend, Balance, ContainerSnapshot, DesiredState, Frontend, Protocol
from tcprouter.sync import Syncer, stale_flows

from .fakes import FakeKernel
from .strategies import container, desired_states, ports


def udp(i: int, **labels: str):
    """Container c<i> labelled udp.port=5683 (and `labels`), exposing UDP 5683."""
    return container(i, labels={"udp.port": "5683", **labels}, exposed_udp_ports=(5683,))


def names(frontend: Frontend) -> list[str]:
    return [b.name for b in frontend.backends]


def test_udp_only_tcp_only_and_both_labelled_containers_join_their_protocols_pools():
    state = desired_state([container(1), udp(2), udp(3, **{"tcp.port": "80"})])
    assert state.rejections == ()  # a UDP-only container is not missing its tcp.port
    assert names(state.frontends[80]) == ["c1", "c3"]
    assert names(state.udp_frontends[5683]) == ["c2", "c3"]
    assert state.udp_frontends[5683].protocol is Protocol.UDP
    assert state.udp_frontends[5683].backends[0].port == 5683  # the exposed UDP port


def test_udp_labels_follow_their_own_prefix_and_sub_labels():
    labels = {"io.x.udp.port": "53", "io.x.udp.backend_port": "5353", "io.x.udp.balance": "random"}
    [frontend] = desired_state([container(1, labels=labels)], udp_prefix="io.x.udp").udp_frontends.values()
    assert (frontend.port, frontend.balance, frontend.backends[0].port) == (53, Balance.RANDOM, 5353)
    assert desired_state([container(1, labels=labels)]).udp_frontends == {}  # not under the default prefix


def test_a_udp_rejection_names_its_protocol_and_leaves_the_tcp_frontend_alone():
    state = desired_state([udp(1, **{"tcp.port": "80", "udp.weight": "0"})])
    assert [(r.protocol, r.reason) for r in state.rejections] == [(Protocol.UDP, "invalid_weight")]
    assert names(state.frontends[80]) == ["c1"]


def test_access_labels_are_tcp_only():
    state = desired_state([udp(1, **{"udp.allow": "not a network", "udp.maxconn": "1"})])
    assert state.rejections == () and not state.udp_frontends[5683].access


def test_a_port_conflicts_with_listeners_of_its_own_protocol_only():
    busy = {5683: "a host process already listens on 0.0.0.0:5683"}
    assert desired_state([udp(1)], busy_ports=busy).udp_frontends[5683].backends
    state = desired_state([udp(1)], udp_busy_ports=busy)
    assert [r.reason for r in state.rejections] == ["port_in_use"] and 5683 not in state.udp_frontends


PROC_NET_UDP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  1: 00000000:1633 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 0
  2: 0200000A:A1B2 0300000A:0035 01 00000000:00000000 00:00000000 00000000     0        0 2 2 0 0
"""


def test_udp_listeners_are_the_unconnected_bound_sockets():
    assert parse_listeners(PROC_NET_UDP, protocol=Protocol.UDP) == {5683: "0.0.0.0"}  # not the connected one
    assert parse_listeners(PROC_NET_UDP) == {}


@given(port=ports, protocol=st.sampled_from(Protocol))
def test_frontend_chains_name_their_protocol_and_port(port, protocol):
    assert frontend_of(frontend_chain(port, protocol)) == (protocol, port)
    assert frontend_port(frontend_chain(port, protocol)) == (port if protocol is Protocol.TCP else None)


def test_udp_frontend_rules():
    pool = (Backend("a" * 64, "coap-1", "172.17.0.2", 5683), Backend("b" * 64, "coap-2", "172.17.0.3", 5683))
    rules = compile_rules(
        DesiredState({}, udp_frontends={5683: Frontend(5683, Balance.ROUNDROBIN, pool, protocol=Protocol.UDP)})
    )
    nat = rules.chains["nat"]
    assert nat["TCPR-FRONTENDS"] == ("-p udp -m udp --dport 5683 -j TCPR-UDP-5683",)
    assert nat["TCPR-UDP-5683"] == (
        "-j CONNMARK --set-xmark 0x100000/0x100000",
        "! -s 172.17.0.2/32 -p udp -m comment --comment coap-1 -m statistic --mode nth --every 2 --packet 0 "
        "-j DNAT --to-destination 172.17.0.2:5683",
        "! -s 172.17.0.3/32 -p udp -m comment --comment coap-2 -j DNAT --to-destination 172.17.0.3:5683",
        "-s 172.17.0.3/32 -p udp -m comment --comment coap-1 -j DNAT --to-destination 172.17.0.2:5683",
    )


@given(state=desired_states(udp=True))
def test_udp_frontends_leave_every_tcp_rule_as_it_was(state):
    """Hosts upgrade in place: with UDP frontends added, each TCP chain and dispatch rule is the same text (hairpin
    SNAT gains the UDP backends' subnets)."""
    with_udp = compile_rules(state, Options()).chains["nat"]
    tcp_only = compile_rules(dataclasses.replace(state, udp_frontends={}), Options()).chains["nat"]
    for chain, rules in tcp_only.items():
        if chain not in ("TCPR-FRONTENDS", "TCPR-POSTROUTING"):
            assert with_udp[chain] == rules
    assert with_udp["TCPR-FRONTENDS"][: len(tcp_only["TCPR-FRONTENDS"])] == tcp_only["TCPR-FRONTENDS"]


def backend(i: int, port: int = 5683) -> Backend:
    return Backend(f"{i:064x}", f"c{i}", f"10.9.0.{i + 1}", port)


def pools(tcp: tuple[Backend, ...] = (), udp: tuple[Backend, ...] = ()) -> DesiredState:
    return DesiredState(
        {80: Frontend(80, Balance.ROUNDROBIN, tcp)},
        udp_frontends={5683: Frontend(5683, Balance.ROUNDROBIN, udp, protocol=Protocol.UDP)},
    )


def by_id(*containers: ContainerSnapshot) -> dict[str, ContainerSnapshot]:
    return {c.id: c for c in containers}


def test_a_udp_backend_s_flows_go_stale_as_soon_as_it_leaves():
    before, after = pools(udp=(backend(1), backend(2))), pools(udp=(backend(2),))
    stale, _ = stale_flows(before, after, by_id(container(1), container(2)), {})  # c1 still runs (draining, unhealthy)
    assert stale == {Protocol.UDP: {backend(1).endpoint}, Protocol.TCP: set()}
    assert stale_flows(after, after, by_id(container(2)), {})[0] == {Protocol.UDP: set(), Protocol.TCP: set()}


def test_a_tcp_backend_s_connections_finish_while_it_runs_and_go_stale_once_it_is_gone():
    before, after = pools(tcp=(backend(1, 80), backend(2, 80))), pools(tcp=(backend(2, 80),))
    draining = by_id(container(1), container(2))
    stale, retired = stale_flows(before, after, draining, {})
    assert stale[Protocol.TCP] == set() and retired == {backend(1).container_id: backend(1, 80).endpoint}
    stale, retired = stale_flows(after, after, by_id(container(1, running=False), container(2)), retired)  # it died
    assert stale[Protocol.TCP] == {backend(1, 80).endpoint} and retired == {}
    stale, retired = stale_flows(before, before, draining, {backend(1).container_id: backend(1, 80).endpoint})
    assert stale[Protocol.TCP] == set() and retired == {}  # back in the rotation: nothing to forget


def test_status_lists_a_container_under_its_tcp_and_its_udp_frontend():
    both = udp(1, **{"tcp.port": "80"})
    rules = compile_rules(desired_state([both])).chains["nat"]
    lines = ["*nat", *(f"[3:0] -A {chain} {rule}" for chain, specs in rules.items() for rule in specs), "COMMIT", ""]
    report = status.status_report([both], parse_save("\n".join(lines))[1], "tcp")
    assert [(f["protocol"], f["port"], [b["address"] for b in f["backends"]]) for f in report["frontends"]] == [
        ("tcp", 80, ["10.9.0.2:80"]),
        ("udp", 5683, ["10.9.0.2:5683"]),
    ]
    assert all(f["backends"][0]["in_kernel"] and f["backends"][0]["connections"] == 3 for f in report["frontends"])
    text = status.render_status(report)
    assert [line.split()[0] for line in text.splitlines()[1:]] == [":80", ":5683/udp"]


def test_a_sync_forgets_the_flows_of_the_backends_that_left_once_the_rules_are_written():
    """The conntrack deletion follows the write (the next datagram must meet the new rules) and a failed deletion
    is only logged: the flows time out."""
    kernel = FakeKernel("*filter\n:DOCKER-USER - [0:0]\nCOMMIT\n")
    calls: list[tuple[Protocol, set, int, bool]] = []

    def forget(protocol: Protocol, endpoints, mark_bit: int) -> int:
        rules = [rule for specs in kernel.read()[0]["nat"].values() for rule in specs]
        routed = any(f"--to-destination {ip}:{port}" in rule for rule in rules for ip, port in endpoints)
        calls.append((protocol, set(endpoints), mark_bit, not routed))
        if protocol is Protocol.UDP and len(calls) > 1:
            raise OSError("netlink: permission denied")
        return 2

    metrics = Metrics(lambda: ({}, []))
    syncer = Syncer(kernel, Options(), "tcp", metrics, forget_flows=forget)
    a, b = udp(1), udp(2)
    assert syncer.sync([a, b]) and calls == []
    assert syncer.sync([a, dataclasses.replace(b, draining=True)])
    assert calls == [(Protocol.UDP, {("10.9.0.3", 5683)}, 0x100000, True)]
    assert metrics.registry.get_sample_value("tcprouter_flows_forgotten_total", {"protocol": "udp"}) == 2
    assert syncer.sync([b]) and len(calls) == 2  # the deletion failed: the sync did not
