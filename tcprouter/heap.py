"""The process's heap, after the daemon's largest short-lived work: a full sync.

At 10,000 frontends a full sync allocates and frees tens of MB (every container's groups read again, a full load's
netlink batches). Python hands allocations over 512 bytes to the C library's malloc, which keeps what they freed
for later ones: without a trim the daemon's resident memory stays at that peak (~10-25 MB more at 10,000 x 10,
BENCHMARKS.md). Not after each metrics build: a trim holds malloc's lock (~1-30 ms) and the pages it gives back
fault in again at the next allocations, which cost the syncs and scrapes of the probe there milliseconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

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
