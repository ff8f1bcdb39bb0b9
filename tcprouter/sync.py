"""One sync: the tracker's view -> desired state -> rules -> the smallest write that makes the kernel hold them.

Partial syncs diff against what was last written; full syncs (at start, periodically, on drift, after a
failure) diff against what the kernel really holds. Rules are never flushed first and stay in place when
tcprouter stops. A failed write is retried from a fresh read; if it still fails, the rules in force stay.
Once the rules are written, the conntrack entries of the flows of backends that left are deleted (stale_flows).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from . import hostports
from .compiler import (
    BUCKET_SIZE,
    FORWARD_CHAIN,
    Options,
    RuleSet,
    Synproxy,
    Tables,
    bucket_start,
    compile_rules,
    dispatch_range_size,
    frontend_of,
    is_bucket_chain,
    synproxy_ports,
    tree_protocols,
)
from .diff import believed_tables, hook_in_place, owned, restore_script
from .labels import DEFAULT_UDP_PREFIX, reachable_only
from .metrics import Metrics
from .model import ContainerSnapshot, DesiredState, Frontend, Protocol
from .netfilter import NetfilterError, Nft, Writer
from .nftnat import TABLE_PREFIX, NatPool, nat_pool, table_of
from .nftnat_netlink import NatSocket, change_batch, load_batches, pick_changes
from .pools import Pools
from .sysctls import TCP_LOOSE
from .tracker import Endpoint

T = TypeVar("T")

log = logging.getLogger(__name__)
# A full load of the nat side in nftables: a transaction of 64 / NAT_LOAD_PARTS tables each, each made while the
# kernel commits the last. The first part's making and the last part's commit overlap nothing: 16 parts (4 tables
# each) cut ~0.1 s of 8's ~3 s at 10,000 x 10, 32 gave nothing more (by hand, three runs each).
NAT_LOAD_PARTS = 16
# Deletes the conntrack entries of (protocol, backend endpoints, connection mark bit); returns how many went.
FlowForgetter = Callable[[Protocol, Collection[Endpoint], int], int]


class Syncer:
    def __init__(
        self,
        writer: Writer,
        options: Options,
        prefix: str,
        metrics: Metrics,
        udp_prefix: str = DEFAULT_UDP_PREFIX,
        forget_flows: FlowForgetter | None = None,
        nat_writer: Nft | None = None,
    ) -> None:
        """`nat_writer`: tcprouter's own nftables tables, in its namespace (options.nat_tables: written over netlink;
        without, it deletes those an earlier run left); None: this syncer never touches nftables tables
        (options.nat_tables is off)."""
        self.writer = writer
        self.nat_writer = nat_writer
        self.options = options
        self.prefix = prefix
        self.udp_prefix = udp_prefix
        self.metrics = metrics
        self.forget_flows = forget_flows  # None: conntrack entries are left to time out
        self.applied: Tables | None = None  # what we believe the kernel holds; None: read it first
        self.candidates = DesiredState(frontends={})  # the last desired state, before reachability was applied
        self.state = DesiredState(frontends={})  # the last state written
        self._unreachable: set[Endpoint] = set()  # the endpoints left out of `state`
        self.busy_ports: dict[Protocol, dict[int, str]] = {}  # ports the host already uses (port -> who), last scanned
        self.retired: dict[str, Endpoint] = {}  # container id -> endpoint of TCP backends that left while running
        self.pools = Pools(prefix, options.policy, udp_prefix)  # the desired state, kept per frontend
        self.rules: RuleSet | None = None  # the rules of `state`, as last written
        self._synproxied: set[int] = set()  # the ports of `rules` whose SYNs SYNPROXY answers
        # The state and options the nft tables were last written from (options.nat_tables); None: unknown. A change
        # is written against its pools, recomputed for the ports that changed (not kept: 100,000 slots at 10,000 x 10).
        self._nat_written: tuple[DesiredState, Options] | None = None
        self._nat_sock: NatSocket | None = None
        self._pick_handles: dict[str, int] = {}  # the handles of the frontends' rules in their pick chains, by name
        self.commits = 0  # table commits made by this syncer's writes (one per table of a restore script)
        self.syncs = 0  # successful syncs

    def desired(
        self,
        view: Sequence[ContainerSnapshot],
        full: bool,
        changed: Mapping[str, ContainerSnapshot | None] | None = None,
        tables: Tables | None = None,
    ) -> tuple[DesiredState, set[int]]:
        """The desired state of `view`, and the frontend ports whose part of it may have changed. `changed`: what
        differs from the last call's view (a full sync, or None, compares the whole view). `tables`: the kernel's,
        if just read (Docker's published ports are taken from them)."""
        if full or changed is None:
            changed = self.pools.changes(view)
        if full:
            self.busy_ports = self._scan(tables)
        touched = self.pools.update(changed, self.busy_ports, self.options.policy)
        state = self.pools.state()
        if not full and any(
            p in state.pools(k) and p not in self.candidates.pools(k) for p in touched for k in Protocol
        ):
            # A frontend port appears: is the host using it? (Docker's chain and the listeners, not every event.)
            self.busy_ports = self._scan()
            touched |= self.pools.update({}, self.busy_ports)
            state = self.pools.state()
        return state, touched

    def _scan(self, tables: Tables | None = None) -> dict[Protocol, dict[int, str]]:
        return {p: scan_busy_ports(self.writer, self.options.route_localhost, p, tables) for p in Protocol}

    def sync(
        self,
        view: Sequence[ContainerSnapshot],
        unreachable: Collection[Endpoint] = (),
        full: bool = False,
        causes: Mapping[str | Endpoint, str] | None = None,
        changed: Mapping[str, ContainerSnapshot | None] | None = None,
        read_kernel: bool = True,
    ) -> bool:
        """Write the difference between the desired rules and the kernel (full) or our last write. `changed`:
        the containers that changed since the last call (ChangeTracker.take_changes); None: compare the view.
        A full sync without `read_kernel` (the caller knows the tables are as the last write left them) still
        compares the whole view and rescans the busy ports, but diffs against the last write instead of a read."""
        kind = "full" if full else "partial"
        tables = None
        if full and (read_kernel or self.applied is None):
            try:
                tables = self.writer.read()[0]  # once: the busy ports and the diff both come from this read
            except NetfilterError as error:
                log.warning("cannot read the tables: %s", error)  # the write below reads them again, or fails
        candidates, touched = self.desired(view, full, changed, tables)
        state = reachable_only(candidates, unreachable).of_family(self.options.family)  # this writer's family
        ports: set[int] | None = touched
        if unreachable or set(unreachable) != self._unreachable:
            ports = None  # the verdicts may reach any frontend
        self._unreachable = set(unreachable)
        started = time.perf_counter()
        try:
            for attempt in Retrying(
                stop=stop_after_attempt(3),
                wait=wait_exponential(multiplier=0.05, max=1),
                retry=retry_if_exception_type(NetfilterError),
                before_sleep=_log_retry,
                reraise=True,
            ):
                with attempt:
                    try:
                        if attempt.retry_state.attempt_number > 1:
                            tables = self.writer.read()[0]
                        rules = self._write(state, ports, tables)
                    except NetfilterError:
                        self.applied = self.rules = None  # what a failed write left is unknown: the retry reads it
                        raise
        except NetfilterError as error:
            self.metrics.sync_failures.inc()
            log.error("sync failed, the rules in force stay as they were: %s", error)
            return False
        self.metrics.sync_duration.labels(kind).observe(time.perf_counter() - started)
        self.metrics.last_sync.set_to_current_time()
        log_changes(self.state, state, causes or {}, ports, first=self.syncs == 0)
        self.syncs += 1
        stale, self.retired = stale_flows(self.state, state, self.pools.containers, self.retired, ports)
        self.state, self.candidates = state, candidates
        self._forget(stale)
        self.metrics.state.publish(state, self.options.family)
        if log.isEnabledFor(logging.DEBUG):  # counting 100,000 rules is not free
            log.debug("%s sync: %d owned rules", kind, rules.rule_count())
        return True

    def _forget(self, stale: Mapping[Protocol, Collection[Endpoint]]) -> None:
        """Delete the conntrack entries of the flows that `stale` names; a failure is logged (they time out)."""
        if self.forget_flows is None:
            return
        for protocol, endpoints in stale.items():
            if not endpoints:
                continue
            try:
                deleted = self.forget_flows(protocol, endpoints, self.options.mark_bit)
            except OSError as error:
                log.warning(
                    "could not delete the %s flows of backends that left (they will time out): %s", protocol, error
                )
                continue
            self.metrics.flows_forgotten.labels(str(protocol)).inc(deleted)
            log.log(
                logging.INFO if deleted else logging.DEBUG,
                "deleted %d %s conntrack entries of backends that left (%s)",
                deleted,
                protocol.upper(),
                ", ".join(f"{ip}:{port}" for ip, port in sorted(endpoints)),
            )

    def _write(self, state: DesiredState, ports: set[int] | None, current: Tables | None) -> RuleSet:
        """Write what differs between `state`'s rules and `current` (the kernel's tables, just read), else what
        was last written (then only the chains of the frontends on `ports` are compared; None: every one)."""
        full = current is not None or self.applied is None
        if current is None:
            current = self.applied if self.applied is not None else self.writer.read()[0]
        parent = "DOCKER-USER" if "DOCKER-USER" in current.get("filter", {}) else "FORWARD"
        synproxied = self._synproxied_ports(state, ports)
        options = self._tcp_loose(bool(synproxied), current, dataclasses.replace(self.options, forward_parent=parent))
        rules, touched = self._compile(state, ports, options)
        if full or touched is None:
            script = restore_script(current, rules)
            if (
                current is not self.applied
                and self.applied is not None
                and script != restore_script(self.applied, rules)
            ):
                # The kernel's owned rules are not what the last write left: someone changed them. Counted here,
                # where the repair is written, whichever check or timer found it.
                log.warning("drift: rules changed by someone else are repaired")
                self.metrics.drift_repairs.inc()
        else:
            before = {t: {c: current[t][c] for c in names if c in current.get(t, {})} for t, names in touched.items()}
            after = {
                t: {c: rules.chains[t][c] for c in names if c in rules.chains.get(t, {})}
                for t, names in touched.items()
            }
            script = restore_script(before, RuleSet(chains=after))
        if self.options.nat_tables:  # first: the nft chains take new connections before iptables' nat chains
            self._write_nat(state, None if full or touched is None else ports)
        if script:
            self.writer.restore(script)
            self.commits += script.splitlines().count("COMMIT")
        if not self.options.nat_tables and self.nat_writer and (full or self._nat_written is not None):
            self._drop_nat_tables()  # after: the iptables nat chains took over
        if full or touched is None:
            self.applied = believed_tables(rules)
        else:
            for table, names in touched.items():
                for chain in names:
                    if chain in rules.chains.get(table, {}):
                        self.applied.setdefault(table, {})[chain] = rules.chains[table][chain]  # type: ignore[union-attr]
                    else:
                        self.applied.get(table, {}).pop(chain, None)  # type: ignore[union-attr]
        self.rules, self._synproxied = rules, synproxied
        return rules

    def _write_nat(self, state: DesiredState, ports: set[int] | None) -> None:
        """Bring tcprouter's nftables tables (options.nat_tables) to `state` over netlink (nftnat_netlink): all of
        them, replaced whole in NAT_LOAD_PARTS transactions, when `ports` is None or what they hold is unknown; else
        the objects of the frontends on `ports` whose pools changed, in one transaction (milliseconds)."""
        if self.nat_writer is None:
            raise NetfilterError("the nat side in nftables tables needs a Syncer with a nat_writer (their namespace)")
        written, self._nat_written = self._nat_written, None  # unknown until the write succeeds
        if ports is None or written is None or written[1] != self.options:
            batches = load_batches(state, self.options, NAT_LOAD_PARTS)
            self._pick_handles.clear()  # the rules are new: their handles are read when a change needs them
            self._send_nat(lambda sock: sock.send_each(batches))
            self.commits += NAT_LOAD_PARTS  # a transaction each
            self._nat_written = state, self.options
            return
        messages = []
        for port in ports:
            for protocol in Protocol:
                before, after = (_routed(s.pools(protocol).get(port)) for s in (written[0], state))
                if before != after:
                    handle = self._pick_handle(before) if before is not None and pick_changes(before, after) else None
                    messages += change_batch(before, after, self.options.family, handle)
                    if after is None:
                        self._pick_handles.pop(before.name, None)  # type: ignore[union-attr]
        if messages:
            self._pick_handles.update(self._send_nat(lambda sock: sock.send(messages)))  # one transaction
            self.commits += 1
        self._nat_written = state, self.options

    def _pick_handle(self, pool: NatPool) -> int:
        """The handle of a frontend's rule in its pick chain: as the kernel echoed it when it was added, else read
        (with the others of its chain) once after a full load."""
        if pool.name not in self._pick_handles:
            table = table_of(pool.port)
            self._pick_handles.update(
                self._send_nat(lambda sock: sock.chain_handles(self.options.family, table, pool.pick_chain))
            )
        try:
            return self._pick_handles[pool.name]
        except KeyError:
            self._close_nat_socket()
            raise NetfilterError(f"nftables: no rule of {pool.name} in chain {pool.pick_chain}") from None

    def _send_nat(self, send: Callable[[NatSocket], T]) -> T:
        """Send transactions on the nat socket (or read); NetfilterError if one fails (a change is then retried as a
        full load)."""
        try:
            return send(self._nat_socket())
        except OSError as error:  # TransactionRefused, a timeout: the kernel's tables are reloaded whole
            self._close_nat_socket()
            raise NetfilterError(f"nf_tables refused the nat change: {error}") from error

    def _drop_nat_tables(self) -> None:
        """Delete tcprouter's nftables tables of this family, if an earlier run (options.nat_tables) made any."""
        writer, family = self.nat_writer, self.options.family
        assert writer is not None
        try:
            leftovers = writer.tables(family, TABLE_PREFIX)
        except NetfilterError as error:  # no nf_tables in this kernel: no tables to delete either
            log.debug("no nftables tables of the nat side to look for: %s", error)
            return
        if leftovers:
            writer.delete(family, leftovers)  # a failure is the write's: retried, then reported
            self.commits += 1
            log.info("deleted %d nftables tables of the nat side (now in iptables)", len(leftovers))
        self._nat_written = None

    def _nat_socket(self) -> NatSocket:
        """The netlink socket of the nat writes, opened once (in the writer's namespace)."""
        if self._nat_sock is None:
            self._nat_sock = NatSocket(self.nat_writer.netns if self.nat_writer else None)
        return self._nat_sock

    def _close_nat_socket(self) -> None:
        """After a failed transaction: the next write opens a fresh socket (no stale answers to skip)."""
        if self._nat_sock is not None:
            self._nat_sock.close()
            self._nat_sock = None
            self._pick_handles.clear()  # what the failed transaction left is unknown

    def _synproxied_ports(self, state: DesiredState, ports: set[int] | None) -> set[int]:
        """synproxy_ports of `state`; given the `ports` whose frontends may have changed since the last write, from
        that write's set and those frontends only (not every frontend at every event)."""
        if ports is None or self.rules is None:
            return set(synproxy_ports(state.frontends.values(), self.options))
        changed = [state.frontends[port] for port in ports if port in state.frontends]
        return (self._synproxied - ports) | set(synproxy_ports(changed, self.options))

    def _compile(
        self, state: DesiredState, ports: set[int] | None, options: Options
    ) -> tuple[RuleSet, dict[str, set[str]] | None]:
        """The rules of `state`, and the chains that may differ from the last compiled ones (None: any). Only the
        chains of the frontends on `ports` are compiled again, unless a change reaches the chains every frontend
        shares (their content is the union of every frontend's part: if one frontend's part is the same, so is
        the whole), or nothing was compiled yet for this parent. With a dispatch tree, a change recompiles the
        buckets of `ports` whole (their chains hold every frontend of their range), in the layout of the whole
        state; the tree's upper chains are shared chains (a bucket appearing or emptying changes them), and a
        protocol's dispatch turning from flat to tree or back is a full compile."""
        last = self.rules
        hook = (options.forward_parent, f"-j {FORWARD_CHAIN}")
        trees = _trees(state, options)
        hooked = last is not None and hook in last.hooks.get("filter", ())
        if last is None or ports is None or not hooked or trees != _trees(self.state, options):
            return compile_rules(state, options), None
        if trees:  # a dispatch bucket's chain is its frontends' together: the ports sharing one with a change come too
            ports = {p for start in {bucket_start(port) for port in ports} for p in range(start, start + BUCKET_SIZE)}
        before = compile_rules(_only(self.state, ports), options, trees)
        after = compile_rules(_only(state, ports), options, trees)
        own = {str(port) for port in ports}  # a per-frontend chain's name ends in -<port>
        touched: dict[str, set[str]] = {}
        for table in before.chains.keys() | after.chains.keys():
            old, new = before.chains.get(table, {}), after.chains.get(table, {})
            for chain in old.keys() | new.keys():
                if is_bucket_chain(chain) or chain.rpartition("-")[2] in own:
                    touched.setdefault(table, set()).add(chain)
                elif old.get(chain) != new.get(chain):
                    return compile_rules(state, options), None
        chains = {table: dict(held) for table, held in last.chains.items()}
        for table, names in touched.items():
            for chain in names:
                if chain in after.chains.get(table, {}):
                    chains.setdefault(table, {})[chain] = after.chains[table][chain]
                else:
                    chains.get(table, {}).pop(chain, None)
        return RuleSet(chains=chains, hooks=last.hooks), touched

    @staticmethod
    def _tcp_loose(synproxied: bool, current: Tables, options: Options) -> Options:
        """Synproxy needs nf_conntrack_tcp_loose=0: set it (recording the earlier value) while a frontend
        has synproxy (`synproxied`), give the recorded value back once none has; synproxy is off if it cannot be set."""
        if not synproxied:
            TCP_LOOSE.give_back(current)  # before the rules that record it go
            return options
        before = TCP_LOOSE.take(current)
        if before is None:
            return dataclasses.replace(options, synproxy=Synproxy.OFF)
        return dataclasses.replace(options, tcp_loose_before=before)

    def drifted(self) -> bool:
        """Cheap check of the chains every flow crosses; an edit of a frontend's chain or of the dispatch tree's
        (dozens of chains at 10,000 frontends, one `iptables -S` each) waits for the full resync."""
        if self.applied is None:
            return True
        try:
            for table, chains in self.applied.items():
                for chain, rules in chains.items():
                    if frontend_of(chain) is not None or dispatch_range_size(chain) is not None:
                        continue
                    found = self.writer.list_chain(table, chain)
                    in_place = (
                        found == rules if owned(chain) else found is not None and hook_in_place(chain, found, rules[0])
                    )
                    if not in_place:
                        log.warning("drift: %s chain %s was changed by someone else; resyncing", table, chain)
                        return True
        except NetfilterError as error:
            log.warning("drift check failed: %s", error)
            return True
        return False

    def remote_endpoints(self) -> dict[Endpoint, str]:
        """Every remote backend that should be serving (reachable or not): endpoint -> node, for the prober."""
        return {b.endpoint: b.node for f in self.candidates.frontends.values() for b in f.backends if b.node}


def _trees(state: DesiredState, options: Options) -> frozenset[Protocol]:
    """The protocols whose iptables dispatch is a tree (none when the nat side is in nftables: no dispatch chains)."""
    return frozenset() if options.nat_tables else tree_protocols(state, options.family)


def _only(state: DesiredState, ports: Iterable[int]) -> DesiredState:
    """The frontends of either protocol on `ports`."""
    tcp, udp = ({p: pools[p] for p in ports if p in pools} for pools in (state.frontends, state.udp_frontends))
    return DesiredState(frontends=tcp, udp_frontends=udp)


def stale_flows(
    before: DesiredState,
    after: DesiredState,
    containers: Mapping[str, ContainerSnapshot],
    retired: Mapping[str, Endpoint],
    ports: Iterable[int] | None = None,
) -> tuple[dict[Protocol, set[Endpoint]], dict[str, Endpoint]]:
    """The backend endpoints whose conntrack entries are stale after a sync, per protocol, and the new `retired`.
    Only the frontends on `ports` are looked at if given (the others did not change).

    A UDP backend's as soon as it leaves its pool (stop, die, unhealthy, removed): a datagram flow has no end, and
    its entry would keep sending the client to the backend that left. A TCP backend's only once its container is
    gone (died, removed, not running): a draining or unhealthy one still finishes its connections, so one that
    leaves while running is `retired` until its container is gone (or it comes back).
    """
    if ports is not None:
        before, after = _only(before, ports), _only(after, ports)
    kept = {p: {b.endpoint for f in after.pools(p).values() for b in f.backends} for p in Protocol}
    udp = {b.endpoint for f in before.udp_frontends.values() for b in f.backends} - kept[Protocol.UDP]
    tcp = {b.container_id: b.endpoint for f in before.frontends.values() for b in f.backends} | dict(retired)
    left = {cid: endpoint for cid, endpoint in tcp.items() if endpoint not in kept[Protocol.TCP]}

    def running(cid: str) -> bool:
        return cid in containers and containers[cid].running

    gone = {endpoint for cid, endpoint in left.items() if not running(cid)}
    return {Protocol.TCP: gone, Protocol.UDP: udp}, {cid: e for cid, e in left.items() if running(cid)}


def scan_busy_ports(
    writer: Writer, route_localhost: bool, protocol: Protocol = Protocol.TCP, tables: Tables | None = None
) -> dict[int, str]:
    """The ports of `protocol` the host already uses: its listeners (loopback ones too with --route-localhost) and
    the ports Docker publishes with DNAT rules in its nat chain (from `tables` if just read, else a read of that
    chain)."""
    try:
        if tables is not None:
            docker_chain = tables.get("nat", {}).get(hostports.DOCKER_NAT_CHAIN, ())
        else:
            docker_chain = writer.list_chain("nat", hostports.DOCKER_NAT_CHAIN) or ()
    except NetfilterError as error:
        log.warning("could not read Docker's published ports: %s", error)
        docker_chain = ()
    return hostports.busy_ports(docker_chain, route_localhost, protocol)


def _routed(frontend: Frontend | None) -> NatPool | None:
    """The nat objects of a frontend of options.family's state, None if it is not routed (no frontend, no backend)."""
    return nat_pool(frontend) if frontend and frontend.backends else None


def _log_retry(retry_state: RetryCallState) -> None:
    log.warning(
        "rule write failed (attempt %d), retrying from the kernel's state: %s",
        retry_state.attempt_number,
        retry_state.outcome.exception() if retry_state.outcome else "",
    )


def log_changes(
    before: DesiredState,
    after: DesiredState,
    causes: Mapping[str | Endpoint, str],
    ports: Iterable[int] | None = None,
    first: bool = False,
) -> None:
    """One line per backend that joined or left, with what caused it (a Docker event, a task, a probe, resync);
    only on `ports` if given (the others did not change). `first`: the first sync since the start, where every
    backend joins: one line in all, the backends' own lines only at debug level (100,000 lines at 10,000 x 10)."""
    level = logging.DEBUG if first else logging.INFO
    if first:
        log.info(
            "first sync: routing %d frontends, %d backends",
            sum(len(after.pools(p)) for p in Protocol),
            sum(len(f.backends) for p in Protocol for f in after.pools(p).values()),
        )
    if log.isEnabledFor(level):
        _log_backend_changes(before, after, causes, level, ports)
    for rejection in set(after.rejections) - set(before.rejections):
        log.warning("%s", rejection, extra={"container": rejection.name, "reason": rejection.reason})
    for warning in set(after.warnings) - set(before.warnings):
        log.warning("%s", warning)


def _log_backend_changes(
    before: DesiredState,
    after: DesiredState,
    causes: Mapping[str | Endpoint, str],
    level: int,
    ports: Iterable[int] | None,
) -> None:
    for protocol in Protocol:
        was, now = before.pools(protocol), after.pools(protocol)
        name = "frontend" if protocol is Protocol.TCP else f"{protocol.upper()} frontend"
        for port in sorted(set(was) | set(now) if ports is None else ports):
            old = set(was[port].backends) if port in was else set()
            new = set(now[port].backends) if port in now else set()
            for sign, moved in (("+", new - old), ("-", old - new)):
                for b in sorted(moved, key=lambda b: b.name):
                    cause = causes.get(b.container_id) or causes.get(b.endpoint) or "resync"
                    where = f" on {b.node}" if b.node else ""
                    log.log(
                        level,
                        "%s %d: %sbackend %s %s:%d%s (%s)",
                        name,
                        port,
                        sign,
                        b.name,
                        b.ip,
                        b.port,
                        where,
                        cause,
                        extra={
                            "frontend": port,
                            "protocol": str(protocol),
                            "backend": b.name,
                            "node": b.node,
                            "change": sign,
                            "cause": cause,
                        },
                    )
