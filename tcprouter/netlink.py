"""Netlink's wire format and sockets, for the few requests tcprouter makes of the kernel itself: nf_tables (its nat
tables: nftnat_netlink writes them, nftnat_read reads their counters, netfilter lists them and reads the ruleset's
generation) and sock_diag (the host's listeners, hostports).

Written here rather than taken from pyroute2: importing pyroute2 costs the daemon ~22 MB of resident memory, and
encoding one frontend's change through its message classes ~10 ms (BENCHMARKS.md); the messages tcprouter sends
are a handful of fixed shapes, built from the helpers below. Attributes are (type, value) pairs, the value's length
unaligned in the header and the value padded to 4 bytes (linux/netlink.h).
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
from collections.abc import Iterator
from typing import NamedTuple

# linux/netlink.h
NETLINK_SOCK_DIAG, NETLINK_NETFILTER = 4, 12
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_ECHO, NLM_F_DUMP_INTR = 0x1, 0x4, 0x8, 0x10
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 0x100, 0x200, 0x400, 0x800
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # an attribute's type without the nested and byte-order flags
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
SO_SNDBUFFORCE = 32
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"  # where `ip netns add` mounts a named namespace
SOCK_DIAG_BY_FAMILY = 20  # linux/sock_diag.h: the request (and its replies) of a NETLINK_SOCK_DIAG dump

# linux/netfilter/nfnetlink.h: nf_tables' messages carry the subsystem in their type's high byte, then nfgenmsg
NFNL_SUBSYS_NFTABLES = 10
NFGENMSG = struct.Struct("=BBH")  # family, version, resource id (big-endian; 0 but in a batch's begin and end)

HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence number, port id
ATTRIBUTE = struct.Struct("=HH")  # nlattr: length (header included, value unaligned), type
ERROR = struct.Struct("=i")  # nlmsgerr: a negative errno, or 0 (an ack), then the request's header
RECEIVE_SIZE = 1 << 16  # above the 32 KiB the kernel fills a dump's datagram with at most
_BIG_U32 = struct.Struct(">I")


# --- encoding ---


def attribute(kind: int, value: bytes) -> bytes:
    """One attribute: its header, its value, the padding to 4 bytes."""
    return ATTRIBUTE.pack(4 + len(value), kind) + value + bytes(-len(value) % 4)


def nested(kind: int, *children: bytes) -> bytes:
    """An attribute holding attributes (already encoded, padded)."""
    return attribute(kind | NLA_F_NESTED, b"".join(children))


def string(kind: int, value: str) -> bytes:
    """A NUL-terminated string attribute."""
    return attribute(kind, value.encode() + b"\0")


def big32(kind: int, value: int) -> bytes:
    """A u32 attribute in network order (nf_tables' NLA_U32 values are)."""
    return attribute(kind, _BIG_U32.pack(value & 0xFFFFFFFF))


def message(msg_type: int, flags: int, sequence: int, payload: bytes) -> bytes:
    """A netlink message: its header, then `payload` (a family header and attributes), padded."""
    return HEADER.pack(HEADER.size + len(payload), msg_type, flags, sequence, 0) + payload + bytes(-len(payload) % 4)


def nftables_request(msg_type: int, family: int, attributes: bytes = b"") -> tuple[int, bytes]:
    """An nf_tables message's type and payload (nfgenmsg, then the attributes), for message() or Requester.ask()."""
    return NFNL_SUBSYS_NFTABLES << 8 | msg_type, NFGENMSG.pack(family, 0, 0) + attributes


# --- decoding ---


def attributes(data: bytes, unpack_from=ATTRIBUTE.unpack_from) -> dict[int, bytes]:
    """The attributes in `data` by type (flags stripped; the last of a type wins), their values unaligned. A hot loop
    (half a million attributes a counter read at 10,000 x 10): hence the inlined alignment and the bound unpack."""
    found: dict[int, bytes] = {}
    offset, end = 0, len(data) - 4
    while offset <= end:
        length, kind = unpack_from(data, offset)
        if length < 4:
            break
        found[kind & NLA_TYPE_MASK] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return found


def entries(data: bytes, kind: int) -> Iterator[bytes]:
    """The values of the attributes of type `kind` in `data`, in order (a nested list's entries)."""
    offset, end = 0, len(data) - 4
    while offset <= end:
        length, found = ATTRIBUTE.unpack_from(data, offset)
        if length < 4:
            break
        if found & NLA_TYPE_MASK == kind:
            yield data[offset + 4 : offset + length]
        offset += (length + 3) & ~3


def text(value: bytes) -> str:
    """A NUL-terminated string's text."""
    return value.split(b"\0", 1)[0].decode(errors="replace")


def big32_value(value: bytes) -> int:
    return _BIG_U32.unpack(value)[0]


class Message(NamedTuple):
    type: int  # as sent: for nfnetlink, the subsystem in the high byte
    flags: int
    sequence: int
    payload: bytes  # after the netlink header: the family's header then attributes, or an error's errno then more


def messages(datagram: bytes) -> Iterator[Message]:
    """The messages of one datagram."""
    offset = 0
    while offset + HEADER.size <= len(datagram):
        length, msg_type, flags, sequence, _ = HEADER.unpack_from(datagram, offset)
        if length < HEADER.size:
            break
        yield Message(msg_type, flags, sequence, datagram[offset + HEADER.size : offset + length])
        offset += (length + 3) & ~3


def nftables_attributes(msg: Message) -> bytes:
    """An nf_tables message's attributes: its payload after nfgenmsg."""
    return msg.payload[NFGENMSG.size :]


def error_of(msg: Message) -> int:
    """An NLMSG_ERROR's or NLMSG_DONE's errno (positive; 0: an ack, or a dump's clean end)."""
    return -ERROR.unpack_from(msg.payload)[0] if len(msg.payload) >= ERROR.size else 0


# --- sockets ---

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"setns: {os.strerror(number)}")


def open_socket(protocol: int, netns: str | None = None) -> socket.socket:
    """A netlink socket of `protocol` opened in network namespace `netns` (a name of `ip netns`; None: this thread's).
    Only this thread enters the namespace, and comes back; a missing namespace is an error (FileNotFoundError), never
    created. A path (starting with /) names a namespace file of any other kind (/proc/<pid>/ns/net)."""
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    there = os.open(os.path.join(NETNS_RUN_DIR, netns), os.O_RDONLY)  # join: a path stays whole
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(there)
        try:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        finally:
            _setns(here)
    finally:
        os.close(here)
        os.close(there)


class Requester:
    """A netlink socket that asks one thing at a time: a request answered by an ack, or a dump."""

    def __init__(self, protocol: int, netns: str | None = None, timeout: float = 5.0) -> None:
        self.sock = open_socket(protocol, netns)
        self.sock.settimeout(timeout)
        self._sequence = 0

    def next_sequence(self) -> int:
        self._sequence = self._sequence % 0x7FFFFFFF + 1
        return self._sequence

    def ask(self, msg_type: int, payload: bytes, flags: int = NLM_F_REQUEST) -> tuple[list[Message], bool]:
        """The replies to a request (with NLM_F_DUMP in `flags`, a dump: up to its end), and whether the kernel flagged
        the dump as interrupted by a change. OSError with the kernel's errno if it refuses (ENOENT: no such object);
        TimeoutError if it does not answer in time."""
        sequence = self.next_sequence()
        self.sock.send(message(msg_type, flags, sequence, payload))
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        replies: list[Message] = []
        interrupted = False
        while True:
            for reply in messages(self.sock.recv(RECEIVE_SIZE)):
                if reply.sequence != sequence:
                    continue
                interrupted = interrupted or bool(reply.flags & NLM_F_DUMP_INTR)
                if reply.type not in (NLMSG_DONE, NLMSG_ERROR):
                    replies.append(reply)
                    if not dump:
                        return replies, interrupted
                    continue
                number = error_of(reply)
                if number:
                    raise OSError(number, f"netlink request refused: {os.strerror(number)}")
                if reply.type == NLMSG_DONE or not dump:
                    return replies, interrupted

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Requester:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
