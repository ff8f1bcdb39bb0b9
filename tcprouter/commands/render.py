"""`tcprouter render`: the rules for Docker's current state, as an iptables-restore script (a dry run)."""

from __future__ import annotations

import argparse
import sys

from ..compiler import compile_rules
from ..diff import restore_script
from ..labels import desired_state
from ..netfilter import Iptables
from ..sync import scan_busy_ports
from . import common


def command(args: argparse.Namespace) -> int:
    options = common.options(args)
    busy = scan_busy_ports(Iptables(common.flavour(args)), options.route_localhost)  # only reads
    state = desired_state(common.listed(args), args.label_prefix, busy, options.policy)
    sys.stdout.write(restore_script({}, compile_rules(state, options)))
    return 0
