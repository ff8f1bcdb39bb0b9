"""The label contract: defaults, errors, pooling (pure, fast)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcprouter.compiler import compile_rules
from tcprouter.labels import LabelError, desired_state, parse_backend, reachable_only
from tcprouter.model import Balance, ContainerSnapshot, timestamp_ns

from .strategies import containers


def snapshot(labels: dict[str, str], index: int = 1, **fields: object) -> ContainerSnapshot:
    defaults: dict[str, object] = {
        "id": f"{index:064x}",
        "name": f"c{index}",
        "created": timestamp_ns(f"2026-01-01T00:00:{index:02d}Z"),
        "labels": labels,
        "running": True,
        "networks": {"bridge": f"172.17.0.{index + 1}"},
        "subnets": {"bridge": "172.17.0.0/16"},
    }
    defaults.update(fields)
    return ContainerSnapshot(**defaults)  # type: ignore[arg-type]


def test_defaults():
    spec = parse_backend(snapshot({"tcp.port": "27017"}))
    assert (spec.frontend_port, spec.backend.ip, spec.backend.port, spec.backend.weight) == (
        27017,
        "172.17.0.2",
        27017,
        1,
    )
    assert spec.balance is None
    assert spec.backend.subnet == "172.17.0.0/16"


def test_backend_port_defaults_to_the_only_exposed_port():
    assert parse_backend(snapshot({"tcp.port": "80"}, exposed_tcp_ports=(8080,))).backend.port == 8080


def test_several_exposed_ports_need_the_label():
    with pytest.raises(LabelError, match=r"tcp\.backend_port") as error:
        parse_backend(snapshot({"tcp.port": "80"}, exposed_tcp_ports=(8080, 9090)))
    assert error.value.reason == "ambiguous_backend_port"
    assert parse_backend(snapshot({"tcp.port": "80", "tcp.backend_port": "9090"}, exposed_tcp_ports=(8080, 9090)))


def test_network_choice():
    networks = {"zeta": "10.0.0.2", "alpha": "10.1.0.2"}
    assert parse_backend(snapshot({"tcp.port": "80"}, networks=networks)).backend.ip == "10.1.0.2"
    assert (
        parse_backend(snapshot({"tcp.port": "80", "tcp.network": "zeta"}, networks=networks)).backend.ip == "10.0.0.2"
    )
    with pytest.raises(LabelError, match="not attached") as error:
        parse_backend(snapshot({"tcp.port": "80", "tcp.network": "nope"}, networks=networks))
    assert error.value.reason == "unknown_network"
    with pytest.raises(LabelError, match="no IPv4 address"):
        parse_backend(snapshot({"tcp.port": "80"}, networks={"host": ""}))


@pytest.mark.parametrize(
    ("labels", "reason"),
    [
        ({"tcp.port": "0"}, "invalid_port"),
        ({"tcp.port": "65536"}, "invalid_port"),
        ({"tcp.port": "http"}, "invalid_port"),
        ({"tcp.port": "-1"}, "invalid_port"),
        ({"tcp.port": "0x50"}, "invalid_port"),
        ({"tcp.port": "80", "tcp.weight": "0"}, "invalid_weight"),
        ({"tcp.port": "80", "tcp.weight": "101"}, "invalid_weight"),
        ({"tcp.port": "80", "tcp.balance": "leastconn"}, "invalid_balance"),
        ({"tcp.port": "80", "tcp.backend_port": "99999"}, "invalid_backend_port"),
        ({"tcp.weight": "2"}, "missing_port"),
    ],
)
def test_bad_labels_are_named(labels, reason):
    with pytest.raises(LabelError) as error:
        parse_backend(snapshot(labels))
    assert error.value.reason == reason
    assert any(key in error.value.detail for key in [*labels, "tcp.port"])


def test_custom_prefix():
    spec = parse_backend(snapshot({"lb.port": "1883", "lb.weight": "3"}), prefix="lb")
    assert (spec.frontend_port, spec.backend.weight) == (1883, 3)


def test_pools_are_ordered_by_age_and_only_serving_containers_count():
    state = desired_state(
        [
            snapshot({"tcp.port": "80"}, 3),
            snapshot({"tcp.port": "80"}, 1),
            snapshot({"tcp.port": "80"}, 2, health="unhealthy"),
            snapshot({"tcp.port": "80"}, 4, health="healthy"),
            snapshot({"tcp.port": "80"}, 5, draining=True),
            snapshot({"tcp.port": "80"}, 6, running=False),
            snapshot({"tcp.port": "81"}, 7, health="starting"),
        ]
    )
    assert [b.name for b in state.frontends[80].backends] == ["c1", "c3", "c4"]
    assert state.frontends[81].backends == ()  # declared, nothing serving: reported, not routed
    assert state.rejections == ()


def test_a_bad_container_does_not_affect_its_pool():
    state = desired_state([snapshot({"tcp.port": "80"}, 1), snapshot({"tcp.port": "80", "tcp.weight": "x"}, 2)])
    assert [b.name for b in state.frontends[80].backends] == ["c1"]
    assert [(r.name, r.reason) for r in state.rejections] == [("c2", "invalid_weight")]
    assert "c2" in str(state.rejections[0]) and "tcp.weight" in str(state.rejections[0])


def test_pool_setting_conflict_oldest_wins_and_is_reported():
    state = desired_state(
        [
            snapshot({"tcp.port": "80", "tcp.balance": "roundrobin"}, 2),
            snapshot({"tcp.port": "80", "tcp.balance": "random"}, 1),
        ]
    )
    assert state.frontends[80].balance is Balance.RANDOM
    assert len(state.warnings) == 1 and "c2" in state.warnings[0] and "c1" in state.warnings[0]


@pytest.mark.parametrize(("value", "synproxy"), [("true", True), (" False ", False), ("TRUE", True)])
def test_synproxy_label_is_a_boolean(value: str, synproxy: bool):
    assert desired_state([snapshot({"tcp.port": "80", "tcp.synproxy": value}, 1)]).frontends[80].synproxy is synproxy


@pytest.mark.parametrize("value", ["yes", "1", ""])
def test_a_synproxy_label_that_is_not_true_or_false_is_rejected(value: str):
    state = desired_state([snapshot({"tcp.port": "80", "tcp.synproxy": value}, 1)])
    assert [r.reason for r in state.rejections] == ["invalid_synproxy"]


def test_synproxy_is_pool_level_the_oldest_container_that_sets_it_wins():
    unset, newer, oldest = (
        snapshot({"tcp.port": "80"}, 1),
        snapshot({"tcp.port": "80", "tcp.synproxy": "false"}, 3),
        snapshot({"tcp.port": "80", "tcp.synproxy": "true"}, 2),
    )
    state = desired_state([newer, unset, oldest])
    assert state.frontends[80].synproxy is True
    assert len(state.warnings) == 1 and "synproxy" in state.warnings[0] and "c3" in state.warnings[0]
    assert desired_state([unset]).frontends[80].synproxy is False


@settings(deadline=None)  # the first example pays for imports: a per-example deadline would flake on a busy host
@given(
    st.lists(st.integers(min_value=0, max_value=59), max_size=6, unique=True).flatmap(
        lambda indexes: st.tuples(*(containers(i) for i in indexes))
    )
)
def test_any_labels_never_raise_and_every_running_container_is_placed_or_rejected(snapshots):
    state = desired_state(snapshots)
    compile_rules(state)  # whatever the labels, the daemon's next stage accepts the result
    routed = {b.container_id for f in state.frontends.values() for b in f.backends}
    rejected = {r.container_id for r in state.rejections}
    assert not routed & rejected
    for container in snapshots:
        if container.running and container.id not in rejected:
            spec = parse_backend(container)  # valid: parsed
            assert spec.frontend_port in state.frontends
            assert (container.id in routed) == container.serving
        elif container.id in rejected:
            reason = next(r for r in state.rejections if r.container_id == container.id)
            assert reason.reason and reason.detail
        else:
            assert container.id not in routed


def remote(labels: dict[str, str], published: dict[int, int], index: int = 1) -> ContainerSnapshot:
    """A container of another host (engines mode, a Swarm task): reached at its node's address."""
    return snapshot(
        labels, index, networks={}, node="node2", host_address="198.18.99.12", published_tcp_ports=published
    )


def test_a_remote_container_is_reached_at_its_host_address_and_published_port():
    spec = parse_backend(remote({"tcp.port": "27017"}, {1234: 32769}))
    backend = spec.backend
    assert (backend.ip, backend.port, backend.node, backend.subnet) == ("198.18.99.12", 32769, "node2", None)
    chosen = parse_backend(remote({"tcp.port": "27017", "tcp.backend_port": "8080"}, {1234: 32769, 8080: 32770}))
    assert chosen.backend.port == 32770


@pytest.mark.parametrize(
    ("labels", "published", "reason"),
    [
        ({"tcp.port": "80"}, {}, "not_published"),
        ({"tcp.port": "80", "tcp.backend_port": "9090"}, {1234: 32769}, "not_published"),
        ({"tcp.port": "80"}, {1234: 32769, 8080: 32770}, "ambiguous_backend_port"),
    ],
)
def test_a_remote_container_must_publish_the_port_it_is_reached_on(labels, published, reason):
    with pytest.raises(LabelError) as error:
        parse_backend(remote(labels, published))
    assert error.value.reason == reason
    assert "publish" in error.value.detail


def test_unreachable_backends_leave_the_rotation_and_the_frontend_stays():
    state = desired_state([remote({"tcp.port": "80"}, {1234: 32769}, 1), snapshot({"tcp.port": "80"}, 2)])
    assert [b.name for b in reachable_only(state, {("198.18.99.12", 32769)}).frontends[80].backends] == ["c2"]
    assert reachable_only(state, set()) is state


def test_a_remote_host_without_an_ipv4_address_is_rejected_not_written():
    for address in ("fd00::12", "node2.example", "0.0.0.0x"):
        container = remote({"tcp.port": "80"}, {1234: 32769})
        with pytest.raises(LabelError) as error:
            parse_backend(dataclasses.replace(container, host_address=address))
        assert error.value.reason == "no_address"


def test_the_rotation_is_ordered_by_creation_time_not_by_its_text():
    """Docker trims trailing zeros of the fraction: as strings "10:00:00.5Z" sorts before "10:00:00.123Z"."""
    later = snapshot({"tcp.port": "80"}, 1, created=timestamp_ns("2026-11-27T10:00:00.5Z"))
    earlier = snapshot({"tcp.port": "80"}, 2, created=timestamp_ns("2026-11-27T10:00:00.123456789Z"))
    elsewhere = snapshot({"tcp.port": "80"}, 3, created=timestamp_ns("2026-11-27T11:00:00.3+01:00"))  # 10:00:00.3 UTC
    assert [b.name for b in desired_state([later, earlier, elsewhere]).frontends[80].backends] == ["c2", "c3", "c1"]


ATTACHED = {"front": "172.18.0.2", "lan": "192.168.77.2", "mesh": "10.0.1.2"}


@pytest.mark.parametrize("driver", ["overlay", "macvlan", "ipvlan"])
def test_a_container_only_on_networks_the_host_cannot_route_to_is_rejected(driver: str):
    only = snapshot({"tcp.port": "80"}, networks={"lan": "192.168.77.2"}, network_drivers={"lan": driver})
    state = desired_state([only, snapshot({"tcp.port": "80"}, 2)])
    assert [(r.name, r.reason) for r in state.rejections] == [("c1", "network_unroutable")]
    assert f"lan ({driver})" in state.rejections[0].detail
    assert [b.name for b in state.frontends[80].backends] == ["c2"]  # the other backend still routes


def test_a_host_routable_network_is_chosen_over_unroutable_ones():
    drivers = {"front": "bridge", "lan": "macvlan", "mesh": "overlay"}
    spec = parse_backend(snapshot({"tcp.port": "80"}, networks=ATTACHED, network_drivers=drivers))
    assert spec.backend.ip == "172.18.0.2"
    networks = {"a-lan": "192.168.77.2", "b-front": "172.18.0.2"}  # the unroutable one sorts first
    drivers = {"a-lan": "macvlan", "b-front": "bridge"}
    assert parse_backend(snapshot({"tcp.port": "80"}, networks=networks, network_drivers=drivers)).backend.ip == (
        "172.18.0.2"
    )


def test_a_network_label_naming_an_unroutable_network_is_rejected():
    drivers = {"front": "bridge", "lan": "macvlan", "mesh": "overlay"}
    with pytest.raises(LabelError) as error:
        parse_backend(snapshot({"tcp.port": "80", "tcp.network": "lan"}, networks=ATTACHED, network_drivers=drivers))
    assert error.value.reason == "network_unroutable" and "macvlan" in error.value.detail


def test_a_network_of_an_unknown_driver_is_routed():
    spec = parse_backend(snapshot({"tcp.port": "80"}, networks={"x": "10.1.0.2"}, network_drivers={"x": "weave"}))
    assert spec.backend.ip == "10.1.0.2"
    assert parse_backend(snapshot({"tcp.port": "80"}, networks={"x": "10.1.0.2"})).backend.ip == "10.1.0.2"


def test_gateway_mode_ignores_the_drivers_of_a_remote_containers_networks():
    container = dataclasses.replace(
        remote({"tcp.port": "80"}, {1234: 32769}), networks={"mesh": "10.0.1.2"}, network_drivers={"mesh": "overlay"}
    )
    assert parse_backend(container).backend.endpoint == ("198.18.99.12", 32769)


@given(
    st.dictionaries(st.sampled_from(["bridge", "backend", "front", "b2"]), st.sampled_from(["", "10.0.0.2", "fd00::2"]))
)
def test_a_snapshots_addresses_read_as_the_map_it_was_given(networks: dict[str, str]):
    snapshot = ContainerSnapshot("c" * 64, "c", "2026-01-01T00:00:00Z", {}, True, networks=networks, networks6=networks)
    for kept in (snapshot.networks, snapshot.networks6):
        assert kept == networks and networks == kept and dict(kept) == networks and len(kept) == len(networks)
        assert list(kept) == list(networks) and all(kept[n] == a and n in kept for n, a in networks.items())
        assert kept.get("absent") is None and "absent" not in kept
        with pytest.raises(KeyError):
            kept["absent"]
    assert dataclasses.replace(snapshot, draining=True).networks == snapshot.networks
