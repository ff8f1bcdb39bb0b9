"""Kernel state versus compiled rules -> the smallest `iptables-restore --noflush` script.

Pure functions. Only chains whose content differs are rewritten; owned chains that are no longer
wanted are flushed and deleted; hooks in chains we do not own are fixed by deleting our own jumps
(by their exact text) and inserting one: at the top, or in the operator's chain (DOCKER-USER) after the
operator's rules. Nothing without the TCPR- prefix is ever declared (which would flush it) or deleted,
and a foreign rule is never moved.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import NamedTuple

from .compiler import PREFIX, TABLES, RuleSet, Tables

# Chains where the operator puts their own filter rules: our hook goes after them, so that theirs win.
OPERATOR_CHAINS = frozenset({"DOCKER-USER"})


class SavedRule(NamedTuple):
    chain: str
    spec: str
    packets: int


def parse_save(text: str) -> tuple[Tables, list[tuple[str, SavedRule]]]:
    """Parse `iptables-save [-c]` output into table -> chain -> rules, and the rules with counters. One pass over
    the lines, a list per chain (110,000 rules at 10,000 frontends: this runs at every full resync)."""
    chains: dict[str, dict[str, list[str]]] = {}
    counted: list[tuple[str, SavedRule]] = []
    table: dict[str, list[str]] | None = None
    table_name = ""
    for line in text.splitlines():
        packets = 0
        if line.startswith("["):  # -c: "[packets:bytes] -A chain spec"
            counters, _, line = line.partition("] ")
            packets = int(counters[1:].partition(":")[0])
        if line.startswith("-A ") and table is not None:
            chain, _, spec = line[3:].partition(" ")
            table.setdefault(chain, []).append(spec)
            counted.append((table_name, SavedRule(chain, spec, packets)))
        elif line.startswith("*"):
            table_name = line[1:].strip()
            table = chains.setdefault(table_name, {})
        elif line.startswith(":") and table is not None:
            table.setdefault(line[1:].split(maxsplit=1)[0], [])
    tables: Tables = {name: {chain: tuple(rules) for chain, rules in held.items()} for name, held in chains.items()}
    return tables, counted


def jump_target(spec: str) -> str | None:
    try:
        words = shlex.split(spec)
    except ValueError:
        return None
    for flag in ("-j", "-g"):
        if flag in words and words.index(flag) + 1 < len(words):
            return words[words.index(flag) + 1]
    return None


def owned(chain: str) -> bool:
    return chain.startswith(PREFIX)


def _live_end(parent_rules: Sequence[str]) -> int:
    """The index of the first unconditional RETURN (the rules after it never run), else the chain's length."""
    return next((i for i, rule in enumerate(parent_rules) if rule == "-j RETURN"), len(parent_rules))


def hook_index(parent: str, parent_rules: Sequence[str]) -> int:
    """Where our hook belongs among the parent's foreign rules (0-based): first, or in an operator's chain
    after every rule that runs, i.e. before Docker's trailing RETURN. An operator's rule inserted above
    it later (`-I`) keeps its place and its precedence; one appended after the RETURN never runs anyway."""
    return _live_end(parent_rules) if parent in OPERATOR_CHAINS else 0


def hook_in_place(parent: str, parent_rules: tuple[str, ...], hook: str) -> bool:
    """Our hook is the only jump of ours in the parent, at its place (hook_index of the other rules)."""
    ours = [i for i, rule in enumerate(parent_rules) if owned(jump_target(rule) or "")]
    if len(ours) != 1 or parent_rules[ours[0]] != hook:
        return False
    return ours[0] == hook_index(parent, parent_rules[: ours[0]] + parent_rules[ours[0] + 1 :])


def restore_script(current: Tables, desired: RuleSet, tables: tuple[str, ...] = TABLES) -> str:
    """The `iptables-restore --noflush` input that turns `current` into `desired`; "" if nothing differs."""
    out: list[str] = []
    for table in tables:
        have = current.get(table, {})
        want = desired.chains.get(table, {})
        declare: list[str] = []
        hook_ops: list[str] = []
        appends: list[str] = []
        deletes: list[str] = []
        for chain, rules in want.items():
            if have.get(chain) != rules or chain not in have:
                declare.append(f":{chain} - [0:0]")
                appends.extend(f"-A {chain} {rule}" for rule in rules)
        for parent, hook in desired.hooks.get(table, ()):
            parent_rules = have.get(parent, ())
            if hook_in_place(parent, parent_rules, hook):
                continue
            foreign = tuple(rule for rule in parent_rules if not owned(jump_target(rule) or ""))
            hook_ops.extend(f"-D {parent} {rule}" for rule in parent_rules if owned(jump_target(rule) or ""))
            hook_ops.append(f"-I {parent} {hook_index(parent, foreign) + 1} {hook}")
        wanted_parents = {parent for parent, _ in desired.hooks.get(table, ())}
        for parent, rules in have.items():  # stale hooks, e.g. left by another --listen-address
            if not owned(parent) and parent not in wanted_parents:
                hook_ops.extend(f"-D {parent} {rule}" for rule in rules if owned(jump_target(rule) or ""))
        for chain in have:
            if owned(chain) and chain not in want:
                declare.append(f":{chain} - [0:0]")  # flushes it, so it can be deleted
                deletes.append(f"-X {chain}")
        lines = declare + hook_ops + appends + deletes
        if lines:
            out += [f"*{table}", *lines, "COMMIT"]
    return "\n".join(out) + "\n" if out else ""


def believed_tables(rules: RuleSet) -> Tables:
    """What the kernel holds after `rules` was applied, as far as restore_script looks at it."""
    believed: Tables = {table: dict(chains) for table, chains in rules.chains.items()}
    for table, hooks in rules.hooks.items():
        for parent, hook in hooks:
            believed.setdefault(table, {})[parent] = (hook,)
    return believed


def owned_only(tables: Tables) -> Tables:
    """Owned chains and the jumps into them: the part of the kernel state that tcprouter answers for (a table
    where it has none is left out: the raw table is owned only while a frontend has synproxy)."""
    result: Tables = {}
    for table, chains in tables.items():
        kept = {}
        for chain, rules in chains.items():
            if owned(chain):
                kept[chain] = rules
            else:
                jumps = tuple(r for r in rules if owned(jump_target(r) or ""))
                if jumps:
                    kept[chain] = jumps
        if kept:
            result[table] = kept
    return result
