"""The edge to the kernel: which iptables flavour Docker uses, reading and writing the tables.

The default writer pipes a script into `iptables-restore --noflush`: one atomic commit per call
(all tables in the script), the mechanism kube-proxy uses.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from . import netlink
from .compiler import TABLES, Tables
from .diff import SavedRule, parse_save
from .model import Family
from .nf_tables import NFPROTO_IPV4, NFPROTO_IPV6, NFT_MSG_GETGEN, NFT_MSG_GETTABLE, NFTA_GEN_ID, NFTA_TABLE_NAME
from .nftnat_netlink import NatSocket, delete_tables

log = logging.getLogger(__name__)


class Flavour(StrEnum):
    NFT = "nft"
    LEGACY = "legacy"


class NetfilterError(RuntimeError):
    pass


class Writer(Protocol):
    """What the reconciler and the CLI need from a writer: Iptables (iptables-restore) and
    iptc_writer.IptcWriter (python-iptables, legacy only) both provide it."""

    @property
    def flavour(self) -> Flavour: ...

    def read(self, counters: bool = False) -> tuple[Tables, list[tuple[str, SavedRule]]]:
        """The nat, filter and raw tables as diff.parse_save gives them, and every rule with its packet counter."""
        ...

    def list_chain(self, table: str, chain: str) -> tuple[str, ...] | None:
        """The rule specs of one chain, or None if it does not exist."""
        ...

    def restore(self, script: str) -> None:
        """Apply a diff.restore_script script, atomically per table; NetfilterError if it fails."""
        ...


_PROGRAMS = {Family.IPV4: "iptables", Family.IPV6: "ip6tables"}


@dataclass(frozen=True)
class Iptables:
    """The iptables binaries of one flavour (ip6tables for IPv6), optionally run inside a network namespace."""

    flavour: Flavour
    netns: str | None = None
    timeout: float = 30.0
    family: Family = Family.IPV4

    def _command(self, tool: str, *args: str) -> list[str]:
        base = [f"{_PROGRAMS[self.family]}-{self.flavour}{tool}", *args]
        if self.flavour is Flavour.LEGACY and tool in ("", "-restore"):
            base.insert(1, "-w")  # wait for the xtables lock instead of failing
        return ["ip", "netns", "exec", self.netns, *base] if self.netns else base

    def _run(self, command: list[str], stdin: str | None = None) -> str:
        return _run(command, self.timeout, stdin)

    def save(self, table: str | None = None, counters: bool = False) -> str:
        """`iptables-save` of one table, or of every table that exists (None): the legacy save prints only the
        tables already loaded, and reading one by name would create it (and so a hook on every packet)."""
        return self._run(self._command("-save", *(["-t", table] if table else []), *(["-c"] if counters else [])))

    def read(self, counters: bool = False) -> tuple[Tables, list[tuple[str, SavedRule]]]:
        """The nat, filter and raw tables, from one save of them all: iptables-nft-save fetches the whole ruleset
        whichever table it prints, so one call costs a third of three."""
        tables, rules = parse_save(self.save(counters=counters))
        return {t: tables[t] for t in TABLES if t in tables}, [(t, rule) for t, rule in rules if t in TABLES]

    def list_chain(self, table: str, chain: str) -> tuple[str, ...] | None:
        """The rules of one chain (None if it does not exist): cheaper than a full save."""
        try:
            out = self._run(self._command("", "-t", table, "-S", chain))
        except NetfilterError as error:
            # legacy: "No chain/target/match by that name"; nft (1.8.9): "chain `X' ... is incompatible"
            if any(text in str(error) for text in ("No chain", "does not exist", "is incompatible")):
                return None
            raise
        prefix = f"-A {chain} "
        return tuple(line[len(prefix) :] for line in out.splitlines() if line.startswith(prefix))

    def restore(self, script: str, test: bool = False) -> None:
        if script:
            self._run(self._command("-restore", "--noflush", *(["--test"] if test else [])), stdin=script)


@dataclass(frozen=True)
class Nft:
    """tcprouter's own nftables tables (nftnat.py) in a network namespace (None: this process's), listed and deleted
    over netlink: no tool needed (their content is written by nftnat_netlink)."""

    netns: str | None = None
    timeout: float = 30.0

    def tables(self, family: Family, prefix: str = "") -> list[str]:
        """The names of the nftables tables of `family` that start with `prefix`: a netlink dump of the tables alone
        (the nft tool would fetch every rule of every table first, seconds at 10,000 frontends). NetfilterError if
        it fails."""
        try:
            with netlink.Requester(netlink.NETLINK_NETFILTER, self.netns, self.timeout) as requester:
                kind, payload = netlink.nftables_request(NFT_MSG_GETTABLE, _NFPROTO[family])
                found, _ = requester.ask(kind, payload, netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP)
        except OSError as error:
            raise NetfilterError(f"cannot list the nftables tables: {error}") from error
        attributes = (netlink.attributes(netlink.nftables_attributes(table)) for table in found)
        names = (netlink.text(a.get(NFTA_TABLE_NAME, b"")) for a in attributes)
        return [name for name in names if name.startswith(prefix)]

    def delete(self, family: Family, names: list[str]) -> None:
        """Delete these tables of `family`, in one transaction. NetfilterError if it fails."""
        try:
            with NatSocket(self.netns, self.timeout) as sock:
                sock.send(delete_tables(family, names))
        except OSError as error:
            raise NetfilterError(f"cannot delete the nftables tables: {error}") from error


_NFPROTO = {Family.IPV4: NFPROTO_IPV4, Family.IPV6: NFPROTO_IPV6}


def _run(command: list[str], timeout: float, stdin: str | None = None) -> str:
    """A tool's output; NetfilterError if it cannot run, times out or fails."""
    try:
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NetfilterError(f"{command[0]}: {error}") from error
    if done.returncode != 0:
        raise NetfilterError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def ruleset_generation(netns: str | None = None) -> int:
    """The nf_tables ruleset generation of the namespace (this process's, or `netns`): the kernel counts one per
    committed transaction, whoever commits it (iptables-nft-restore commits once per table of its input), in any
    table of any family. Asking costs one netlink round trip; an unchanged generation means an unchanged ruleset.
    NetfilterError if it cannot be read. The legacy tables have no such count."""
    generation = RulesetGeneration(netns)
    try:
        return generation()
    finally:
        generation.close()


class RulesetGeneration:
    """ruleset_generation, read again and again on one socket, for one thread (the sync runner's, twice a sync): a
    netlink socket's close can take milliseconds (~7 ms in a namespace here), a round trip ~20 us. A failed read
    closes the socket; the next one opens another."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._requester: netlink.Requester | None = None

    def __call__(self) -> int:
        try:
            if self._requester is None:
                self._requester = netlink.Requester(netlink.NETLINK_NETFILTER, self.netns)
            (answer,), _ = self._requester.ask(*netlink.nftables_request(NFT_MSG_GETGEN, 0))
            return netlink.big32_value(netlink.attributes(netlink.nftables_attributes(answer))[NFTA_GEN_ID])
        except (OSError, KeyError, ValueError) as error:
            self.close()
            raise NetfilterError(f"cannot read the nf_tables generation: {error}") from error

    def close(self) -> None:
        if self._requester is not None:
            self._requester.close()
            self._requester = None


def holds_docker_chains(tables: Tables) -> bool:
    return any(chain.startswith("DOCKER") for chains in tables.values() for chain in chains)


def flavours_on_path() -> list[Flavour]:
    """The flavours whose restore and save binaries are on PATH, the one `iptables` points to first."""
    available = [f for f in Flavour if shutil.which(f"iptables-{f}-restore") and shutil.which(f"iptables-{f}-save")]
    if not available:
        return []
    try:
        version = subprocess.run(["iptables", "-V"], capture_output=True, text=True, check=False).stdout
    except OSError:
        version = ""
    default = Flavour.LEGACY if "legacy" in version and Flavour.LEGACY in available else available[0]
    return sorted(available, key=lambda f: f != default)


def docker_chains_in(flavour: Flavour) -> bool:
    """Whether this flavour's tables hold Docker's chains; NetfilterError if they cannot be read."""
    tables, _ = Iptables(flavour, timeout=10).read()
    return holds_docker_chains(tables)


def detect_flavour() -> Flavour:
    """The flavour whose tables hold Docker's chains, looking first where `iptables` points (Docker may have
    left chains in the other flavour's tables when a host was switched); without any, where it points.

    The other flavour is read only when needed: reading the legacy tables creates them."""
    available = flavours_on_path()
    if not available:
        raise NetfilterError("no iptables-nft-restore or iptables-legacy-restore on PATH")
    for flavour in available:
        try:
            if docker_chains_in(flavour):
                log.info("Docker's chains are in the %s tables: writing there", flavour)
                return flavour
        except NetfilterError as error:
            log.warning("cannot read the %s tables: %s", flavour, error)
    log.warning("no Docker chains found in any iptables flavour; using %s", available[0])
    return available[0]


WRITERS = ("auto", "restore", "iptc")


def ipv6_available(flavour: Flavour, docker: bool = True) -> str | None:
    """Why tcprouter's IPv6 rules do not go into the ip6tables of `flavour` here; None if they do: its binaries are
    on PATH and read its tables, and (with `docker`) Docker programs them (`ip6tables` in its daemon.json: its
    chains are there), so that IPv6 is routed where Docker gives containers IPv6, and nowhere else."""
    if not (shutil.which(f"ip6tables-{flavour}-restore") and shutil.which(f"ip6tables-{flavour}-save")):
        return f"ip6tables-{flavour}-restore or ip6tables-{flavour}-save is not on PATH"
    try:
        tables, _ = Iptables(flavour, timeout=10, family=Family.IPV6).read()
    except NetfilterError as error:
        return str(error)
    if docker and not holds_docker_chains(tables):
        return f"Docker's chains are not in the {flavour} ip6tables tables (Docker's ip6tables option is off)"
    return None


def open_writer(kind: str, flavour: Flavour, family: Family = Family.IPV4) -> Writer:
    """The writer asked for: iptables-restore of the flavour, or libiptc on a legacy host. IPv6 rules are always
    written by ip6tables-<flavour>-restore (the libiptc writer is IPv4 only)."""
    if kind not in WRITERS:
        raise NetfilterError(f"unknown writer {kind!r}: choose one of {', '.join(WRITERS)}")
    if family is Family.IPV6:
        return Iptables(flavour, family=family)
    if kind == "iptc":
        if flavour is not Flavour.LEGACY:
            raise NetfilterError(
                f"--writer iptc cannot be used here: python-iptables (libiptc) writes only the legacy tables, "
                f"but this host's rules go to the {flavour} tables (Docker's chains are there, or --flavour says "
                "so); rules written to the other flavour would not route anything. Use --writer restore or auto."
            )
        from .iptc_writer import IptcWriter

        log.info("writer: python-iptables (libiptc) into the legacy tables, one atomic commit per table")
        return IptcWriter()
    if kind == "auto":
        log.info("writer auto: iptables-%s-restore (on a legacy host --writer iptc also works, but is slower)", flavour)
    return Iptables(flavour)
