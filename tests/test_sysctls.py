"""The value route_localnet had before --route-localhost, as the compiled TCPR-INPUT rule records it."""

from __future__ import annotations

import pytest

from tcprouter.compiler import Options, compile_rules
from tcprouter.diff import believed_tables
from tcprouter.model import DesiredState
from tcprouter.sysctls import ROUTE_LOCALNET


@pytest.mark.parametrize("before", [0, 1, 2])
def test_the_recorded_value_reads_back(before: int) -> None:
    rules = compile_rules(DesiredState(frontends={}), Options(route_localhost=True, route_localnet_before=before))
    assert ROUTE_LOCALNET.recorded(believed_tables(rules)) == before


def test_no_record_without_route_localhost_or_with_a_foreign_comment() -> None:
    assert ROUTE_LOCALNET.recorded(believed_tables(compile_rules(DesiredState(frontends={}), Options()))) is None
    foreign = {"filter": {"TCPR-INPUT": ('-m comment --comment "route_localnet-before-x" -j DROP',)}}
    assert ROUTE_LOCALNET.recorded(foreign) is None
