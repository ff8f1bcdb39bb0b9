"""A fake clock, and an in-memory kernel for fast tests of the reconciler: the Writer protocol of
netfilter.Iptables over plain tables, applying the scripts of diff.restore_script as `iptables-restore --noflush`
does. Kernel tests (private network namespaces) stay the judge of what the kernel itself does; this fake is for
the reconciler's logic."""

from __future__ import annotations

import copy

from tcprouter.compiler import Tables
from tcprouter.diff import SavedRule, jump_target, parse_save
from tcprouter.iptc_writer import Operation, parse_script
from tcprouter.netfilter import Flavour, NetfilterError

BUILTIN: dict[str, tuple[str, ...]] = {
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "raw": ("PREROUTING", "OUTPUT"),
}


class FakeClock:
    """A clock that moves only when a test sets `now`."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeKernel:
    """nat, filter and raw tables in memory. `restore` commits each table of a script whole or not at all (an error
    raises NetfilterError, as iptables-restore fails); `scripts` records what was written, `reads` the full reads,
    `listed` the chains listed one by one. `generation` counts commits as nf_tables does: one per table restored,
    one per edit behind tcprouter's back."""

    flavour = Flavour.NFT

    def __init__(self, saved: str = "") -> None:
        """Start with the built-in chains, plus what `saved` (iptables-save text) holds."""
        self.tables: dict[str, dict[str, list[str]]] = {t: {c: [] for c in chains} for t, chains in BUILTIN.items()}
        for table, chains in parse_save(saved)[0].items():
            for chain, rules in chains.items():
                self.tables.setdefault(table, {})[chain] = list(rules)
        self.scripts: list[str] = []
        self.reads = self.listed = self.generation = 0

    def read(self, counters: bool = False) -> tuple[Tables, list[tuple[str, SavedRule]]]:
        self.reads += 1
        tables = {t: {c: tuple(rules) for c, rules in chains.items()} for t, chains in self.tables.items()}
        counted = [
            (t, SavedRule(c, r, 0)) for t, chains in tables.items() for c, rules in chains.items() for r in rules
        ]
        return tables, counted

    def list_chain(self, table: str, chain: str) -> tuple[str, ...] | None:
        self.listed += 1
        rules = self.tables.get(table, {}).get(chain)
        return None if rules is None else tuple(rules)

    def restore(self, script: str) -> None:
        for table, operations in parse_script(script):
            changed = copy.deepcopy(self.tables.get(table, {}))
            for op in operations:
                _apply(changed, op)
            self.tables[table] = changed
            self.generation += 1
        self.scripts.append(script)

    # Drift: what another program may do to the tables behind tcprouter's back.

    def flush(self, table: str, chain: str) -> None:
        self.tables[table][chain] = []
        self.generation += 1

    def delete_rule(self, table: str, chain: str, index: int = 0) -> str:
        self.generation += 1
        return self.tables[table][chain].pop(index)

    def insert_rule(self, table: str, chain: str, rule: str, index: int = 0) -> None:
        self.tables[table][chain].insert(index, rule)
        self.generation += 1

    def foreign(self) -> dict[str, dict[str, list[str]]]:
        """Everything that is not tcprouter's: chains without the TCPR- prefix, without the jumps into ours."""
        return {
            t: {
                c: [r for r in rules if "-j TCPR-" not in r] for c, rules in chains.items() if not c.startswith("TCPR-")
            }
            for t, chains in self.tables.items()
        }


def _apply(chains: dict[str, list[str]], op: Operation) -> None:
    """One restore line, with iptables' errors for what the kernel would refuse."""
    if op.kind == "declare":
        chains[op.chain] = []  # creates the chain, or flushes it (--noflush keeps only undeclared chains)
        return
    rules = chains.get(op.chain)
    if rules is None:
        raise NetfilterError(f"iptables-restore: chain {op.chain} does not exist")
    if op.kind == "append":
        rules.append(op.rule)
    elif op.kind == "insert":
        if op.position > len(rules):
            raise NetfilterError(f"iptables-restore: -I {op.chain} {op.position + 1}: index of insertion too big")
        rules.insert(op.position, op.rule)
    elif op.kind == "delete":
        if op.rule not in rules:
            raise NetfilterError(f"iptables-restore: -D {op.chain} {op.rule}: no such rule")
        rules.remove(op.rule)
    elif op.kind == "remove":
        if rules or any(jump_target(r) == op.chain for c in chains.values() for r in c):
            raise NetfilterError(f"iptables-restore: -X {op.chain}: chain not empty or still referenced")
        del chains[op.chain]
