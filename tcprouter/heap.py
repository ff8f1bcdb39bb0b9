"""The process's heap around the daemon's largest work, a full sync: no cyclic collection during it, and the memory
it freed given back after it.

At 10,000 frontends a full sync makes ~1,000,000 objects; the cyclic garbage collector, counting them, ran 4-5 full
collections during it (0.3-0.5 s of its ~3.3 s, each stopping every thread: BENCHMARKS.md, "Fifth pass").
tcprouter's data holds no reference cycles, so reference counting frees it all; a cycle made meanwhile is collected
after.

At 10,000 frontends a full sync allocates and frees tens of MB (every container's groups read again, a full load's
netlink batches). Python hands allocations over 512 bytes to the C library's malloc, which keeps what they freed
for later ones: without a trim the daemon's resident memory stays at that peak (~10-25 MB more at 10,000 x 10,
BENCHMARKS.md). Not after each metrics build: a trim holds malloc's lock (~1-30 ms) and the pages it gives back
fault in again at the next allocations, which cost the syncs and scrapes of the probe there milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """glibc's malloc_trim, None elsewhere (musl has none: there the memory stays the allocator's)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        log.debug("no malloc_trim in this C library: freed memory is not given back to the system")
        return None


def give_back() -> None:
    """Return the pages the C library's malloc holds free to the system (malloc_trim(0): milliseconds)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection inside (for the one thread that syncs: another's pause could end this one's)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
