"""`tcprouter run`: the pipeline wired together.

providers (one thread each) -> runner inbox (folds into the change tracker) -> sync (desired state, compiler,
diff, writer) -> kernel; the prober (remote providers only) watches what the last sync routed and feeds its
verdicts into the same inbox. The runner's loop runs in the main thread until SIGTERM or SIGINT, once
this process owns the tables (ownership.py); a hot standby follows its providers meanwhile (the inbox keeps
the tracker current at one record per container) and takes over when the owner dies.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from .compiler import Options
from .conntrack import forget_flows
from .families import FamilySyncers
from .labels import DEFAULT_UDP_PREFIX, LabelKeys
from .metrics import Metrics
from .model import Family
from .netfilter import Flavour, Nft, RulesetGeneration, Writer
from .ownership import TablesLock
from .probe import ProbePolicy, Prober
from .providers import Provider
from .providers.engine import EngineProvider
from .providers.swarm import SwarmProvider
from .runner import SyncRunner, Timing
from .sync import Syncer
from .tracker import ChangeTracker

log = logging.getLogger("tcprouter")
EXIT_TABLES_OWNED = 3  # another instance owns the tables and --standby was not given
# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). The metrics thread's
# builds are seconds of Python at 10,000 frontends; meanwhile each of a sync's system calls (a netlink send, a
# restore) would wait up to the interval to take the GIL back: ~16 ms per event instead of ~8 (BENCHMARKS.md).
GIL_SWITCH_INTERVAL = 0.001


def claim_tables(lock: TablesLock, standby: bool) -> bool:
    """Whether this process may go on: it owns the tables, or it is to wait as their standby. Called before
    anything touches the host, so that a second instance started by mistake changes nothing."""
    if lock.acquire() or standby:
        return True
    log.error(
        "another tcprouter owns this host's tables (%s); exiting without touching them. Use --standby to wait as a "
        "hot standby instead",
        lock.holder_hint,
    )
    return False


class Mode(StrEnum):
    LOCAL = "local"  # this host's engine
    ENGINES = "engines"  # plain engines on other hosts (--docker-url once per engine)
    SWARM = "swarm"  # a Swarm manager


def resolve_mode(asked: str | None, urls: Sequence[str]) -> Mode:
    """The provider to use: as asked, else `engines` when several Docker URLs are given, else `local`."""
    if asked:
        return Mode(asked)
    return Mode.ENGINES if len(urls) > 1 else Mode.LOCAL


def sources_problem(mode: Mode, urls: Sequence[str]) -> str | None:
    """Why these Docker URLs cannot work in this mode, in an operator's words; None if they can."""
    if mode is Mode.SWARM and len(urls) > 1:
        return "--swarm follows one manager: give --docker-url once (a manager's API)"
    if mode is Mode.ENGINES and not urls:
        return "--engines needs --docker-url once per engine (tcp://HOST:2376, ssh://user@HOST)"
    if mode is Mode.LOCAL and len(urls) > 1:
        return "several --docker-url given: use --engines (other hosts' engines) or --swarm"
    return None


def build_providers(
    mode: Mode,
    urls: Sequence[str],
    keys: LabelKeys,
    metrics: Metrics,
    timeout: float = 10.0,
    poll_interval: float = 0.5,
) -> list[Provider]:
    """The providers of a mode; ValueError with an operator's sentence for a combination that cannot work."""
    problem = sources_problem(mode, urls)
    if problem:
        raise ValueError(problem)
    if mode is Mode.SWARM:
        return [SwarmProvider(urls[0] if urls else None, keys, metrics, timeout, poll_interval)]
    if mode is Mode.ENGINES:
        return [EngineProvider(url, keys, metrics, timeout, True) for url in urls]
    return [EngineProvider(urls[0] if urls else None, keys, metrics, timeout)]


def serve(
    providers: Sequence[Provider],
    writers: Mapping[Family, Writer],
    metrics: Metrics,
    owner_options: Callable[[], Options],
    prefix: str,
    timing: Timing,
    probing: ProbePolicy,
    lock: TablesLock,
    metrics_address: str = "",
    udp_prefix: str = DEFAULT_UDP_PREFIX,
    keep_flows: bool = False,
) -> int:
    """Follow the providers and keep the kernel in step until a stop signal; the rules stay when it returns.

    Returns 0 after a stop signal, 1 if the daemon could not go on (a thread died, the sync loop kept failing):
    a live process that has stopped working is worse than an exit its restart policy answers. Until `lock` is
    held, this is a hot standby: the providers are followed, nothing is written, and `owner_options()`, which may
    change the host (route_localnet), is called only once the tables are ours. Each address family in `writers`
    has its Syncer, over the same view.
    """
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    # Given the owner's options before its first sync.
    syncer = FamilySyncers(
        {
            family: Syncer(
                writer,
                Options(family=family),
                prefix,
                metrics,
                udp_prefix,
                None if keep_flows else forget_flows,
                nat_writer=Nft(),
            )
            for family, writer in writers.items()
        },
        # The nft ruleset's generation, when every writer writes nft tables (the legacy tables have none).
        RulesetGeneration() if all(w.flavour is Flavour.NFT for w in writers.values()) else None,
    )
    tracker = ChangeTracker(prefix, [p.source for p in providers], udp_prefix=udp_prefix)
    runner = SyncRunner(tracker, syncer, metrics, timing)
    threads = [_guarded(runner, f"provider {p.source}", p.follow, runner.submit, runner.stopping) for p in providers]
    if any(p.remote for p in providers):
        prober = Prober(runner.submit, metrics, probing)
        runner.on_synced = lambda synced: prober.watch(synced.remote_endpoints())
        threads.append(_guarded(runner, "prober", prober.run, runner.stopping))
        log.info(
            "probing remote backends every %.1fs (out after %d failures, back after %d successes)",
            probing.interval,
            probing.fall,
            probing.rise,
        )
    metrics.leader.set(1 if lock.held else 0)  # before the first scrape: a starting owner is no standby
    if metrics_address:
        metrics.serve(metrics_address, Liveness(runner, threads, timing, lock))

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping; the rules stay in the kernel (use `tcprouter cleanup` to remove them)", signum)
        runner.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for thread in threads:
        thread.start()
    try:
        if not _own_tables(lock, runner.stopping, metrics):
            return 0
        syncer.options = owner_options()
        runner.run()
    finally:
        lock.release()
    return 1 if runner.failed else 0


def _own_tables(lock: TablesLock, stopping: threading.Event, metrics: Metrics) -> bool:
    """Wait for the lock while the providers fill the runner's queue; False if stopped first. A standby writes
    nothing: its first sync, once it owns the tables, reads them and writes only what differs (nothing, when it
    takes over from an owner that saw the same Docker)."""
    if not lock.held:
        log.info("standby: another tcprouter owns this host's tables; following Docker, taking over when it stops")
        if not lock.wait(stopping):
            return False
        log.warning("standby: the owner is gone; this instance owns the tables now")
    metrics.leader.set(1)
    return True


def _guarded(runner: SyncRunner, name: str, target: Callable[..., None], *args: object) -> threading.Thread:
    """A daemon thread that, should it ever end before the daemon stops, ends the daemon with an error."""

    def run() -> None:
        try:
            target(*args)
        except BaseException:
            runner.metrics.internal_errors.labels(name).inc()
            log.exception("thread %s stopped on an unexpected error", name)
        if not runner.stopping.is_set():
            runner.fail(f"thread {name} stopped")

    return threading.Thread(target=run, name=name, daemon=True)


@dataclass
class Liveness:
    """/healthz: healthy while every thread runs, the sync loop turns, and the rules were written or verified
    recently (a full resync verifies them every --resync-interval)."""

    runner: SyncRunner
    threads: Sequence[threading.Thread]
    timing: Timing
    lock: TablesLock

    def __call__(self) -> tuple[bool, str]:
        stopped = [t.name for t in self.threads if not t.is_alive()]
        if stopped:
            return False, f"stopped: {', '.join(stopped)}"
        if not self.lock.held:
            return True, "standby: another tcprouter owns the tables"
        stalled = self.runner.clock() - self.runner.heartbeat
        if stalled > max(10.0, 5 * self.timing.check_interval):
            return False, f"the sync loop has not turned for {stalled:.0f}s"
        if not self.runner.ready.is_set():
            return False, "no successful sync yet"
        since = time.time() - self.runner.last_synced
        if since > 2 * self.timing.resync_interval + 30:
            return False, f"no successful sync for {since:.0f}s"
        return True, "ok"
