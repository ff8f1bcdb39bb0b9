"""The assumptions iptc_adapter makes about python-iptables' internals, checked on the installed release.

A failure here means a python-iptables upgrade changed something the libiptc writer relies on beyond
the library's public API: read iptc_adapter's docstring for the item named in the test.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tcprouter import iptc_adapter
from tcprouter.iptc_writer import ScriptError, build_rule

from .support import REPO, in_netns, private_netns, sh

iptc = iptc_adapter.load()


def test_load_finds_the_extensions_without_xtables_libdir_and_leaves_the_environment_as_it_was():
    """python-iptables reads XTABLES_LIBDIR at import only: extensions load after the variable is gone."""
    program = (
        "import os\n"
        "from tcprouter import iptc_adapter\n"
        "iptc = iptc_adapter.load()\n"
        "assert 'XTABLES_LIBDIR' not in os.environ, os.environ['XTABLES_LIBDIR']\n"
        "rule = iptc_adapter.rule_class(iptc)()\n"
        "match = iptc.Match(rule, 'statistic')\n"
        "match.set_parameter('mode', ['nth'])\n"
        "target = iptc.Target(rule, 'CONNMARK')\n"
        "target.set_parameter('set-xmark', ['0x1/0x1'])\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "XTABLES_LIBDIR"}
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=REPO, env=env, check=False
    )
    assert done.returncode == 0, done.stderr


def _nth(check) -> bytes:
    """The statistic match structure for `--mode nth --every 3 --packet 1` after `check(match)`."""
    match = iptc.Match(iptc_adapter.rule_class(iptc)(), "statistic")
    for option, value in (("mode", "nth"), ("every", "3"), ("packet", "1")):
        match.set_parameter(option, [value])
    check(match)
    return bytes(match.match_buf)


def test_final_check_fills_what_the_public_final_check_fills():
    """The extension's own check derives fields (statistic: the counter starts at --packet): without it
    the kernel would get a different rotation; the public final_check() gets the same structure."""
    ours = _nth(iptc_adapter.final_check)
    assert ours == _nth(lambda match: match.final_check())
    assert ours != _nth(lambda match: None)


@pytest.mark.parametrize(
    "spec",
    [
        "-m statistic --mode nth --every 3 --packet 5 -j ACCEPT",  # packet must be below every
        "-p tcp -j MARK",  # MARK needs one of its --*-mark options
    ],
)
def test_final_check_refuses_options_the_extension_refuses(spec: str):
    with pytest.raises(ScriptError, match="fcheck"):
        build_rule(iptc, spec, lambda chain: False)


def test_a_target_looks_chains_up_in_the_rules_tables():
    """python-iptables' Target asks `rule.tables` whether its name is a chain: what rule_class disables.
    If this fails, the library no longer does that and rule_class's override can go."""
    asked: list[str] = []

    class Recording(iptc.Rule):  # type: ignore[name-defined,misc]
        @property
        def tables(self) -> list:
            asked.append("tables")
            return []

    iptc.Target(Recording(), "CONNMARK")
    assert asked


@pytest.mark.kernel
def test_building_a_rule_with_a_target_extension_creates_no_table():
    """With python-iptables' own Rule this creates every legacy table and calls libiptc on the cached
    handles, closed after each write of the writer (a crash)."""
    with private_netns() as ns:

        def build() -> str:
            rule = build_rule(iptc, "-p tcp -j CONNMARK --set-xmark 0x1/0x1", lambda chain: False)
            assert rule.target.name == "CONNMARK"
            with open("/proc/thread-self/net/ip_tables_names") as names:  # the legacy tables of this namespace
                return names.read()

        assert in_netns(ns, build) == ""


@pytest.mark.kernel
def test_a_commit_after_another_writers_change_is_a_conflict_and_other_failures_are_not():
    """The kernel refuses a commit on a table changed since it was read (EAGAIN); python-iptables says
    so only in the error's text."""
    with private_netns() as ns:

        def race() -> tuple[Exception, Exception]:
            table = iptc.Table("filter", autocommit=False)
            try:
                table.refresh()
                with pytest.raises(iptc.IPTCError) as missing:
                    table.delete_chain("TCPR-MISSING")
                table.create_chain("TCPR-RACED")
                sh("ip", "netns", "exec", ns, "iptables-legacy", "-w", "-I", "FORWARD", "-j", "DROP")
                with pytest.raises(iptc.IPTCError) as raced:
                    table.commit()
                return raced.value, missing.value
            finally:
                table.close()

        raced, missing = in_netns(ns, race)
        assert iptc_adapter.is_conflict(raced), raced
        assert not iptc_adapter.is_conflict(missing), missing
        assert "TCPR-RACED" not in sh("ip", "netns", "exec", ns, "iptables-legacy-save")
