"""What the libiptc writer needs from python-iptables beyond its public API, in one place.

Everything else iptc_writer uses is python-iptables' public API (Table, Rule, Match, Target and
their documented methods). The four items here rely on how python-iptables works inside;
tests/test_iptc_adapter.py checks each of them against the installed release, so an upgrade that
changes one fails there, by name, instead of as a wrong rule in the kernel.

- load(): python-iptables finds the xtables extension directory once, at import, from
  XTABLES_LIBDIR or else by running `ldconfig -v`, which fails in some minimal images.
- final_check(): an extension's own final check, without the public final_check()'s detour.
- Rule: iptc.Rule without the `tables` property a Target consults to tell a chain from an extension.
- is_conflict(): the kernel's EAGAIN on commit, which python-iptables reports only as text.
"""

from __future__ import annotations

import errno
import glob
import importlib
import os
from types import ModuleType
from typing import Any

from .netfilter import NetfilterError

_XTABLES_DIRS = ("/usr/lib/*/xtables", "/usr/lib64/xtables", "/usr/lib/xtables", "/usr/local/lib/xtables")
_module: ModuleType | None = None


def load() -> ModuleType:
    """Import python-iptables once, telling it where the xtables extensions are if nobody did.

    XTABLES_LIBDIR is set for the import only (python-iptables keeps the directory it read; libxtables
    itself falls back to the directory it was built with), so the process' environment is left as it was.
    """
    global _module
    if _module is None:
        guessed = None
        if "XTABLES_LIBDIR" not in os.environ:
            found = sorted(d for pattern in _XTABLES_DIRS for d in glob.glob(pattern) if os.path.isdir(d))
            guessed = found[0] if found else None
        try:
            if guessed:
                os.environ["XTABLES_LIBDIR"] = guessed
            _module = importlib.import_module("iptc")
        except Exception as error:  # ImportError, OSError from ctypes, iptc.errors.XTablesError
            raise NetfilterError(
                f"python-iptables (libiptc) cannot be loaded: {error}; it needs libip4tc and libxtables "
                "(the Debian package iptables) and XTABLES_LIBDIR pointing to the extensions"
            ) from error
        finally:
            if guessed:
                del os.environ["XTABLES_LIBDIR"]
    return _module


# Options that python-iptables leaves at 0 where iptables sets a default, and the kernel refuses 0 (EINVAL):
# hashlimit's expiry in rate mode. iptables-save omits them at their default, so rules do not carry them;
# they are set on a new match first, and the rule's own options may override them.
KERNEL_DEFAULTS = {"hashlimit": {"hashlimit-htable-expire": "1000"}}  # ms, as iptables-save omits it


def set_defaults(match: Any, name: str) -> None:
    """Give a new match the defaults of KERNEL_DEFAULTS."""
    for option, value in KERNEL_DEFAULTS.get(name, {}).items():
        match.set_parameter(option, [value])


def final_check(module: Any) -> None:
    """A match's or target's own final check (mandatory options, derived fields), right after its options.

    Not the public final_check() of Match, Target or Rule: it first prints the extension's options
    through a pipe swapped onto the process' stdout (fd 1, shared with every thread), resets the
    extension and parses them back, for each match of each rule (most of python-iptables' time on
    large writes). Called right after the options, the private `_final_check()` sees the extension
    state the options just set, which python-iptables keeps in the extension's shared structure.
    """
    if module is not None and module._module is not None:
        module._final_check()


_rule_classes: dict[str, type] = {}  # one subclass, made when python-iptables is first loaded


def rule_class(iptc: ModuleType) -> type:
    """iptc.Rule without its `tables` property, which opens every table through python-iptables' cache.

    Before loading a target extension, python-iptables' Target asks each table of iptc.Table's
    process-wide cache whether the name is a chain: that creates the legacy raw, mangle and security
    tables as a side effect and calls libiptc on cached handles, which the writer closes after each
    write (a closed handle there is a crash). The writer decides jump or extension itself, on the
    handle being written, so no table needs to be consulted.
    """
    if "rule" not in _rule_classes:
        _rule_classes["rule"] = type("Rule", (iptc.Rule,), {"tables": property(lambda self: [])})
    return _rule_classes["rule"]


def is_conflict(error: Exception) -> bool:
    """Whether a failed Table.commit() is the kernel's EAGAIN: the table changed since it was read.

    python-iptables reads errno after the failed call and puts libiptc's message for it (strerror
    for EAGAIN) into the IPTCError's text; the exception carries no errno of its own.
    """
    return os.strerror(errno.EAGAIN) in str(error)
