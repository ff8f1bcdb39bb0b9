"""Providers' pure parts: Docker's and Swarm's API data -> container snapshots and changes (fast, no Docker)."""

from __future__ import annotations

import threading
import time
from datetime import datetime

import docker.errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcprouter.daemon import Mode, build_providers, resolve_mode
from tcprouter.labels import LabelKeys, desired_state
from tcprouter.metrics import Metrics
from tcprouter.model import ContainerSnapshot, timestamp_ns
from tcprouter.providers.docker_api import url_host
from tcprouter.providers.engine import (
    RELIST_WORKERS,
    Host,
    Network,
    NetworkDrivers,
    ends_container,
    health_in_status,
    list_labelled,
    published_tcp_ports,
    snapshot_from_inspect,
    still_as_held,
)
from tcprouter.providers.swarm import node_address, node_names, task_changes, task_snapshot

SERVICE = {"ID": "svc1", "Spec": {"Name": "web", "Labels": {"tcp.port": "27017"}}}
NODE = {
    "ID": "n2",
    "Description": {"Hostname": "node2"},
    "Status": {"State": "ready", "Addr": "198.18.99.12"},
}


def task(task_id: str = "t1", state: str = "running", desired: str = "running", slot: int = 1, **extra) -> dict:
    ports = [
        {"Protocol": "tcp", "TargetPort": 1234, "PublishedPort": 30001, "PublishMode": "host"},
        {"Protocol": "tcp", "TargetPort": 1234, "PublishedPort": 30001, "PublishMode": "host"},  # once per family
        {"Protocol": "udp", "TargetPort": 53, "PublishedPort": 30053, "PublishMode": "host"},
        {"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 8080, "PublishMode": "ingress"},
    ]
    return {
        "ID": task_id,
        "ServiceID": "svc1",
        "NodeID": "n2",
        "Slot": slot,
        "CreatedAt": "2026-11-27T10:00:00.123456789Z",
        "DesiredState": desired,
        "Status": {"State": state, "Timestamp": "2026-11-27T10:00:01.5Z", "PortStatus": {"Ports": ports}},
        **extra,
    }


def test_a_running_task_is_a_backend_at_its_node_address_and_host_mode_port():
    snapshot = task_snapshot(task(), SERVICE, NODE)
    assert (snapshot.name, snapshot.node, snapshot.host_address) == ("web.1", "node2", "198.18.99.12")
    assert snapshot.published_tcp_ports == {1234: 30001}  # not the UDP one, not the ingress one
    [backend] = desired_state([snapshot]).frontends[27017].backends
    assert (backend.ip, backend.port, backend.node) == ("198.18.99.12", 30001, "node2")


@pytest.mark.parametrize(
    ("state", "desired", "node_state"),
    [("starting", "running", "ready"), ("running", "shutdown", "ready"), ("running", "running", "down")],
)
def test_a_task_serves_only_while_running_meant_to_run_on_a_ready_node(state, desired, node_state):
    node = {**NODE, "Status": {**NODE["Status"], "State": node_state}}
    assert not task_snapshot(task(state=state, desired=desired), SERVICE, node).running


def test_a_manager_reporting_0_0_0_0_is_reached_at_its_raft_address():
    manager = {"Status": {"Addr": "0.0.0.0"}, "ManagerStatus": {"Addr": "198.18.99.11:2377"}}
    assert node_address(manager) == "198.18.99.11"
    assert node_address(NODE) == "198.18.99.12"


def test_task_changes_drain_what_leaves_and_stamp_what_runs_with_its_state_time():
    one = task_snapshot(task("t1"), SERVICE, NODE)
    two = task_snapshot(task("t2", slot=2), SERVICE, NODE)
    pending = task_snapshot(task("t3", state="preparing", slot=3), SERVICE, NODE)

    appeared = task_changes({}, {"t1": one, "t3": pending}, now_ns=7)
    assert {(c.container_id, c.action, c.drain) for c in appeared} == {
        ("t1", "task running", False),
        ("t3", "task pending", False),
    }
    assert next(c for c in appeared if c.container_id == "t1").time_ns == timestamp_ns("2026-11-27T10:00:01.5Z")
    assert task_changes({"t1": one}, {"t1": one}, now_ns=7) == []  # nothing changed: nothing to write

    [left] = task_changes({"t1": one, "t2": two}, {"t2": two}, now_ns=9)  # scaled down: desired state shutdown
    assert (left.container_id, left.gone, left.drain, left.urgent, left.time_ns) == ("t1", True, True, True, 9)

    stopped = task_snapshot(task("t2", state="failed", slot=2), SERVICE, NODE)
    [failed] = task_changes({"t2": two}, {"t2": stopped}, now_ns=9)
    assert (failed.action, failed.drain) == ("task stopped", True)


def test_docker_timestamps_keep_nanoseconds_and_offsets():
    assert timestamp_ns("2026-11-27T10:00:00.123456789Z") == 1795773600_123456789
    assert timestamp_ns("2026-11-27T11:00:00.5+01:00") == 1795773600_500000000
    assert timestamp_ns("2026-11-27T10:00:00Z") == 1795773600_000000000
    assert timestamp_ns("sixteen") == 0


@settings(max_examples=300)
@given(
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9998, 12, 31)),
    st.text("0123456789", max_size=12),
    st.sampled_from(["Z", "+00:00", "+05:30", "-11:00", ""]),
)
def test_timestamps_read_as_a_datetime_of_the_text_without_its_fraction_plus_the_fraction(
    moment: datetime, fraction: str, zone: str
):
    """What timestamp_ns reads is the whole seconds of the text as fromisoformat reads it (local time if it has no
    zone), plus the fraction's first nine digits as nanoseconds."""
    text = moment.replace(microsecond=0).isoformat() + (f".{fraction}" if fraction else "") + zone
    whole = datetime.fromisoformat(text.replace(f".{fraction}", "", 1) if fraction else text)
    assert timestamp_ns(text) == int(whole.timestamp()) * 1_000_000_000 + int((fraction + "0" * 9)[:9])


def test_a_remote_engine_container_is_reached_at_the_engine_host():
    info = {
        "Id": "c" * 64,
        "Name": "/db",
        "Created": "2026-11-27T10:00:00Z",
        "Config": {"Labels": {"tcp.port": "5432"}, "ExposedPorts": {"5432/tcp": {}}},
        "State": {"Running": True, "StartedAt": "2026-11-27T10:00:01Z"},
        "NetworkSettings": {
            "Networks": {"bridge": {"IPAddress": "172.17.0.2", "IPPrefixLen": 16}},
            "Ports": {
                "5432/tcp": [{"HostIp": "0.0.0.0", "HostPort": "49153"}, {"HostIp": "::", "HostPort": "49153"}],
                "9000/tcp": [{"HostIp": "127.0.0.1", "HostPort": "9000"}],  # loopback: not reachable from away
                "8125/udp": [{"HostIp": "0.0.0.0", "HostPort": "8125"}],
                "6000/tcp": None,  # exposed, not published
            },
        },
    }
    remote = snapshot_from_inspect(info, Host(node="engine2", address="198.18.99.12"))
    [backend] = desired_state([remote]).frontends[5432].backends
    assert (backend.ip, backend.port, backend.node) == ("198.18.99.12", 49153, "engine2")
    local = snapshot_from_inspect(info)
    [backend] = desired_state([local]).frontends[5432].backends
    assert (backend.ip, backend.port, backend.node) == ("172.17.0.2", 5432, "")
    assert published_tcp_ports({}) == {}


def test_a_local_container_learns_its_networks_drivers_by_network_id():
    info = {
        "Id": "d" * 64,
        "Created": "2026-11-27T10:00:00Z",
        "Config": {"Labels": {"tcp.port": "80"}},
        "State": {"Running": True},
        "NetworkSettings": {
            "Networks": {
                "lan": {"NetworkID": "n1", "IPAddress": "192.168.77.2", "IPPrefixLen": 24},
                "old": {"IPAddress": "10.1.0.2", "IPPrefixLen": 24},  # an engine that does not say the ID
            }
        },
    }
    drivers = {"n1": Network("macvlan")}
    snapshot = snapshot_from_inspect(info, driver_of=drivers.__getitem__)
    assert snapshot.network_drivers == {"lan": "macvlan", "old": ""}
    assert snapshot_from_inspect(info).network_drivers == {"lan": "", "old": ""}
    internal = snapshot_from_inspect(info, driver_of={"n1": Network("bridge", internal=True)}.__getitem__)
    assert (internal.network_drivers["lan"], internal.internal_networks) == ("bridge", {"lan"})
    assert snapshot.internal_networks == frozenset()


class NetworksApi:
    """The one call NetworkDrivers makes, counted."""

    def __init__(self) -> None:
        self.listed = [{"Id": "n1", "Driver": "bridge"}, {"Id": "n3", "Driver": "bridge", "Internal": True}]
        self.calls = 0

    def networks(self) -> list[dict]:
        self.calls += 1
        return list(self.listed)


def test_network_drivers_are_listed_again_only_for_an_unknown_id_or_after_a_removal():
    api = NetworksApi()
    drivers = NetworkDrivers(api)  # type: ignore[arg-type]
    assert (drivers("n1"), drivers("n1"), api.calls) == (Network("bridge"), Network("bridge"), 1)
    assert (drivers("n3"), api.calls) == (Network("bridge", internal=True), 1)
    api.listed.append({"Id": "n2", "Driver": "ipvlan"})  # created since the last list
    assert (drivers("n2"), api.calls) == (Network("ipvlan"), 2)
    assert (drivers("gone"), drivers("gone"), api.calls) == (Network(), Network(), 3)  # asked once
    drivers.forget()  # a network was removed
    assert (drivers("n1"), api.calls) == (Network("bridge"), 4)


def test_modes_and_the_flag_combinations_that_cannot_work():
    assert resolve_mode(None, []) is Mode.LOCAL
    assert resolve_mode(None, ["tcp://a:2376", "tcp://b:2376"]) is Mode.ENGINES
    assert resolve_mode("swarm", ["tcp://m:2376"]) is Mode.SWARM
    metrics = Metrics(lambda: ({}, []))
    engines = build_providers(Mode.ENGINES, ["tcp://198.18.99.11:2375", "ssh://ops@edge2"], LabelKeys(), metrics)
    assert [p.source for p in engines] == ["tcp://198.18.99.11:2375", "ssh://ops@edge2"]
    assert all(p.remote for p in engines)
    with pytest.raises(ValueError, match="tcp://"):
        build_providers(Mode.ENGINES, ["unix:///run/node1/docker.sock"], LabelKeys(), metrics)
    with pytest.raises(ValueError, match="one manager"):
        build_providers(Mode.SWARM, ["tcp://a:1", "tcp://b:1"], LabelKeys(), metrics)
    with pytest.raises(ValueError, match="--engines"):
        build_providers(Mode.LOCAL, ["tcp://a:1", "tcp://b:1"], LabelKeys(), metrics)
    assert url_host("ssh://ops@edge2:22") == "edge2" and url_host("unix:///var/run/docker.sock") == ""


def test_nodes_are_named_by_host_name_or_by_address_where_host_names_repeat():
    twin = {**NODE, "ID": "n3", "Status": {"State": "ready", "Addr": "198.18.99.13"}}
    assert node_names([NODE]) == {"n2": "node2"}
    assert node_names([NODE, twin]) == {"n2": "198.18.99.12", "n3": "198.18.99.13"}


@pytest.mark.parametrize(
    ("sent", "stop_signal", "ends"),
    [
        ("15", "", True),
        ("9", "SIGQUIT", True),
        ("3", "SIGQUIT", True),  # nginx's image: docker stop sends SIGQUIT
        ("SIGINT", "SIGINT", True),  # postgres's
        ("2", "", True),  # docker stop -s SIGINT, docker kill -s INT
        ("1", "", False),  # SIGHUP: a reload
        ("10", "SIGUSR1", True),  # an image whose stop signal is SIGUSR1
        ("28", "", False),  # SIGWINCH
        ("bogus", "", False),
    ],
)
def test_a_kill_drains_when_its_signal_ends_the_container(sent, stop_signal, ends):
    assert ends_container(sent, stop_signal) is ends


class SlowInspectApi:
    """Lists `count` labelled containers; each inspect takes a round trip, the last container is gone by then."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()

    def containers(self, filters: dict) -> list[dict]:
        if filters == {"label": "udp.port"}:
            return []  # none is a UDP backend
        assert filters == {"label": "tcp.port"}
        return [{"Id": f"{i:064x}"} for i in range(self.count)]

    def networks(self) -> list[dict]:
        return []

    def inspect_container(self, container_id: str) -> dict:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(0.01)  # the round trip to dockerd (simulated latency, not synchronisation)
        with self.lock:
            self.in_flight -= 1
        if int(container_id, 16) == self.count - 1:
            raise docker.errors.NotFound("gone")
        return {"Id": container_id, "Created": "2026-01-01T00:00:00Z", "Config": {"Labels": {"tcp.port": "80"}}}


def test_a_relist_inspects_concurrently_within_a_bound_and_keeps_the_list_order():
    api = SlowInspectApi(40)
    found = list_labelled(api, LabelKeys())  # type: ignore[arg-type]
    assert [s.id for s in found] == [f"{i:064x}" for i in range(39)]  # in order, the gone one left out
    assert 1 < api.most_in_flight <= RELIST_WORKERS


def test_a_container_on_a_network_created_with_ipv6_has_its_ipv6_address_and_subnet():
    info = {
        "Id": "e" * 64,
        "Created": "2026-11-27T10:00:00Z",
        "Config": {"Labels": {"tcp.port": "80"}},
        "State": {"Running": True},
        "NetworkSettings": {
            "Networks": {
                "v6net": {
                    "IPAddress": "172.20.0.2",
                    "IPPrefixLen": 16,
                    "GlobalIPv6Address": "FD00:20:0::2",
                    "GlobalIPv6PrefixLen": 64,
                },
                "bridge": {"IPAddress": "172.17.0.2", "IPPrefixLen": 16, "GlobalIPv6Address": ""},
            }
        },
    }
    snapshot = snapshot_from_inspect(info)
    assert (snapshot.networks6, snapshot.subnets6) == ({"v6net": "fd00:20::2"}, {"v6net": "fd00:20::/64"})


NETWORKS = {
    "app": {"NetworkID": "n1", "IPAddress": "172.18.0.3", "IPPrefixLen": 16, "GlobalIPv6Address": ""},
    "v6": {"IPAddress": "172.20.0.2", "IPPrefixLen": 16, "GlobalIPv6Address": "fd00:20::2", "GlobalIPv6PrefixLen": 64},
}
INSPECT = {
    "Id": "f" * 64,
    "Created": "2026-12-03T10:00:00.123456789Z",
    "Config": {"Labels": {"tcp.port": "80"}, "StopSignal": "SIGQUIT"},
    "State": {"Running": True, "StartedAt": "2026-12-03T10:00:01Z", "Health": {"Status": "healthy"}},
    "NetworkSettings": {"Networks": NETWORKS, "Ports": {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]}},
}
SUMMARY = {
    "Id": "f" * 64,
    "Labels": {"tcp.port": "80"},
    "State": "running",
    "Status": "Up 2 minutes (healthy)",
    "Ports": [{"IP": "0.0.0.0", "PrivatePort": 80, "PublicPort": 8080, "Type": "tcp"}],
    "NetworkSettings": {"Networks": NETWORKS},
}


COMPOSE_LABELS = {  # what `docker compose up` and an image put beside ours on a real container
    "com.docker.compose.project": "shop",
    "com.docker.compose.service": "db",
    "com.docker.compose.container-number": "2",
    "com.docker.compose.config-hash": "9" * 64,
    "com.docker.compose.project.working_dir": "/srv/shop",
    "org.opencontainers.image.version": "7.0.4",
}
KEYS = LabelKeys("tcp", "udp", "com.docker.compose.project")


def test_a_snapshot_keeps_only_the_labels_tcprouter_reads():
    labels = {**COMPOSE_LABELS, "tcp.port": "27017", "tcp.weight": "2", "udp.port": "53", "tcpx.port": "1"}
    kept = snapshot_from_inspect({**INSPECT, "Config": {"Labels": labels}}, keys=KEYS).labels
    assert kept == {"tcp.port": "27017", "tcp.weight": "2", "udp.port": "53", "com.docker.compose.project": "shop"}
    assert snapshot_from_inspect({**INSPECT, "Config": {"Labels": labels}}).labels == labels  # no keys: all of them
    service = {**SERVICE, "Spec": {**SERVICE["Spec"], "Labels": {**COMPOSE_LABELS, "tcp.port": "80"}}}
    assert task_snapshot(task(), service, NODE, keys=LabelKeys("tcp", "udp", "com.docker.stack.namespace")).labels == {
        "tcp.port": "80"
    }


def test_replicas_of_one_service_share_one_map_of_their_labels():
    def replica(number: int, container_id: str) -> ContainerSnapshot:
        labels = {**COMPOSE_LABELS, "com.docker.compose.container-number": str(number), "tcp.port": "27017"}
        return snapshot_from_inspect({**INSPECT, "Id": container_id, "Config": {"Labels": labels}}, keys=KEYS)

    first, second = replica(1, "a" * 64), replica(2, "b" * 64)
    assert first.labels is second.labels


def test_a_list_entry_is_compared_by_the_labels_a_snapshot_keeps():
    held = snapshot_from_inspect({**INSPECT, "Config": {"Labels": {**COMPOSE_LABELS, "tcp.port": "80"}}}, keys=KEYS)
    entry = {**SUMMARY, "Labels": {**COMPOSE_LABELS, "tcp.port": "80"}}
    assert still_as_held(entry, held, KEYS)  # the labels it left out do not make every relist inspect it again
    assert still_as_held({**entry, "Labels": {**entry["Labels"], "com.docker.compose.config-hash": "0"}}, held, KEYS)
    assert not still_as_held({**entry, "Labels": {**entry["Labels"], "tcp.weight": "3"}}, held, KEYS)
    assert not still_as_held({**entry, "Labels": {**entry["Labels"], "com.docker.compose.project": "x"}}, held, KEYS)


@pytest.mark.parametrize("host", [None, Host("node2", "198.18.99.12")])
def test_a_list_entry_that_shows_what_was_inspected_keeps_the_snapshot(host):
    assert still_as_held(SUMMARY, snapshot_from_inspect(INSPECT, host))


@pytest.mark.parametrize(
    "change",
    [
        {"State": "exited"},
        {"State": "paused"},
        {"Status": "Up 2 minutes (unhealthy)"},
        {"Status": "Up 2 minutes"},
        {"Labels": {"tcp.port": "81"}},
        {"NetworkSettings": {"Networks": {"app": NETWORKS["app"]}}},
        {"NetworkSettings": {"Networks": {**NETWORKS, "app": {**NETWORKS["app"], "IPAddress": "172.18.0.9"}}}},
        {"NetworkSettings": None, "Ports": "odd"},
    ],
)
def test_a_list_entry_that_differs_in_anything_a_snapshot_holds_is_inspected_again(change):
    assert not still_as_held({**SUMMARY, **change}, snapshot_from_inspect(INSPECT))


def test_a_remote_containers_published_ports_are_compared_too():
    remote = snapshot_from_inspect(INSPECT, Host("node2", "198.18.99.12"))
    moved = [{"IP": "0.0.0.0", "PrivatePort": 80, "PublicPort": 8081, "Type": "tcp"}]
    assert not still_as_held({**SUMMARY, "Ports": moved}, remote)
    assert still_as_held(
        {**SUMMARY, "Ports": moved}, snapshot_from_inspect(INSPECT)
    )  # a local one is not reached there


@pytest.mark.parametrize(
    ("status", "health"),
    [
        ("Up 3 seconds (health: starting)", "starting"),
        ("Up 2 hours (healthy)", "healthy"),
        ("Up 1 second (unhealthy)", "unhealthy"),
        ("Up 5 minutes", None),
        ("Exited (0) 3 seconds ago", None),
    ],
)
def test_health_as_a_list_entry_shows_it(status, health):
    assert health_in_status(status) == health


class ListingApi(SlowInspectApi):
    """Lists containers with full entries (those of SUMMARY, but their ids), counting inspects."""

    def containers(self, filters: dict) -> list[dict]:
        return [{**SUMMARY, "Id": f"{i:064x}"} for i in range(self.count)] if filters == {"label": "tcp.port"} else []

    def inspect_container(self, container_id: str) -> dict:
        self.inspected = getattr(self, "inspected", 0) + 1
        return {**INSPECT, "Id": container_id}


def test_a_relist_reuses_held_snapshots_but_not_those_of_suspects_or_of_new_containers():
    api = ListingApi(5)
    first = list_labelled(api, LabelKeys())  # type: ignore[arg-type]
    assert api.inspected == 5
    held = {s.id: s for s in first[:4]}  # the fifth is new to the next relist
    again = list_labelled(api, LabelKeys(), held=held, suspect={first[0].id})  # type: ignore[arg-type]
    assert api.inspected == 5 + 2  # the suspect and the new one
    assert [s.id for s in again] == [s.id for s in first]  # in the list's order
    assert all(again[i] is held[again[i].id] for i in (1, 2, 3))
