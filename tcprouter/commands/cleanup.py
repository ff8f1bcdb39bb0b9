"""`tcprouter cleanup`: remove every owned chain and hook, and give the sysctls it set their values back."""

from __future__ import annotations

import argparse
import logging

from .. import sysctls
from ..compiler import RuleSet
from ..diff import restore_script
from ..ownership import TablesLock
from . import common

log = logging.getLogger("tcprouter")


def command(args: argparse.Namespace) -> int:
    lock = TablesLock()  # held until the process exits: no daemon starts writing halfway through
    if not lock.acquire():
        log.error(
            "a tcprouter daemon owns this host's tables (%s): stop it first, or it would write its rules back at "
            "its next sync; nothing removed",
            lock.holder_hint,
        )
        return 1
    writer = common.writer(args)
    current, _ = writer.read()
    restored = all([s.give_back(current) for s in sysctls.RECORDED])  # first: the rules that record them go next
    script = restore_script(current, RuleSet(chains={}))
    writer.restore(script)
    log.info("removed %d owned chains and their hooks from the %s tables", script.count("\n-X "), writer.flavour)
    return 0 if restored else 1
