"""Host settings that tcprouter's rules need, set while the rules exist and given back by `cleanup`.

- net.ipv4.conf.all.route_localnet=1 for --route-localhost. It lets other machines reach the host's 127.0.0.1
  services (CVE-2020-8558), so it must not outlive the rules.
- net.netfilter.nf_conntrack_tcp_loose=0 while a frontend has synproxy: with 1, conntrack takes the client's ACK
  for an existing connection, so SYNPROXY never sees it and the handshake fails. 0 also stops conntrack
  picking up the host's connections it did not see start (after a conntrack flush, say).

The value found before tcprouter set one is recorded in the kernel, in the comment of a TCPR-INPUT rule that
exists exactly while the setting is needed (compiler.LOCALNET_RECORD, compiler.TCP_LOOSE_RECORD): it survives
a restart of the daemon or the re-creation of its container, and `cleanup` (or a daemon that no longer needs
it) reads it back. /proc/sys/net is per network namespace: these act on the caller's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .compiler import INPUT_CHAIN, LOCALNET_RECORD, TCP_LOOSE_RECORD, Tables, rule_comment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordedSysctl:
    name: str  # as sysctl(8) spells it
    wanted: int
    record: str  # the prefix of the comment that records the earlier value
    purpose: str  # what the wanted value is for
    without: str  # what goes missing while it cannot be set
    risk: str  # why the earlier value must come back
    root: Path = Path("/proc/sys")

    @property
    def path(self) -> Path:
        return self.root.joinpath(*self.name.split("."))

    def recorded(self, tables: Tables) -> int | None:
        """The value found before tcprouter set it, as the kernel's TCPR-INPUT rules record it."""
        for rule in tables.get("filter", {}).get(INPUT_CHAIN, ()):
            comment = rule_comment(rule) or ""
            value = comment.removeprefix(self.record)
            if comment.startswith(self.record) and value.isdecimal():
                return int(value)
        return None

    def take(self, tables: Tables) -> int | None:
        """Set the wanted value; the value to record (an earlier run's record first), None if it cannot be set."""
        before = self.recorded(tables)
        try:
            current = int(self.path.read_text())
            if current != self.wanted:
                self.path.write_text(str(self.wanted))
                log.info("set %s=%d (was %d) %s", self.name, self.wanted, current, self.purpose)
        except OSError as error:
            log.error(
                "cannot set %s=%d (%s): %s; set it on the host (sysctl -w %s=%d) and restart tcprouter",
                self.name,
                self.wanted,
                error,
                self.without,
                self.name,
                self.wanted,
            )
            return None
        return current if before is None else before

    def give_back(self, tables: Tables) -> bool:
        """Restore the value recorded in the kernel's rules, if any; False if it could not be written."""
        before = self.recorded(tables)
        if before is None:
            return True
        try:
            if int(self.path.read_text()) != before:
                self.path.write_text(str(before))
                log.info("restored %s=%d, its value before tcprouter", self.name, before)
        except OSError as error:
            log.error(
                "cannot restore %s=%d (%s): set it on the host (sysctl -w %s=%d), since %s",
                self.name,
                before,
                error,
                self.name,
                before,
                self.risk,
            )
            return False
        return True


ROUTE_LOCALNET = RecordedSysctl(
    "net.ipv4.conf.all.route_localnet",
    1,
    LOCALNET_RECORD,
    purpose="to route connections to 127.0.0.1",
    without="connections to 127.0.0.1 are not routed",
    risk="1 exposes 127.0.0.1 services (CVE-2020-8558)",
)
TCP_LOOSE = RecordedSysctl(
    "net.netfilter.nf_conntrack_tcp_loose",
    0,
    TCP_LOOSE_RECORD,
    purpose="for SYNPROXY",
    without="SYN-flood protection (synproxy) is off",
    risk="0 stops conntrack picking up connections it did not see start",
)
RECORDED = (ROUTE_LOCALNET, TCP_LOOSE)
