"""`tcprouter render`: the rules for Docker's current state, as an iptables-restore script (a dry run)."""

from __future__ import annotations

import argparse
import sys

from .. import hostports
from ..compiler import compile_rules
from ..diff import restore_script
from ..labels import desired_state
from . import common


def command(args: argparse.Namespace) -> int:
    state = desired_state(common.listed(args), args.label_prefix, hostports.host_tcp_listeners())
    sys.stdout.write(restore_script({}, compile_rules(state, common.options(args))))
    return 0
