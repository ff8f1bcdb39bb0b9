"""`tcprouter run`: the daemon, wired from the flags."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from .. import sysctls
from ..compiler import Options
from ..daemon import EXIT_TABLES_OWNED, build_providers, claim_tables, serve
from ..metrics import Metrics, kernel_reader
from ..model import Family
from ..netfilter import Flavour
from ..ownership import TablesLock
from ..probe import ProbePolicy
from ..runner import Timing
from . import common

log = logging.getLogger("tcprouter")


def command(args: argparse.Namespace) -> int:
    lock = TablesLock()
    if not claim_tables(lock, args.standby):
        return EXIT_TABLES_OWNED
    writers = common.writers(args)
    for family, each in writers.items():
        log.info("tcprouter starting: writing the %s %s tables with %r", each.flavour, family, each)
    nat_tables = common.options(args).nat_tables
    if nat_tables and any(w.flavour is not Flavour.NFT for w in writers.values()):
        log.error("--nat nftables needs a host whose iptables is iptables-nft; nothing written")
        return 2
    readers = {
        family: kernel_reader(each.flavour, family=family, nat_tables=nat_tables) for family, each in writers.items()
    }
    metrics = Metrics(
        readers.get(Family.IPV4, lambda: ({}, [])),
        read_kernel6=readers.get(Family.IPV6),
        read_interval=args.metrics_read_interval,
    )
    mode = common.mode(args)
    providers = build_providers(
        mode, args.docker_url, common.label_keys(args), metrics, poll_interval=args.swarm_poll_interval
    )
    log.info("backends from %s: %s", mode, ", ".join(p.source for p in providers))
    options = common.options(args)

    def owner_options() -> Options:
        """route_localnet is set, or given back after an earlier --route-localhost run, by the owner only: a
        standby must not change what the owner's rules rely on. IPv4 only: its rules record the value."""
        if Family.IPV4 not in writers:
            return options
        tables, _ = writers[Family.IPV4].read()
        if not options.route_localhost:
            sysctls.ROUTE_LOCALNET.give_back(tables)  # an earlier --route-localhost run's rules go at the first sync
            return options
        before = sysctls.ROUTE_LOCALNET.take(tables)
        return dataclasses.replace(options, route_localhost=before is not None, route_localnet_before=before or 0)

    timing = Timing(resync_interval=args.resync_interval, check_interval=args.check_interval)
    probing = ProbePolicy(args.probe_interval, args.probe_timeout, args.probe_fall, args.probe_rise)
    return serve(
        providers,
        writers,
        metrics,
        owner_options,
        args.label_prefix,
        timing,
        probing,
        lock,
        args.metrics_address,
        args.udp_label_prefix,
        args.keep_flows,
    )
