"""The values route_localnet and nf_conntrack_tcp_loose had before tcprouter set them, as the compiled TCPR-INPUT
rules record them, and how they are taken and given back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tcprouter.compiler import Options, compile_rules
from tcprouter.diff import believed_tables
from tcprouter.model import Backend, Balance, DesiredState, Frontend
from tcprouter.sysctls import ROUTE_LOCALNET, TCP_LOOSE


@pytest.mark.parametrize("before", [0, 1, 2])
def test_the_recorded_value_reads_back(before: int) -> None:
    rules = compile_rules(DesiredState(frontends={}), Options(route_localhost=True, route_localnet_before=before))
    assert ROUTE_LOCALNET.recorded(believed_tables(rules)) == before


def test_no_record_without_route_localhost_or_with_a_foreign_comment() -> None:
    assert ROUTE_LOCALNET.recorded(believed_tables(compile_rules(DesiredState(frontends={}), Options()))) is None
    foreign = {"filter": {"TCPR-INPUT": ('-m comment --comment "route_localnet-before-x" -j DROP',)}}
    assert ROUTE_LOCALNET.recorded(foreign) is None


def synproxy_rules(before: int) -> dict:
    state = DesiredState(
        {80: Frontend(80, Balance.ROUNDROBIN, (Backend("a" * 64, "a", "172.17.0.2", 80),), synproxy=True)}
    )
    return believed_tables(compile_rules(state, Options(route_localhost=True, tcp_loose_before=before)))


@pytest.mark.parametrize("before", [0, 1])
def test_both_records_read_back_side_by_side(before: int) -> None:
    tables = synproxy_rules(before)
    assert (TCP_LOOSE.recorded(tables), ROUTE_LOCALNET.recorded(tables)) == (before, 0)


def test_take_records_the_value_found_and_give_back_restores_it(tmp_path: Path) -> None:
    """On a file standing in for /proc/sys: an earlier run's record wins over the value found (which it set)."""
    loose = dataclasses.replace(TCP_LOOSE, root=tmp_path)
    loose.path.parent.mkdir(parents=True)
    loose.path.write_text("1\n")
    assert loose.take({}) == 1 and loose.path.read_text() == "0"
    assert loose.take(synproxy_rules(1)) == 1  # it finds 0, its own doing: the record says 1
    assert loose.give_back(synproxy_rules(1)) and loose.path.read_text() == "1"
    assert loose.give_back({}) and loose.path.read_text() == "1"  # no record: nothing to give back


def test_take_returns_none_when_the_setting_cannot_be_written(tmp_path: Path) -> None:
    assert dataclasses.replace(TCP_LOOSE, root=tmp_path / "missing").take({}) is None
