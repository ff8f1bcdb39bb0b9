"""The nftables nat layout, as pure functions (the kernel's side: test_kernel_nftnat.py)."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from tcprouter.compiler import DEFAULT_MARK_BIT, Options, access_bit, rotation
from tcprouter.model import Access, Backend, Balance, DesiredState, Frontend, Protocol
from tcprouter.nftnat import (
    GROUPS,
    TABLES,
    Slot,
    group_of,
    nat_pool,
    nat_pools,
    pick_chain,
    ruleset_text,
    table_names,
    table_of,
    table_parts,
)

from .strategies import desired_states

A = Backend("a" * 64, "web-a", "10.0.0.2", 80)
B = Backend("b" * 64, "web-b", "10.0.0.3", 80, weight=2)
C = Backend("c" * 64, "web-c", "10.0.0.4", 8080)


def test_round_robin_slots_follow_the_compiler_s_rotation_and_random_ones_the_weights():
    pool = nat_pool(Frontend(80, Balance.ROUNDROBIN, (A, B, C)))
    assert [(s.address, s.port) for s in pool.slots] == [(b.ip, b.port) for b in rotation((A, B, C))]
    assert not pool.random
    random = nat_pool(Frontend(80, Balance.RANDOM, (A, B)))
    assert random.random and [s.name for s in random.slots] == ["web-a", "web-b", "web-b"]


def test_a_backend_s_own_connections_go_to_the_first_other_slot_and_a_lone_backend_s_are_not_routed():
    pool = nat_pool(Frontend(80, Balance.ROUNDROBIN, (A, B)))
    first = pool.slots[0]
    assert dict(pool.fallbacks) == {
        "10.0.0.3": next(s for s in pool.slots if s.address != "10.0.0.3"),
        "10.0.0.2": first if first.address != "10.0.0.2" else pool.slots[1],
    }
    assert pool.unrouted == ()
    lone = nat_pool(Frontend(80, Balance.ROUNDROBIN, (A,)))
    assert lone.fallbacks == () and lone.unrouted == ("10.0.0.2",)


def test_frontends_with_access_labels_are_in_set_access_whose_rule_adds_the_access_bit_to_the_mark():
    plain = nat_pool(Frontend(80, Balance.ROUNDROBIN, (A,)))
    guarded = nat_pool(Frontend(81, Balance.ROUNDROBIN, (A,), Access(maxconn=5)))
    assert not plain.access and guarded.access
    text = ruleset_text([plain, guarded], Options(), [table_of(80), table_of(81)])
    assert "elements = { tcp . 81 }" in _tables(text)[table_of(81)].split("set access", 1)[1].split("}", 1)[0] + "}"
    assert f"ct mark set ct mark | {DEFAULT_MARK_BIT:#010x}\n" in text
    assert f"meta l4proto . th dport @access ct mark set ct mark | {access_bit(DEFAULT_MARK_BIT):#010x}" in text


def test_names_that_nft_strings_cannot_hold_are_made_safe():
    odd = Backend("d" * 64, 'web "d"', "10.0.0.5", 80)
    assert nat_pool(Frontend(80, Balance.ROUNDROBIN, (odd,))).slots == (Slot("10.0.0.5", 80, "web__d_"),)


def _tables(text: str) -> dict[str, str]:
    """table name -> its declared content (the last declaration: the one after its delete)."""
    return dict(re.findall(r"^table ip (\S+) \{\n(.*?)^\}$", text, re.MULTILINE | re.DOTALL))


@given(desired_states(udp=True))
def test_every_routed_frontend_is_dispatched_once_in_its_port_s_table_and_empty_pools_nowhere(state: DesiredState):
    options = Options()
    text = ruleset_text(nat_pools(state, options).values(), options)
    tables = _tables(text)
    assert len(tables) == TABLES and text.count("\ndelete table ip ") + text.startswith("delete") == TABLES
    for frontend in state.every_frontend():
        name = f"{frontend.protocol}-{frontend.port}"
        rule = f"th dport {frontend.port} meta l4proto {frontend.protocol} dnat ip to "
        holding = [table for table, body in tables.items() if f'map @slots-{name} comment "{name}"' in body]
        assert holding == ([table_of(frontend.port)] if frontend.backends else [])
        if frontend.backends:
            chain = tables[holding[0]].split(f"chain {pick_chain(frontend.port)} {{", 1)[1].split("}", 1)[0]
            assert rule in chain and f"{frontend.protocol} . {frontend.port}" in tables[holding[0]]


@given(desired_states(udp=True), st.integers(1, TABLES + 3))
def test_a_load_in_parts_takes_each_table_once_with_its_pools(state: DesiredState, parts: int):
    options = Options()
    pools = nat_pools(state, options)
    groups = list(table_parts(state, options, parts))
    assert len(groups) == min(parts, TABLES)
    assert sorted(name for names, _ in groups for name in names) == sorted(table_names())
    assert all(table_of(pool.port) in names for names, members in groups for pool in members)
    assert sorted(pool.name for _, members in groups for pool in members) == sorted(p.name for p in pools.values())
    assert [pool for _, members in groups for pool in members if pool != pools[(pool.protocol, pool.port)]] == []


def test_udp_frontends_match_their_protocol_before_the_nat():
    pools = nat_pools(
        DesiredState({}, udp_frontends={5683: Frontend(5683, Balance.ROUNDROBIN, (A,), protocol=Protocol.UDP)}),
        Options(),
    )
    text = ruleset_text(pools.values(), Options())
    assert "th dport 5683 meta l4proto udp dnat ip to numgen inc mod 1 map @slots-udp-5683" in text
    assert "typeof numgen inc mod 1 : ip daddr . udp dport" in text


@given(st.integers(1, 65535))
def test_a_port_s_pick_chain_is_the_one_its_group_bits_go_to(port: int):
    """Chain route goes by `th dport & GROUP_MASK` to map groups' element for those bits: the chain holding the
    frontend's rule. Ports of one table spread over all its pick chains."""
    assert pick_chain(port) == f"pick-{group_of(port) // TABLES}"
    assert {pick_chain(port + n * TABLES) for n in range(GROUPS)} == {f"pick-{n}" for n in range(GROUPS)}
