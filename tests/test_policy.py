"""Who may claim a port: --ports, pool ownership, --internal networks, ports the host already uses (pure parts)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcprouter.compiler import compile_rules
from tcprouter.hostports import busy_ports, docker_published_ports, parse_listeners
from tcprouter.labels import desired_state, parse_backend
from tcprouter.model import ContainerSnapshot
from tcprouter.policy import COMPOSE_OWNER_LABEL, Policy, parse_ports

from .strategies import container, containers

OWNED = Policy(owner_label=COMPOSE_OWNER_LABEL)


def project(i: int, name: str | None, port: int = 80, extra: dict[str, str] | None = None) -> ContainerSnapshot:
    """Container c<i> (created <i> s into 2026) claiming `port`, of Compose project `name` (None: no label)."""
    owner = {} if name is None else {COMPOSE_OWNER_LABEL: name}
    return container(i, labels={"tcp.port": str(port), **owner, **(extra or {})})


def rejected(state) -> dict[str, str]:
    return {r.name: r.reason for r in state.rejections}


def pools(state) -> dict[int, list[str]]:
    return {port: [b.name for b in f.backends] for port, f in state.frontends.items()}


# ---- --ports ----------------------------------------------------------------------------------------------------


def test_port_sets_parse_ports_and_ranges_and_print_back():
    allowed = parse_ports("1883, 8000-8100,27017")
    assert [p in allowed for p in (1883, 7999, 8000, 8100, 8101, 27017, 27018)] == [1, 0, 1, 1, 0, 1, 0]
    assert str(allowed) == "1883,8000-8100,27017"


@pytest.mark.parametrize("text", ["", "0", "65536", "80-", "-80", "8100-8000", "http", "80,,81", "1e3"])
def test_a_port_set_that_is_not_ports_or_ranges_is_an_error(text: str):
    with pytest.raises(ValueError, match="port"):
        parse_ports(text)


def test_a_port_outside_the_policy_is_rejected_and_the_others_are_routed():
    policy = Policy(allowed_ports=parse_ports("8000-8100"))
    state = desired_state([project(1, None, 8080), project(2, None, 9000)], policy=policy)
    assert pools(state) == {8080: ["c1"]}
    [refused] = state.rejections
    assert (refused.name, refused.reason) == ("c2", "port_not_allowed")
    assert "tcp.port=9000" in refused.detail and "--ports 8000-8100" in refused.detail


# ---- ownership --------------------------------------------------------------------------------------------------


def test_a_frontend_belongs_to_its_oldest_backends_owner_and_a_rogue_never_joins():
    rogue = project(9, "rogue", extra={"tcp.weight": "100"})
    state = desired_state([rogue, project(2, "shop"), project(3, "shop")], policy=OWNED)
    assert pools(state) == {80: ["c2", "c3"]}
    [refused] = state.rejections
    assert (refused.name, refused.reason) == ("c9", "port_owned")
    assert "'shop'" in refused.detail and "'rogue'" in refused.detail and "c2" in refused.detail


def test_containers_without_the_owner_label_are_an_owner_of_their_own():
    state = desired_state([project(1, None), project(2, None), project(3, "shop")], policy=OWNED)
    assert pools(state) == {80: ["c1", "c2"]}
    assert rejected(state) == {"c3": "port_owned"}
    assert "unset" in state.rejections[0].detail


def test_without_an_owner_label_any_container_joins():
    state = desired_state([project(1, "a"), project(2, "b")], policy=Policy(owner_label=""))
    assert pools(state) == {80: ["c1", "c2"]} and not state.rejections


def test_an_owner_that_is_not_serving_still_owns_its_frontend():
    """An unhealthy (or starting) oldest backend keeps its frontend: a rogue cannot take it while it restarts."""
    owner = dataclasses.replace(project(1, "shop"), health="unhealthy")
    state = desired_state([owner, project(2, "rogue")], policy=OWNED)
    assert pools(state) == {80: []} and rejected(state) == {"c2": "port_owned"}


def test_a_rejected_container_owns_nothing():
    """The oldest claimant is rejected (invalid labels, a port the host uses): the oldest valid one owns the port."""
    invalid = project(1, "a", 8080, extra={"tcp.weight": "0"})
    assert pools(desired_state([invalid, project(2, "b", 8080)], policy=OWNED)) == {8080: ["c2"]}
    squatter = desired_state([project(1, "a", 22), project(2, "b", 22)], busy_ports={22: "sshd"}, policy=OWNED)
    assert rejected(squatter) == {"c1": "port_in_use", "c2": "port_in_use"}


owners = st.sampled_from([None, "a", "b", "c"])
fleets = st.lists(st.tuples(owners, st.sampled_from([80, 81])), min_size=1, max_size=8).map(
    lambda claims: [project(i, owner, port) for i, (owner, port) in enumerate(claims)]
)


@given(fleets, st.randoms())
def test_ownership_is_the_same_whatever_the_listing_order_and_each_pool_has_one_owner(fleet, random):
    shuffled = list(fleet)
    random.shuffle(shuffled)
    state = desired_state(fleet, policy=OWNED)
    assert desired_state(shuffled, policy=OWNED) == state
    by_id = {c.id: c for c in fleet}
    for port, frontend in state.frontends.items():
        claimants = sorted((c for c in fleet if c.labels["tcp.port"] == str(port)), key=lambda c: c.age_order)
        owner = OWNED.owner(claimants[0].labels)
        # every backend is of the oldest claimant's owner; every claimant of another owner is rejected port_owned
        assert {OWNED.owner(by_id[b.container_id].labels) for b in frontend.backends} == {owner}
        others = {c.name for c in claimants if OWNED.owner(c.labels) != owner}
        assert all(rejected(state)[name] == "port_owned" for name in others)
        assert not others & set(pools(state)[port])


@given(
    st.lists(st.integers(min_value=0, max_value=59), max_size=6, unique=True).flatmap(
        lambda indexes: st.tuples(*(st.tuples(containers(i), owners) for i in indexes))
    )
)
def test_with_a_policy_every_running_container_is_still_placed_or_rejected(claims):
    fleet = [dataclasses.replace(c, labels={**c.labels, COMPOSE_OWNER_LABEL: o} if o else c.labels) for c, o in claims]
    policy = Policy(allowed_ports=parse_ports("1-1000,8080"), owner_label=COMPOSE_OWNER_LABEL)
    state = desired_state(fleet, policy=policy)
    compile_rules(state)
    routed = {b.container_id: port for port, f in state.frontends.items() for b in f.backends}
    rejected_ids = {r.container_id for r in state.rejections}
    assert not set(routed) & rejected_ids
    for snapshot in fleet:
        if snapshot.running and snapshot.id not in rejected_ids:
            port = parse_backend(snapshot).frontend_port
            assert port in policy.allowed_ports and port in state.frontends
            assert (routed.get(snapshot.id) == port) == snapshot.serving
    for frontend in state.frontends.values():
        assert len({policy.owner(c.labels) for c in fleet if routed.get(c.id) == frontend.port}) <= 1


# ---- --internal networks ----------------------------------------------------------------------------------------


def test_a_container_only_on_an_internal_network_is_rejected():
    only = container(1, internal_networks=frozenset({"bridge"}))
    state = desired_state([only])
    assert rejected(state) == {"c1": "network_internal"}
    assert "internal" in state.rejections[0].detail and "bridge" in state.rejections[0].detail


def test_a_container_also_on_a_routable_network_is_routed_there_unless_its_label_names_the_internal_one():
    networks = {"backend": "10.8.0.2", "front": "10.9.0.2"}
    both = container(1, networks=networks, internal_networks=frozenset({"backend"}))
    assert [b.ip for b in desired_state([both]).frontends[80].backends] == ["10.9.0.2"]
    named = dataclasses.replace(both, labels={"tcp.port": "80", "tcp.network": "backend"})
    assert rejected(desired_state([named])) == {"c1": "network_internal"}


# ---- ports the host already uses --------------------------------------------------------------------------------

# iptables-save's nat DOCKER chain on a host where `docker run -p 8080:80` and `-p 127.0.0.1:5432:5432` run
DOCKER_CHAIN = (
    "-i docker0 -j RETURN",
    "! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.3:80",
    "-d 127.0.0.1/32 ! -i docker0 -p tcp -m tcp --dport 5432 -j DNAT --to-destination 172.17.0.4:5432",
    "! -i docker0 -p udp -m udp --dport 53 -j DNAT --to-destination 172.17.0.5:53",
)


def test_dockers_published_tcp_ports_are_read_from_its_nat_chain():
    assert docker_published_ports(DOCKER_CHAIN) == {8080: "172.17.0.3:80", 5432: "172.17.0.4:5432"}
    assert docker_published_ports(()) == {}


def test_a_port_docker_publishes_is_refused_as_in_use():
    used = busy_ports(DOCKER_CHAIN)
    state = desired_state([project(1, None, 8080)], busy_ports=used)
    assert rejected(state) == {"c1": "port_in_use"}
    assert "Docker publishes it" in state.rejections[0].detail and "172.17.0.3:80" in state.rejections[0].detail


PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   100        0 1 1
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
"""
PROC_NET_TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:0 0 0
"""


def test_loopback_listeners_count_only_when_127_0_0_1_is_routed():
    assert parse_listeners(PROC_NET_TCP) == {22: "0.0.0.0"}
    assert parse_listeners(PROC_NET_TCP, loopback=True) == {5432: "127.0.0.1", 22: "0.0.0.0"}
    assert parse_listeners(PROC_NET_TCP6, loopback=True) == {}  # [::1]:8080: 127.0.0.1:8080 is free
