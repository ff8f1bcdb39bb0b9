"""`tcprouter render`: the rules for Docker's current state, as an iptables-restore script (a dry run)."""

from __future__ import annotations

import argparse
import sys

from ..compiler import compile_rules
from ..diff import restore_script
from ..labels import desired_state
from ..model import Protocol
from ..netfilter import Iptables
from ..sync import scan_busy_ports
from . import common


def command(args: argparse.Namespace) -> int:
    options = common.options(args)
    iptables = Iptables(common.flavour(args))  # only reads
    busy = {p: scan_busy_ports(iptables, options.route_localhost, p) for p in Protocol}
    state = desired_state(
        common.listed(args),
        args.label_prefix,
        busy[Protocol.TCP],
        options.policy,
        args.udp_label_prefix,
        busy[Protocol.UDP],
    )
    sys.stdout.write(restore_script({}, compile_rules(state, options)))
    return 0
