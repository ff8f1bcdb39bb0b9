"""Where the time of `--nat nftables` writes goes: the daemon's Python against the kernel's share.

`cd scripts && python -m benchlib.nftload 10,10000 [REPEATS]` prints, per size (frontends x 10 backends, synthetic
addresses as in benchlib.scale), in a private namespace:
  - the desired state of 100,000 snapshots (Pools.update, as a full sync makes it from nothing);
  - a full load: its messages made (nftnat_netlink.table_batch) and encoded, and the kernel's share (the time
    in NatSocket.transact: the kernel does a transaction's work within the send), sent one part after the other;
  - one frontend's 10 -> 9 -> 10 backend change: the kernel's share, p50 of REPEATS x 20 transactions,
and the ratios of the largest size to the smallest. The daemon overlaps a load's encoding and the kernel's work
(a part is sent while the next is made); here they are timed apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from tcprouter.model import Family
from tcprouter.nftnat import nat_pools, table_parts
from tcprouter.nftnat_netlink import NatSocket, Request, change_batch, table_batch
from tcprouter.pools import Pools
from tcprouter.sync import NAT_LOAD_PARTS

from .common import median, netns_add
from .scale import BACKENDS_PER_FRONTEND, OPTIONS, snapshots

NFT_OPTIONS = dataclasses.replace(OPTIONS, nat_tables=True)
T = TypeVar("T")


def _timed(action: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    value = action()
    return value, time.perf_counter() - started


def figures(frontends: int, repeats: int) -> dict[str, float]:
    containers = snapshots(frontends)
    pools = Pools("tcp")
    _, desired_s = _timed(lambda: pools.update(pools.changes(containers), {}))
    state = pools.state()
    batches, make_s = _timed(
        lambda: [table_batch(p, NFT_OPTIONS, names) for names, p in table_parts(state, NFT_OPTIONS, NAT_LOAD_PARTS)]
    )
    with contextlib.ExitStack() as stack:
        netns = netns_add(stack, "tcpr-bench-l-")
        sock = stack.enter_context(NatSocket(netns, timeout=120))
        encoded, encode_s = _timed(lambda: [sock.encode(batch) for batch in batches])
        kernel_s = 0.0
        for (data, sequence), batch in zip(encoded, batches, strict=True):
            kernel_s += _timed(lambda: sock.transact(data, sequence, batch))[1]  # noqa: B023
        whole = next(iter(nat_pools(state, NFT_OPTIONS).values()))
        shrunk = dataclasses.replace(whole, slots=whole.slots[:-1])
        change: list[float] = []
        for i in range(20 * repeats):
            messages: list[Request] = change_batch(*((whole, shrunk) if i % 2 == 0 else (shrunk, whole)), Family.IPV4)
            data, sequence = sock.encode(messages)
            change.append(_timed(lambda: sock.transact(data, sequence, messages))[1])  # noqa: B023
    return {
        "frontends": frontends,
        "desired_s": desired_s,
        "load_make_s": make_s,
        "load_encode_s": encode_s,
        "load_kernel_s": kernel_s,
        "load_mib": sum(len(data) for data, _ in encoded) / 2**20,
        "change_kernel_ms": median(change) * 1e3,
    }


def table(rows: list[dict[str, float]]) -> str:
    lines = [
        "| size | desired state s | load: messages made s | encoded s | kernel s (MiB) | a change: kernel ms p50 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['frontends']:,} x {BACKENDS_PER_FRONTEND} | {r['desired_s']:.2f} | {r['load_make_s']:.2f} | "
            f"{r['load_encode_s']:.2f} | {r['load_kernel_s']:.2f} ({r['load_mib']:.1f}) | {r['change_kernel_ms']:.3f} |"
        )
    first, last = rows[0], rows[-1]
    lines.append(
        f"\nlargest / smallest: a change's kernel share {last['change_kernel_ms'] / first['change_kernel_ms']:.2f}x"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sizes = [int(n) for n in sys.argv[1].split(",")]
    print(table([figures(n, int(sys.argv[2]) if len(sys.argv) > 2 else 3) for n in sizes]))
