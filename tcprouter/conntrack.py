"""Conntrack entries of backends that left, deleted through the kernel's conntrack netlink interface (pyroute2).

A UDP flow has no end the kernel can see: its entry keeps sending the client's datagrams to the backend it was
dispatched to until the entry times out (30 s after the last datagram, or 120 s for a stream), even when that
backend is gone and the DNAT rule that chose it was removed. Deleting the entry makes the client's next datagram
a new flow, which the frontend's rules dispatch afresh. The same is done for the TCP connections of a backend
that is gone (sync.departed decides which), so that a client's next segment is answered by a reset at once.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Collection

from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from .model import Family, Protocol, family_of

Endpoint = tuple[str, int]
_IPPROTO = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP}
_ADDRESS_FAMILY = {Family.IPV4: socket.AF_INET, Family.IPV6: socket.AF_INET6}


def forget_flows(protocol: Protocol, endpoints: Collection[Endpoint], mark_bit: int) -> int:
    """Delete the entries of routed flows (their connection mark has `mark_bit`) of `protocol` whose replies come
    from one of `endpoints` (a backend's address and port, as its DNAT rule named them). Returns how many went.

    The endpoints are of one family (one Syncer's): that family's entries are read.
    Raises OSError (NetlinkError is one) if the conntrack table cannot be read.
    """
    if not endpoints:
        return 0
    family = _ADDRESS_FAMILY[family_of(next(iter(endpoints))[0])]
    with Conntrack() as ct:
        # One dump, filtered by the kernel on the mark and the protocol; the endpoints are matched here.
        stale = [
            entry
            for entry in ct.dump_entries(
                mark=mark_bit, mark_mask=mark_bit, tuple_orig=NFCTAttrTuple(family=family, proto=_IPPROTO[protocol])
            )
            if (entry.tuple_reply.saddr, entry.tuple_reply.sport) in endpoints
        ]
        deleted = 0
        for entry in stale:
            try:
                ct.delete(entry)
            except NetlinkError as error:
                if error.code != errno.ENOENT:  # gone meanwhile (it timed out): nothing to do
                    raise
            else:
                deleted += 1
    return deleted
