"""net.ipv4.conf.all.route_localnet: set to 1 for --route-localhost, given back by `cleanup`.

route_localnet=1 lets other machines reach the host's 127.0.0.1 services (CVE-2020-8558), so it must not
outlive the rules. The value found before tcprouter set it is recorded in the kernel, in the comment of the
TCPR-INPUT rule (compiler.LOCALNET_RECORD): it lives exactly as long as the rules do, survives a restart of
the daemon or the re-creation of its container, and `cleanup` (or a `run` without --route-localhost) reads
it back. /proc/sys/net is per network namespace: these functions act on the caller's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .compiler import INPUT_CHAIN, LOCALNET_RECORD, Tables, rule_comment

log = logging.getLogger(__name__)
ROUTE_LOCALNET = Path("/proc/sys/net/ipv4/conf/all/route_localnet")


def recorded(tables: Tables) -> int | None:
    """The value route_localnet had before tcprouter set it, as the kernel's TCPR-INPUT rule records it."""
    for rule in tables.get("filter", {}).get(INPUT_CHAIN, ()):
        comment = rule_comment(rule) or ""
        value = comment.removeprefix(LOCALNET_RECORD)
        if comment.startswith(LOCALNET_RECORD) and value.isdecimal():
            return int(value)
    return None


def take(tables: Tables) -> int | None:
    """Set route_localnet=1; the value to record (an earlier run's record first), None if it cannot be set."""
    before = recorded(tables)
    try:
        current = int(ROUTE_LOCALNET.read_text())
        if current != 1:
            ROUTE_LOCALNET.write_text("1")
            log.info("set net.ipv4.conf.all.route_localnet=1 (was %d) to route connections to 127.0.0.1", current)
    except OSError as error:
        log.error(
            "cannot set net.ipv4.conf.all.route_localnet=1 (%s): connections to 127.0.0.1 are not routed; "
            "set it on the host (sysctl -w net.ipv4.conf.all.route_localnet=1) and restart tcprouter",
            error,
        )
        return None
    return current if before is None else before


def give_back(tables: Tables) -> bool:
    """Restore the value recorded in the kernel's rules, if any; False if it could not be written."""
    before = recorded(tables)
    if before is None:
        return True
    try:
        if int(ROUTE_LOCALNET.read_text()) != before:
            ROUTE_LOCALNET.write_text(str(before))
            log.info("restored net.ipv4.conf.all.route_localnet=%d, its value before tcprouter", before)
    except OSError as error:
        log.error(
            "cannot restore net.ipv4.conf.all.route_localnet=%d (%s): set it on the host "
            "(sysctl -w net.ipv4.conf.all.route_localnet=%d), since 1 exposes 127.0.0.1 services (CVE-2020-8558)",
            before,
            error,
            before,
        )
        return False
    return True
