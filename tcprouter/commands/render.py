"""`tcprouter render`: the rules for Docker's current state, as an iptables-restore script (ip6tables-restore with
--family ipv6; a dry run). With --nat nftables, the `nft -f` text of the nat side's tables comes first, each part
under a comment naming the tool that loads it."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..compiler import compile_rules
from ..diff import restore_script
from ..labels import desired_state
from ..model import Family, Protocol
from ..netfilter import Iptables
from ..nftnat import nat_pools, ruleset_text
from ..sync import scan_busy_ports
from . import common


def command(args: argparse.Namespace) -> int:
    family = Family(args.family)
    options = dataclasses.replace(common.options(args), family=family)
    iptables = Iptables(common.flavour(args), family=family)  # only reads
    # Where `run` would hook its filter chain: Docker 20.10 makes no DOCKER-USER chain in ip6tables.
    if iptables.list_chain("filter", "DOCKER-USER") is None:
        options = dataclasses.replace(options, forward_parent="FORWARD")
    busy = {p: scan_busy_ports(iptables, options.route_localhost, p) for p in Protocol}
    state = desired_state(
        common.listed(args),
        args.label_prefix,
        busy[Protocol.TCP],
        options.policy,
        args.udp_label_prefix,
        busy[Protocol.UDP],
    )
    script = restore_script({}, compile_rules(state, options))
    if options.nat_tables:
        tool = "iptables-restore" if family is Family.IPV4 else "ip6tables-restore"
        nat = ruleset_text(nat_pools(state, options).values(), options)
        script = f"# nft -f -\n{nat}# {tool} --noflush\n{script}"
    sys.stdout.write(script)
    return 0
