"""Pools: the desired state kept per frontend equals labels.desired_state of every container, after any changes."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcprouter.labels import desired_state
from tcprouter.model import PORT_SHARDS, Balance, DesiredState, Frontend, FrozenMap, PortMap, Protocol, shared
from tcprouter.pools import Pools

from .strategies import container, containers

PORTS = st.sampled_from([80, 8080, 443])


def same(held: DesiredState, expected: DesiredState) -> None:
    assert held.frontends == expected.frontends
    assert held.udp_frontends == expected.udp_frontends
    assert sorted(held.rejections, key=str) == sorted(expected.rejections, key=str)
    assert sorted(held.warnings) == sorted(expected.warnings)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 7), st.one_of(st.none(), st.integers(0, 10**6))), min_size=1, max_size=25),
    st.data(),
)
def test_pools_after_any_changes_are_desired_state_of_the_view(steps, data):
    pools, view = Pools("tcp"), {}
    for index, seed in steps:
        if seed is None:
            view.pop(f"{index:064x}", None)
        else:
            drawn = data.draw(containers(index))
            udp = data.draw(st.none() | PORTS.map(str) | st.just("x"))  # a UDP frontend too (or a bad one)
            if udp is not None:
                drawn = dataclasses.replace(drawn, labels={**drawn.labels, "udp.port": udp})
            view[f"{index:064x}"] = drawn
        busy = {p: data.draw(st.dictionaries(PORTS, st.just("sshd"), max_size=1)) for p in Protocol}
        before = pools.state()
        touched = pools.update(pools.changes(view.values()), busy)
        after = pools.state()
        same(after, desired_state(view.values(), "tcp", busy[Protocol.TCP], udp_busy_ports=busy[Protocol.UDP]))
        for protocol in Protocol:
            was, now = before.pools(protocol), after.pools(protocol)
            assert {p for p in was.keys() | now.keys() if was.get(p) != now.get(p)} <= touched


def test_a_change_re_pools_only_its_frontend():
    one, two, three = container(1), container(2), container(3, labels={"tcp.port": "81"})
    pools = Pools("tcp")
    assert pools.update({c.id: c for c in (one, two, three)}, {}) == {80, 81}
    assert pools.changes([one, two, three]) == {}  # the same snapshots: nothing to redo
    assert pools.update({two.id: None}, {}) == {80}
    assert pools.state().frontends[80].backends == desired_state([one]).frontends[80].backends
    assert pools.update({}, {Protocol.TCP: {81: "sshd"}}) == {81}  # the host took port 81
    assert 81 not in pools.state().frontends and [r.reason for r in pools.state().rejections] == ["port_in_use"]
    moved = container(1, labels={"tcp.port": " 81"})  # the same container claims another port
    assert pools.update(pools.changes([moved, three]), {}) == {80, 81}
    same(pools.state(), desired_state([moved, three]))


FRONTEND = Frontend(1, Balance.ROUNDROBIN, ())


@settings(max_examples=200)
@given(st.lists(st.dictionaries(st.integers(1, 65535), st.none() | st.integers(1, 3), max_size=8), max_size=6))
def test_a_port_map_reads_as_the_dict_it_was_made_from_and_shares_what_did_not_change(steps):
    """PortMap.updated, step by step, is a dict updated the same way (None: the port's frontend goes); each step
    copies only the shards of the ports it changes."""
    expected: dict[int, Frontend] = {}
    ports = PortMap()
    for changes in steps:
        frontends = {
            port: None if n is None else dataclasses.replace(FRONTEND, port=port) for port, n in changes.items()
        }
        before, ports = ports, ports.updated(frontends)
        for port, frontend in frontends.items():
            if frontend is None:
                expected.pop(port, None)
            else:
                expected[port] = frontend
        assert ports == expected and dict(ports) == expected and len(ports) == len(expected)
        assert all(ports.get(port) == expected.get(port) for port in range(1, 200))
        touched = {port % PORT_SHARDS for port in changes}
        assert all(
            (mine is theirs) == (index not in touched)
            for index, (mine, theirs) in enumerate(zip(ports._shards, before._shards, strict=True))
        )
    assert "x" not in ports and ports.get("x") is None  # type: ignore[operator]


@given(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=6))
def test_a_shared_map_reads_as_its_dict_is_hashed_by_its_content_and_cannot_change(items: dict[str, str]):
    """What the caches of label readings take as keys: equal maps are one object, or at least hash alike."""
    kept = shared(items)
    assert kept == items and dict(kept) == items
    assert shared(dict(items)) is kept and shared(kept) is kept
    assert hash(FrozenMap(items)) == hash(kept)
    assert copy.deepcopy(kept) == kept and pickle.loads(pickle.dumps(kept)) == kept and copy.copy(kept) == kept
    for change in (lambda m: m.__setitem__("k", "v"), lambda m: m.update(k="v"), lambda m: m.pop("k", None)):
        with pytest.raises(TypeError):
            change(kept)
    assert kept == items
