"""`tcprouter run`: the daemon, wired from the flags."""

from __future__ import annotations

import argparse
import dataclasses
import logging

from .. import localnet
from ..daemon import build_providers, serve
from ..metrics import Metrics, kernel_reader
from ..probe import ProbePolicy
from ..runner import Timing
from . import common

log = logging.getLogger("tcprouter")


def command(args: argparse.Namespace) -> int:
    writer = common.writer(args)
    log.info("tcprouter starting: writing the %s tables with %r", writer.flavour, writer)
    metrics = Metrics(kernel_reader(writer.flavour))
    mode = common.mode(args)
    providers = build_providers(
        mode, args.docker_url, args.label_prefix, metrics, poll_interval=args.swarm_poll_interval
    )
    log.info("backends from %s: %s", mode, ", ".join(p.source for p in providers))
    options = common.options(args)
    tables, _ = writer.read()
    if options.route_localhost:
        before = localnet.take(tables)
        options = dataclasses.replace(options, route_localhost=before is not None, route_localnet_before=before or 0)
    else:
        localnet.give_back(tables)  # an earlier --route-localhost run's rules go at the first sync
    timing = Timing(resync_interval=args.resync_interval, check_interval=args.check_interval)
    probing = ProbePolicy(args.probe_interval, args.probe_timeout, args.probe_fall, args.probe_rise)
    return serve(providers, writer, metrics, options, args.label_prefix, timing, probing, args.metrics_address)
