"""The slots of tcprouter's nat tables (nftnat.py) read over nf_tables netlink, without the nft CLI, which fetches,
resolves and prints every object of the family (20-22 s at 10,000 frontends x 10, over the metrics' 5 s read timeout).

One dump of the family's sets finds the maps `slots-<protocol>-<port>` of the tables `tcprouter-*`; then one dump
per map of its elements (the kernel dumps one named set's elements at a time, one dump at a time per socket), each
element a slot: its number (the key), address . port (the data), its counter's packets and its comment (the
backend's name). The replies are parsed here with struct, in the few functions below (pyroute2's decoding would
take seconds). Two readings of them:
  - frontend_counts, for the metrics: the packets per backend, a map at a time (slot_counts: all of them), ~0.9-1.2 s
    at 10,000 x 10 on a 2-core VM, ~0.35 s of it in the kernel (10,000 dumps), the rest parsing 100,000 elements;
  - slot_rules, for `status` and the tests: each slot as the DNAT rule iptables would hold (what
    tests/nft_listing.py makes of `nft -j list ruleset <family>`), ~1.4-1.8 s at that size (BENCHMARKS.md,
    "Sixth pass": `benchlib.nftload` times both).
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import NamedTuple

from . import netlink
from .compiler import destination, frontend_chain, save_string
from .diff import SavedRule
from .model import Family, Protocol
from .nf_tables import (
    NFPROTO_IPV4,
    NFPROTO_IPV6,
    NFT_MSG_GETSET,
    NFT_MSG_GETSETELEM,
    NFT_MSG_NEWSET,
    NFT_MSG_NEWSETELEM,
    NFTA_COUNTER_BYTES,
    NFTA_COUNTER_PACKETS,
    NFTA_DATA_VALUE,
    NFTA_EXPR_DATA,
    NFTA_EXPR_NAME,
    NFTA_LIST_ELEM,
    NFTA_SET_ELEM_DATA,
    NFTA_SET_ELEM_EXPR,
    NFTA_SET_ELEM_EXPRESSIONS,
    NFTA_SET_ELEM_KEY,
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE,
    NFTA_SET_ELEM_USERDATA,
    NFTA_SET_NAME,
    NFTA_SET_TABLE,
    NFTNL_UDATA_SET_ELEM_COMMENT,
)
from .nftnat import TABLE_PREFIX

_HOST_U32 = struct.Struct("=I")
_BIG_U16 = struct.Struct(">H")
_BIG_U64 = struct.Struct(">Q")
_SLOTS_MAP = re.compile(r"slots-(tcp|udp)-([0-9]+)")  # tcprouter's slot maps
_BARE_WORD = re.compile(r"[A-Za-z0-9_-]+")  # what compiler.save_string leaves unquoted


def _list(data: bytes) -> Iterator[bytes]:
    """The values of a nested list's entries (NFTA_LIST_ELEM), in order."""
    return netlink.entries(data, NFTA_LIST_ELEM)


# --- what an element holds ---


class _Message(NamedTuple):
    """A reply of a dump: its nf_tables message type, its attributes."""

    type: int
    attributes: bytes


class _Fields(NamedTuple):
    """An element of a slots map, its values still bytes."""

    slot: int  # the key: a host-order u32
    target: bytes  # the data: address . port
    packets: int  # its counter's (0 without a counter)
    userdata: bytes  # libnftnl's TLVs


def _data_value(nest: bytes) -> bytes:
    """The value of a nested nft_data: NFTA_DATA_VALUE, its only attribute when it holds a value."""
    if len(nest) >= 4:
        length, kind = netlink.ATTRIBUTE.unpack_from(nest)
        if kind & netlink.NLA_TYPE_MASK == NFTA_DATA_VALUE:
            return nest[4:length]
    return b""


def _counter_packets(expression: bytes) -> int | None:
    """The packets of a `counter` expression (NFTA_EXPR_NAME, NFTA_EXPR_DATA); None for another expression."""
    attributes = netlink.attributes(expression)
    if attributes.get(NFTA_EXPR_NAME) != b"counter\0":
        return None
    packets = netlink.attributes(attributes.get(NFTA_EXPR_DATA, b"")).get(NFTA_COUNTER_PACKETS, b"")
    return _BIG_U64.unpack(packets)[0] if len(packets) == 8 else 0


def _packets(attributes: dict[int, bytes]) -> int:
    """The packets counted by an element's counter (its one expression, or one among several); 0 if it has none."""
    if NFTA_SET_ELEM_EXPR in attributes:
        return _counter_packets(attributes[NFTA_SET_ELEM_EXPR]) or 0
    counted = map(_counter_packets, _list(attributes.get(NFTA_SET_ELEM_EXPRESSIONS, b"")))
    return next((packets for packets in counted if packets is not None), 0)


def _parsed(element: bytes) -> _Fields:
    """An element's fields, its attributes parsed one by one, in any order and with any others."""
    attributes = netlink.attributes(element)
    key = _data_value(attributes.get(NFTA_SET_ELEM_KEY, b""))
    return _Fields(
        _HOST_U32.unpack(key)[0] if len(key) == 4 else 0,
        _data_value(attributes.get(NFTA_SET_ELEM_DATA, b"")),
        _packets(attributes),
        attributes.get(NFTA_SET_ELEM_USERDATA, b""),
    )


def _header(length: int, kind: int) -> bytes:
    return netlink.ATTRIBUTE.pack(length, kind)


@dataclass(frozen=True)
class _Shape:
    """An element of a slots map as the kernel writes it (6.x, nf_tables_fill_setelem): its key, its data, its one
    counter (bytes, then packets, without the padding attributes of CPUs that read 64-bit words aligned only), then
    its userdata if any, nothing else. On an element whose headers match, the fields are read at their offsets, in
    half _parsed's time (0.2 s less a read at 10,000 x 10); any other element is left to _parsed."""

    headers: tuple[tuple[int, bytes], ...]  # (offset, the headers there)
    target_at: int
    target_len: int
    packets_at: int
    userdata_at: int

    @staticmethod
    def of(target_len: int) -> _Shape:
        data_at = 12  # after the key: its header, its value's, a u32
        counter_at = data_at + 8 + target_len
        counter = _header(12, NFTA_EXPR_NAME) + b"counter\0" + _header(28, NFTA_EXPR_DATA)
        headers = (
            (0, _header(12, NFTA_SET_ELEM_KEY) + _header(8, NFTA_DATA_VALUE)),
            (data_at, _header(8 + target_len, NFTA_SET_ELEM_DATA) + _header(4 + target_len, NFTA_DATA_VALUE)),
            (counter_at, _header(44, NFTA_SET_ELEM_EXPR) + counter + _header(12, NFTA_COUNTER_BYTES)),
            (counter_at + 32, _header(12, NFTA_COUNTER_PACKETS)),
        )
        return _Shape(headers, data_at + 8, target_len, counter_at + 36, counter_at + 44)

    def fields(self, element: bytes) -> _Fields | None:
        """The element's fields if it has this shape, else None."""
        for offset, header in self.headers:
            if element[offset : offset + len(header)] != header:
                return None
        userdata = b""
        if len(element) > self.userdata_at:
            length, kind = netlink.ATTRIBUTE.unpack_from(element, self.userdata_at)
            if kind != NFTA_SET_ELEM_USERDATA or self.userdata_at + ((length + 3) & ~3) != len(element):
                return None
            userdata = element[self.userdata_at + 4 : self.userdata_at + length]
        return _Fields(
            _HOST_U32.unpack_from(element, 8)[0],
            element[self.target_at : self.target_at + self.target_len],
            _BIG_U64.unpack_from(element, self.packets_at)[0],
            userdata,
        )


def userdata_comment(userdata: bytes, comment_kind: int = NFTNL_UDATA_SET_ELEM_COMMENT) -> str:
    """The comment among libnftnl's TLVs of an element's userdata, or a rule's (NFTNL_UDATA_RULE_COMMENT; type and
    length a byte each), '' if none."""
    offset = 0
    while offset + 2 <= len(userdata):
        kind, length = userdata[offset], userdata[offset + 1]
        if kind == comment_kind:
            return netlink.text(userdata[offset + 2 : offset + 2 + length])
        offset += 2 + length
    return ""


def _saved(comment: str) -> str:
    """compiler.save_string, the common case first: a bare word (nftnat's names mostly are)."""
    return comment if _BARE_WORD.fullmatch(comment) else save_string(comment)


@dataclass(frozen=True)
class _Layout:
    """How a family's slots maps hold their data: address . port, the port big-endian at the head of its 32-bit
    register."""

    nfproto: int
    address_family: int
    address_len: int
    shape: _Shape


_LAYOUTS = {
    Family.IPV4: _Layout(NFPROTO_IPV4, socket.AF_INET, 4, _Shape.of(4 + 4)),
    Family.IPV6: _Layout(NFPROTO_IPV6, socket.AF_INET6, 16, _Shape.of(16 + 4)),
}


@dataclass(frozen=True)
class _SlotsMap:
    """A slots map of one of tcprouter's tables: the frontend whose slots it holds."""

    table: str
    name: str
    protocol: Protocol
    port: int

    @staticmethod
    def named(table: str, name: str) -> _SlotsMap | None:
        """The map, if a set of that name in that table is a slots map."""
        found = _SLOTS_MAP.fullmatch(name)
        if not table.startswith(TABLE_PREFIX) or found is None:
            return None
        return _SlotsMap(table, name, Protocol(found.group(1)), int(found.group(2)))

    def elements_request(self) -> bytes:
        """NFT_MSG_GETSETELEM's attributes: which set's elements."""
        table = netlink.string(NFTA_SET_ELEM_LIST_TABLE, self.table)
        return table + netlink.string(NFTA_SET_ELEM_LIST_SET, self.name)

    def rule(self, fields: _Fields, layout: _Layout) -> SavedRule:
        """The DNAT rule iptables would hold for a slot (as tests/nft_listing.py reads it from nft)."""
        address = socket.inet_ntop(layout.address_family, fields.target[: layout.address_len])  # as nft prints it
        (port,) = _BIG_U16.unpack_from(fields.target, layout.address_len)
        comment, target = _saved(userdata_comment(fields.userdata)), destination(address, port)
        return SavedRule(
            frontend_chain(self.port, self.protocol),
            f"-p {self.protocol} -m comment --comment {comment} -j DNAT --to-destination {target}",
            fields.packets,
        )


# --- reading ---


class _Dumper:
    """A netfilter netlink socket that runs one dump at a time."""

    def __init__(self, netns: str | None, timeout: float) -> None:
        self._requester = netlink.Requester(netlink.NETLINK_NETFILTER, netns, timeout)

    def dump(self, msg_type: int, layout: _Layout, attributes: bytes = b"") -> tuple[list[_Message], bool]:
        """The replies to a dump request of nf_tables message `msg_type` about `layout`'s family (their types without
        the subsystem), and whether the ruleset changed during the dump. OSError with the kernel's errno if it refuses
        the request (ENOENT: no such table or set); TimeoutError if it does not answer in time."""
        kind, payload = netlink.nftables_request(msg_type, layout.nfproto, attributes)
        replies, interrupted = self._requester.ask(kind, payload, netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP)
        return [_Message(r.type & 0xFF, netlink.nftables_attributes(r)) for r in replies], interrupted

    def close(self) -> None:
        self._requester.close()


def _slots_maps(dumper: _Dumper, layout: _Layout) -> list[_SlotsMap]:
    """The slots maps of tcprouter's tables, in the kernel's order (tables, then sets, as created: nft lists them in
    that order). A dump the ruleset changed under may have skipped a set or seen one twice: it is taken again, up to
    twice more."""
    for _ in range(3):
        replies, interrupted = dumper.dump(NFT_MSG_GETSET, layout)
        if not interrupted:
            break
    maps = []
    for message in replies:
        if message.type == NFT_MSG_NEWSET:
            attributes = netlink.attributes(message.attributes)
            table = netlink.text(attributes.get(NFTA_SET_TABLE, b""))
            found = _SlotsMap.named(table, netlink.text(attributes.get(NFTA_SET_NAME, b"")))
            if found is not None:
                maps.append(found)
    return maps


def _slots(dumper: _Dumper, layout: _Layout, slots_map: _SlotsMap) -> list[_Fields]:
    """A slots map's elements whose data is address . port, in slot order."""
    replies, _ = dumper.dump(NFT_MSG_GETSETELEM, layout, slots_map.elements_request())
    slots = []
    for message in replies:
        if message.type == NFT_MSG_NEWSETELEM:
            for element in _list(netlink.attributes(message.attributes).get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")):
                fields = layout.shape.fields(element) or _parsed(element)
                if len(fields.target) == layout.address_len + 4:
                    slots.append(fields)
    slots.sort(key=attrgetter("slot"))
    return slots


def _maps(family: Family, netns: str | None, timeout: float) -> Iterator[tuple[_SlotsMap, list[_Fields]]]:
    """Each slots map of tcprouter's tables of `family` (in namespace `netns`), in the kernel's order, with its slots.
    A table or map that goes away meanwhile is left out; OSError if the read fails (`timeout`: the seconds the kernel
    may take to answer any one request)."""
    layout = _LAYOUTS[family]
    dumper = _Dumper(netns, timeout)
    try:
        for slots_map in _slots_maps(dumper, layout):
            try:
                slots = _slots(dumper, layout, slots_map)
            except FileNotFoundError:  # ENOENT: the table or the map is gone
                continue
            yield slots_map, slots
    finally:
        dumper.close()


def slot_rules(family: Family, netns: str | None = None, timeout: float = 5.0) -> list[tuple[str, SavedRule]]:
    """The slots maps of tcprouter's tables as tests/nft_listing.py reads them from `nft -j list ruleset`: the same
    list, in the same order (the maps in the kernel's order, as nft lists them; each map's elements by slot number).
    As _maps reads them."""
    layout = _LAYOUTS[family]
    return [
        ("nat", slots_map.rule(fields, layout))
        for slots_map, slots in _maps(family, netns, timeout)
        for fields in slots
    ]


class Counted(NamedTuple):
    """Kernel counters per frontend (its port as text), each per something of that frontend (a backend's name, a
    refusal's reason), and digests of what holds those counters (a chain's rules, a map's slots; counters excluded),
    per frontend (the slots) or per (frontend, something) (the refusals): where one changed since the last read, that
    was written again and its counters restarted. Nested: a map per frontend holds 100,000 counts (10,000 x 10) in
    ~7 MB less than one map keyed by 100,000 (port, name) pairs."""

    counts: dict[str, dict[str, int]]
    digests: dict[Hashable, int]

    @staticmethod
    def nest(flat: Mapping[tuple[str, str], int]) -> dict[str, dict[str, int]]:
        """(port, name) -> count, as counts."""
        nested: dict[str, dict[str, int]] = {}
        for (port, name), count in flat.items():
            nested.setdefault(port, {})[name] = count
        return nested


class FrontendCounts(NamedTuple):
    """What one frontend's slots counted: per backend name, and the digest of its map's slots."""

    protocol: Protocol
    port: str
    digest: int
    counts: dict[str, int]


def frontend_counts(family: Family, netns: str | None = None, timeout: float = 5.0) -> Iterator[FrontendCounts]:
    """The new connections (UDP: flows) each backend's slots counted, as metrics.backend_connections counts them in
    slot_rules (the slots of one name summed), without making the rules; a frontend at a time, as _maps reads them
    (whoever keeps them can make each one its own before the next is read)."""
    for slots_map, slots in _maps(family, netns, timeout):
        counts: dict[str, int] = {}
        for fields in slots:
            name = userdata_comment(fields.userdata)
            counts[name] = counts.get(name, 0) + fields.packets
        digest = hash(tuple((fields.slot, fields.target, fields.userdata) for fields in slots))
        yield FrontendCounts(slots_map.protocol, str(slots_map.port), digest, counts)


def by_protocol(frontends: Iterable[FrontendCounts]) -> dict[Protocol, Counted]:
    """Frontends' counts gathered per protocol, each frontend's digest kept under its port."""
    counted = {protocol: Counted({}, {}) for protocol in Protocol}
    for found in frontends:
        counted[found.protocol].counts[found.port] = found.counts
        counted[found.protocol].digests[found.port] = found.digest
    return counted


def slot_counts(family: Family, netns: str | None = None, timeout: float = 5.0) -> dict[Protocol, Counted]:
    """frontend_counts, all of them, per protocol."""
    return by_protocol(frontend_counts(family, netns, timeout))
