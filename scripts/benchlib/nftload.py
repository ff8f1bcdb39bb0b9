"""Where the time of `--nat nftables` writes goes: the daemon's Python against the kernel's share.

`cd scripts && python -m benchlib.nftload 10,10000 [REPEATS]` prints, per size (frontends x 10 backends, synthetic
addresses as in benchlib.scale), in a private namespace:
  - the desired state of 100,000 snapshots (Pools.update, as a full sync makes it from nothing);
  - a full load: its messages made (nftnat_netlink.load_batches) and encoded, and the kernel's share (the time
    in NatSocket.transact: the kernel does a transaction's work within the send), sent one part after the other;
  - one frontend's 10 -> 9 -> 10 backend change: the kernel's share, p50 of REPEATS x 20 transactions; and the same
    for one of its backends replaced by another (the size stays: only the maps' elements change);
  - a read of the slots' counters as the metrics make it (nftnat_read.slot_counts, then the totals of both protocols
    folded), beside the same counts made from the slots read as DNAT rules (slot_rules, which `status` reads, then
    metrics.backend_connections: how the metrics read them before), the best of REPEATS each,
and the ratios of the largest size to the smallest. The daemon overlaps a load's encoding and the kernel's work
(a part is sent while the next is made); here they are timed apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

from tcprouter.metrics import StateCollector
from tcprouter.model import Family, Protocol
from tcprouter.nftnat import NatPool, Slot, nat_pools, table_of
from tcprouter.nftnat_netlink import NatSocket, Request, change_batch, load_batches
from tcprouter.nftnat_read import slot_counts, slot_rules
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
    batches, make_s = _timed(lambda: list(load_batches(state, NFT_OPTIONS, NAT_LOAD_PARTS)))
    with contextlib.ExitStack() as stack:
        netns = netns_add(stack, "tcpr-bench-l-")
        sock = stack.enter_context(NatSocket(netns, timeout=120))
        encoded, encode_s = _timed(lambda: [sock.encode(batch) for batch in batches])
        kernel_s = 0.0
        for (data, sequence), batch in zip(encoded, batches, strict=True):
            kernel_s += _timed(lambda: sock.transact(data, sequence, batch))[1]  # noqa: B023
        whole = next(iter(nat_pools(state, NFT_OPTIONS).values()))
        shrunk = dataclasses.replace(whole, slots=whole.slots[:-1])  # a backend leaves: the pool's size changes
        swapped = dataclasses.replace(whole, slots=(*whole.slots[:-1], Slot("198.51.100.7", 80, "spare")))
        change, swap = _changes(sock, whole, shrunk, 20 * repeats), _changes(sock, whole, swapped, 20 * repeats)
        counted_s = min(_timed(lambda: _metrics_read(netns))[1] for _ in range(repeats))
        as_rules_s = min(_timed(lambda: _read_as_rules(netns))[1] for _ in range(repeats))
        assert _metrics_read(netns) == _read_as_rules(netns), "the two readings differ"
    return {
        "frontends": frontends,
        "read_counted_s": counted_s,
        "read_as_rules_s": as_rules_s,
        "desired_s": desired_s,
        "load_make_s": make_s,
        "load_encode_s": encode_s,
        "load_kernel_s": kernel_s,
        "load_mib": sum(len(data) for data, _ in encoded) / 2**20,
        "change_kernel_ms": median(change) * 1e3,
        "swap_kernel_ms": median(swap) * 1e3,
    }


def _changes(sock: NatSocket, one: NatPool, other: NatPool, count: int) -> list[float]:
    """The kernel's share of `count` changes of a pool from `one` to `other` and back, each (the handle of its
    rule read once, then echoed by each change that replaces it, as the daemon does)."""
    times = []
    handles = sock.chain_handles(Family.IPV4, table_of(one.port), one.pick_chain)
    for i in range(count):
        before, after = (one, other) if i % 2 == 0 else (other, one)
        messages: list[Request] = change_batch(before, after, Family.IPV4, handles[before.name])
        data, sequence = sock.encode(messages)
        echoed, took = _timed(lambda: sock.transact(data, sequence, messages))  # noqa: B023
        handles.update(echoed)
        times.append(took)
    return times


def _metrics_read(netns: str) -> dict[Protocol, Mapping[tuple[str, str], int]]:
    """The slots' totals of both protocols as the metrics read them."""
    counted, collector = slot_counts(Family.IPV4, netns, 120), StateCollector(lambda: ({}, []))
    return {p: collector.connection_totals([], p, Family.IPV4, counted[p]) for p in Protocol}


def _read_as_rules(netns: str) -> dict[Protocol, Mapping[tuple[str, str], int]]:
    """The same totals from the slots read as DNAT rules (metrics.backend_connections parses them)."""
    rules, collector = slot_rules(Family.IPV4, netns, 120), StateCollector(lambda: ({}, []))
    return {p: collector.connection_totals(rules, p) for p in Protocol}


def table(rows: list[dict[str, float]]) -> str:
    lines = [
        "| size | desired state s | load: messages made s | encoded s | kernel s (MiB) | a change: kernel ms p50 "
        "| a backend replaced (same size): kernel ms p50 | a metrics read of the slots s: counted / as rules |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['frontends']:,} x {BACKENDS_PER_FRONTEND} | {r['desired_s']:.2f} | {r['load_make_s']:.2f} | "
            f"{r['load_encode_s']:.2f} | {r['load_kernel_s']:.2f} ({r['load_mib']:.1f}) | {r['change_kernel_ms']:.3f} "
            f"| {r['swap_kernel_ms']:.3f} | {r['read_counted_s']:.2f} / {r['read_as_rules_s']:.2f} |"
        )
    first, last = rows[0], rows[-1]
    lines.append(
        f"\nlargest / smallest: a change's kernel share {last['change_kernel_ms'] / first['change_kernel_ms']:.2f}x, "
        f"a backend replaced {last['swap_kernel_ms'] / first['swap_kernel_ms']:.2f}x"
    )
    lines.append(
        f"a metrics read at the largest, counted / as rules: {last['read_counted_s'] / last['read_as_rules_s']:.2f}x"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sizes = [int(n) for n in sys.argv[1].split(",")]
    print(table([figures(n, int(sys.argv[2]) if len(sys.argv) > 2 else 3) for n in sizes]))
