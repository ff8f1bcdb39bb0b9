"""The libiptc writer: the restore script of diff.restore_script, executed in-process by python-iptables.

The script stays the single source of truth for a write; this module only executes it differently
from `iptables-legacy-restore --noflush`:

- one libiptc handle per table (`autocommit=False`): `refresh()` reads the table, the script's
  operations are applied to the in-memory copy, `commit()` replaces the table in one step;
- the commit runs under the xtables lock (`/run/xtables.lock`, the lock `iptables-legacy -w` and
  Docker's iptables calls take), so writers that respect it are serialised with us;
- a writer that does not take the lock and changes the table between our refresh and our commit
  makes the kernel refuse the commit (EAGAIN: x_tables compares the rule count it handed out with
  the current one); we then refresh, re-apply the same operations on top of the new state and
  commit again, a bounded number of times (tenacity), before giving up with NetfilterError.

Reading is delegated to `iptables-legacy-save` and diff.parse_save: the reconciler compares rules as
the text iptables-save prints, which the save binary produces by definition; and it is faster. Measured
here on 13,000 rules (1,000 frontends x 10 backends): save + parse_save 0.07 s, a walk of the same
rules through python-iptables (chains, rules, each match's and target's parameters) 1.7 s, before any
text is even assembled.

Legacy tables only: libiptc cannot reach nf_tables. python-iptables keeps process-wide state (each
extension's parse state lives in the shared extension structure, each table is a cached singleton), so
every use of it here holds one module lock, and each write re-reads its table and closes the handle
after the commit. What this needs beyond python-iptables' public API is in iptc_adapter.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from . import iptc_adapter
from .compiler import Tables, split_words
from .diff import SavedRule, owned
from .netfilter import Flavour, Iptables, NetfilterError

log = logging.getLogger(__name__)

XTABLES_LOCK = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")
VERDICTS = frozenset({"ACCEPT", "DROP", "RETURN", "QUEUE"})
_iptc_lock = threading.Lock()  # python-iptables' Table cache and extension state are process-wide


class ScriptError(NetfilterError):
    """The restore script holds something this writer refuses or does not understand."""


@dataclass(frozen=True)
class Operation:
    """One line of a restore script: what to do to which chain."""

    kind: str  # "declare" | "insert" | "delete" | "append" | "remove"
    chain: str
    rule: str = ""  # the rule spec in iptables-save syntax (insert, delete, append)
    position: int = 0  # insert: the index the rule takes (0: at the top)


def parse_script(script: str) -> list[tuple[str, list[Operation]]]:
    """A restore script (as diff.restore_script writes it) -> the operations of each table, in order.

    Ownership is enforced here, before anything touches the kernel: only TCPR- chains may be
    declared (created or flushed), appended to or deleted; in other chains rules may only be inserted
    (at a position) or deleted by their exact text.
    """
    tables: list[tuple[str, list[Operation]]] = []
    ops: list[Operation] | None = None
    for number, raw in enumerate(script.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            if ops is not None:
                raise ScriptError(f"line {number}: table {line[1:]} starts before COMMIT")
            ops = []
            tables.append((line[1:].strip(), ops))
            continue
        if ops is None:
            raise ScriptError(f"line {number}: {line!r} outside a table")
        if line == "COMMIT":
            ops = None
            continue
        if line.startswith(":"):
            chain = line[1:].split()[0]
            _require_owned(chain, number, line)
            ops.append(Operation("declare", chain))
            continue
        flag, _, rest = line.partition(" ")
        chain, _, spec = rest.partition(" ")
        if flag == "-A":
            _require_owned(chain, number, line)
            ops.append(Operation("append", chain, spec))
        elif flag == "-D":
            ops.append(Operation("delete", chain, spec))
        elif flag == "-I":
            position, _, spec = spec.partition(" ")
            if not position.isdecimal() or int(position) < 1:
                raise ScriptError(f"line {number}: an insert needs a position (1 or more): {line!r}")
            ops.append(Operation("insert", chain, spec, int(position) - 1))
        elif flag == "-X" and chain and not spec:
            _require_owned(chain, number, line)
            ops.append(Operation("remove", chain))
        else:
            raise ScriptError(f"line {number}: unsupported restore command {line!r}")
    if ops is not None:
        raise ScriptError("the script ends without COMMIT")
    return tables


def _require_owned(chain: str, number: int, line: str) -> None:
    if not owned(chain):
        raise ScriptError(f"line {number}: refusing to touch chain {chain}, which tcprouter does not own: {line!r}")


_ADDRESS_FLAGS = {
    "-s": "src",
    "--source": "src",
    "-d": "dst",
    "--destination": "dst",
    "-i": "in_interface",
    "--in-interface": "in_interface",
    "-o": "out_interface",
    "--out-interface": "out_interface",
    "-p": "protocol",
    "--protocol": "protocol",
}


def build_rule(iptc: ModuleType, spec: str, is_chain: Callable[[str], bool]) -> Any:
    """A rule spec in iptables-save syntax -> an iptc.Rule, ready to be written.

    Generic: `-p -s -d -i -o` (each with an optional leading `!`), `-m NAME` followed by that match's
    `--option value...` (`!` before an option negates it), `-j`/`-g TARGET` followed by the target's
    options. A target is a jump when it names a verdict or a chain of the table, as in iptables.
    """
    try:
        words = split_words(spec)
    except ValueError as error:
        raise ScriptError(f"cannot split rule {spec!r}: {error}") from error
    rule = iptc_adapter.rule_class(iptc)()
    module: Any = None  # the match or target the following --options belong to
    negate = False
    i = 0
    try:
        while i < len(words):
            word = words[i]
            if word == "!":
                negate = True
                i += 1
                continue
            if word in _ADDRESS_FLAGS:
                setattr(rule, _ADDRESS_FLAGS[word], ("!" if negate else "") + _value(words, i, spec))
                i += 2
            elif word in ("-m", "--match"):
                iptc_adapter.final_check(module)
                module = iptc.Match(rule, _value(words, i, spec))
                iptc_adapter.set_defaults(module, _value(words, i, spec))
                rule.add_match(module)
                i += 2
            elif word in ("-j", "--jump", "-g", "--goto"):
                iptc_adapter.final_check(module)
                name = _value(words, i, spec)
                goto = word in ("-g", "--goto")
                if name in VERDICTS or is_chain(name):
                    module = iptc.Target(rule, "", goto=goto)
                    module.standard_target = name
                else:
                    module = iptc.Target(rule, name, goto=goto)
                rule.target = module
                i += 2
            elif word.startswith("--") and module is not None:
                values = []
                i += 1
                if i < len(words) and words[i] == "!":  # old style: --option ! value
                    negate = True
                    i += 1
                while i < len(words) and not (words[i].startswith("-") or words[i] == "!"):
                    values.append(words[i])
                    i += 1
                module.set_parameter(word[2:], ["!", *values] if negate else values)
            else:
                raise ScriptError(f"unsupported word {word!r} in rule {spec!r}")
            negate = False
        iptc_adapter.final_check(module)
        if rule.target is None:  # a rule without -j only counts
            rule.target = iptc.Target(rule, "")
    except ScriptError:
        raise
    except Exception as error:  # iptc.IPTCError, XTablesError, ValueError from python-iptables
        raise ScriptError(f"python-iptables cannot build rule {spec!r}: {error}") from error
    return rule


def _value(words: list[str], i: int, spec: str) -> str:
    if i + 1 >= len(words):
        raise ScriptError(f"{words[i]} without a value in rule {spec!r}")
    return words[i + 1]


class _Conflict(Exception):
    """The kernel refused the commit because the table changed since we read it."""


class IptcWriter:
    """The writer interface of netfilter.Iptables (flavour, read, list_chain, restore), writing with libiptc.

    Reads go through `iptables-legacy-save`. Like every libiptc user, the writer acts in the network
    namespace of the calling thread (tests run it in a thread that joined a private namespace).
    """

    flavour = Flavour.LEGACY

    def __init__(self, timeout: float = 30.0, attempts: int = 5) -> None:
        self.timeout = timeout
        self.attempts = attempts
        self.reader = Iptables(Flavour.LEGACY, timeout=timeout)
        self._iptc = iptc_adapter.load()  # fail at start, not at the first write

    def __repr__(self) -> str:
        return "IptcWriter(legacy, python-iptables)"

    # ---- reading: the save binary, so the text is exactly what iptables-save prints ------

    def read(self, counters: bool = False) -> tuple[Tables, list[tuple[str, SavedRule]]]:
        return self.reader.read(counters)

    def list_chain(self, table: str, chain: str) -> tuple[str, ...] | None:
        return self.reader.list_chain(table, chain)

    # ---- writing ----------------------------------------------------------------------------

    def restore(self, script: str) -> None:
        """Apply a restore script; each table is committed atomically (the script is checked first)."""
        for table, ops in parse_script(script):
            if ops:
                self._write_table(table, ops)

    def _write_table(self, table: str, ops: list[Operation]) -> None:
        retrying = Retrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait_random_exponential(multiplier=0.01, max=0.5),
            retry=retry_if_exception_type(_Conflict),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    number = attempt.retry_state.attempt_number
                    if number > 1:
                        log.warning(
                            "%s table changed under us; re-reading and writing again (attempt %d)", table, number
                        )
                    self._attempt(table, ops)
        except _Conflict as error:
            raise NetfilterError(
                f"libiptc commit of the {table} table failed {self.attempts} times: another writer keeps "
                f"changing it ({error})"
            ) from error

    def _attempt(self, table: str, ops: list[Operation]) -> None:
        """Read the table, apply the operations to the copy, commit: one atomic replacement."""
        with self._xtables_lock(), _iptc_lock:
            handle = self._open(table)
            try:
                self._apply(handle, ops)
                self._commit(handle)
            finally:
                handle.close()

    def _open(self, table: str) -> Any:
        """python-iptables' handle on `table`, read now, in the calling thread's network namespace.

        iptc.Table(name) is a process-wide singleton: refresh() (re)reads the table through a new
        libiptc handle in this thread's namespace, and _attempt closes it after the commit, so no
        handle (nor the namespace its socket pins) outlives a write. The module lock keeps other
        threads off the singleton meanwhile.
        """
        iptc = self._iptc
        try:
            handle = iptc.Table(table, autocommit=False)
            handle.refresh()
        except iptc.IPTCError as error:
            raise NetfilterError(f"libiptc cannot read the legacy {table} table: {error}") from error
        return handle

    def _apply(self, handle: Any, ops: list[Operation]) -> None:
        iptc = self._iptc
        for op in ops:
            try:
                if op.kind == "declare":
                    if handle.is_chain(op.chain):
                        handle.flush_entries(op.chain)
                    else:
                        handle.create_chain(op.chain)
                elif op.kind == "remove":
                    handle.delete_chain(op.chain)
                else:
                    rule = build_rule(iptc, op.rule, handle.is_chain)
                    if op.kind == "append":
                        handle.append_entry(op.chain, rule.rule)
                    elif op.kind == "insert":
                        handle.insert_entry(op.chain, rule.rule, op.position)
                    else:
                        handle.delete_entry(op.chain, rule.rule, rule.mask)
            except iptc.IPTCError as error:
                what = f"{op.kind} {op.chain} {op.rule}".strip()
                raise NetfilterError(f"libiptc: {handle.name}: {what}: {error}") from error

    def _commit(self, handle: Any) -> None:
        """Replace the table in the kernel; a table changed since `refresh()` raises _Conflict."""
        try:
            handle.commit()
        except self._iptc.IPTCError as error:
            if iptc_adapter.is_conflict(error):
                raise _Conflict(str(error)) from error
            raise NetfilterError(f"libiptc commit of the {handle.name} table failed: {error}") from error

    @contextlib.contextmanager
    def _xtables_lock(self) -> Iterator[None]:
        """The lock `iptables-legacy -w` takes: serialise with Docker and every other iptables user."""
        try:
            fd = os.open(XTABLES_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        except OSError as error:
            raise NetfilterError(f"cannot open the xtables lock {XTABLES_LOCK}: {error}") from error
        try:
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise NetfilterError(
                            f"the xtables lock {XTABLES_LOCK} stayed taken for {self.timeout:.0f}s"
                        ) from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # releases the lock
