"""`tcprouter cleanup`: remove every owned chain and hook (iptables, and ip6tables where it can be used), and give
the sysctls it set their values back."""

from __future__ import annotations

import argparse
import logging

from .. import sysctls
from ..compiler import RuleSet
from ..diff import restore_script
from ..model import Family
from ..netfilter import Flavour, Nft, ipv6_available, open_writer
from ..nftnat import TABLE_PREFIX
from ..ownership import TablesLock
from . import common

log = logging.getLogger("tcprouter")


def command(args: argparse.Namespace) -> int:
    flavour = common.flavour(args)
    writer4 = open_writer(args.writer, flavour)  # a writer that cannot work here is reported before anything else
    lock = TablesLock()  # held until the process exits: no daemon starts writing halfway through
    if not lock.acquire():
        log.error(
            "a tcprouter daemon owns this host's tables (%s): stop it first, or it would write its rules back at "
            "its next sync; nothing removed",
            lock.holder_hint,
        )
        return 1
    # Whatever --ipv6 and --listen-address say now: an earlier run may have routed either family.
    writers = {Family.IPV4: writer4}
    if ipv6_available(flavour, docker=False) is None:
        writers[Family.IPV6] = open_writer(args.writer, flavour, Family.IPV6)
    restored = True
    for family, writer in writers.items():
        current, _ = writer.read()
        if family is Family.IPV4:  # first: the rules that record the sysctls' values go next
            restored = all([s.give_back(current) for s in sysctls.RECORDED])
        script = restore_script(current, RuleSet(chains={}))
        writer.restore(script)
        log.info(
            "removed %d owned chains and their hooks from the %s %s tables", script.count("\n-X "), flavour, family
        )
        if flavour is Flavour.NFT:  # the nat side of `--nat nftables`: tcprouter's own tables
            nft = Nft()
            ours = nft.tables(family, TABLE_PREFIX)
            nft.delete(family, ours)
            log.info("removed %d nftables tables of tcprouter's (%s)", len(ours), family)
    return 0 if restored else 1
