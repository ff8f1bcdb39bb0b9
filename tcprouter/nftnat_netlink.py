"""One frontend's change to the nat layout of nftnat.py as one nf_tables transaction over netlink, without the nft CLI
(which reads its whole cache before each command: ~130 ms at 10,000 frontends, against a few ms here).

change_batch(before, after, family, handle) gives the messages that turn the kernel's objects of one NatPool into
those of another (or create or remove them) in the table of its port: its map `slots-...`, its rule in its pick
chain, and its elements of the table's sets and maps (frontends, access, unrouted, self). The objects end up as
`nft -f` of ruleset_text makes them (nft 1.0.6: the same set flags, types and userdata, element comments, rule
expressions); NatSocket sends such messages, from one or more changes, as one transaction, in a network namespace
of choice.

The frontend's rule is replaced only when its pool's size or kind of rotation changes (pick_changes), by deleting it
by its handle and appending the new one, which the kernel echoes back with its handle (NatSocket.send gives them;
NatSocket.chain_handles reads a chain's, after a full load, which echoes nothing). The other rules of its pick chain
are left alone, and so are their rotations. A slot map whose declaration changes (`typeof numgen inc mod N` carries
the pool's size in the map's userdata) is deleted and created again, another is flushed and refilled. Either way the
slots' counters start again from 0, as after a reload by `nft -f`.

The messages are encoded here, with netlink.py's helpers, as libnftnl encodes them (attribute types and values of
linux/netfilter/nf_tables.h; its u32 values big-endian, its nests flagged NLA_F_NESTED).
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import socket
import struct
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

from . import netlink
from .compiler import Options, access_bit
from .model import DesiredState, Family, Protocol
from .netlink import (
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_ECHO,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    big32,
    nested,
    string,
)
from .nf_tables import (
    NF_ACCEPT,
    NF_INET_LOCAL_OUT,
    NF_INET_PRE_ROUTING,
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    NFPROTO_IPV4,
    NFPROTO_IPV6,
    NFT_BITWISE_BOOL,
    NFT_CMP_EQ,
    NFT_CMP_NEQ,
    NFT_CT_MARK,
    NFT_DATA_VERDICT,
    NFT_FIB_RESULT_ADDRTYPE,
    NFT_GOTO,
    NFT_META_L4PROTO,
    NFT_MSG_DELCHAIN,
    NFT_MSG_DELRULE,
    NFT_MSG_DELSET,
    NFT_MSG_DELSETELEM,
    NFT_MSG_DELTABLE,
    NFT_MSG_GETRULE,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWSET,
    NFT_MSG_NEWSETELEM,
    NFT_MSG_NEWTABLE,
    NFT_NAT_DNAT,
    NFT_NG_INCREMENTAL,
    NFT_NG_RANDOM,
    NFT_PAYLOAD_NETWORK_HEADER,
    NFT_PAYLOAD_TRANSPORT_HEADER,
    NFT_REG32_01,
    NFT_REG32_02,
    NFT_REG_1,
    NFT_REG_2,
    NFT_REG_VERDICT,
    NFT_RETURN,
    NFT_SET_MAP,
    NFTA_BITWISE_DREG,
    NFTA_BITWISE_LEN,
    NFTA_BITWISE_MASK,
    NFTA_BITWISE_OP,
    NFTA_BITWISE_SREG,
    NFTA_BITWISE_XOR,
    NFTA_CHAIN_HOOK,
    NFTA_CHAIN_NAME,
    NFTA_CHAIN_POLICY,
    NFTA_CHAIN_TABLE,
    NFTA_CHAIN_TYPE,
    NFTA_CMP_DATA,
    NFTA_CMP_OP,
    NFTA_CMP_SREG,
    NFTA_CT_DREG,
    NFTA_CT_KEY,
    NFTA_CT_SREG,
    NFTA_DATA_VALUE,
    NFTA_DATA_VERDICT,
    NFTA_EXPR_DATA,
    NFTA_EXPR_NAME,
    NFTA_FIB_DREG,
    NFTA_FIB_F_DADDR,
    NFTA_FIB_FLAGS,
    NFTA_FIB_RESULT,
    NFTA_HOOK_HOOKNUM,
    NFTA_HOOK_PRIORITY,
    NFTA_IMMEDIATE_DATA,
    NFTA_IMMEDIATE_DREG,
    NFTA_LIST_ELEM,
    NFTA_LOOKUP_DREG,
    NFTA_LOOKUP_SET,
    NFTA_LOOKUP_SREG,
    NFTA_META_DREG,
    NFTA_META_KEY,
    NFTA_NAT_FAMILY,
    NFTA_NAT_REG_ADDR_MIN,
    NFTA_NAT_REG_PROTO_MIN,
    NFTA_NAT_TYPE,
    NFTA_NG_DREG,
    NFTA_NG_MODULUS,
    NFTA_NG_OFFSET,
    NFTA_NG_TYPE,
    NFTA_PAYLOAD_BASE,
    NFTA_PAYLOAD_DREG,
    NFTA_PAYLOAD_LEN,
    NFTA_PAYLOAD_OFFSET,
    NFTA_RULE_CHAIN,
    NFTA_RULE_EXPRESSIONS,
    NFTA_RULE_HANDLE,
    NFTA_RULE_TABLE,
    NFTA_RULE_USERDATA,
    NFTA_SET_DATA_LEN,
    NFTA_SET_DATA_TYPE,
    NFTA_SET_DESC,
    NFTA_SET_DESC_SIZE,
    NFTA_SET_ELEM_DATA,
    NFTA_SET_ELEM_KEY,
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE,
    NFTA_SET_ELEM_USERDATA,
    NFTA_SET_EXPR,
    NFTA_SET_FLAGS,
    NFTA_SET_ID,
    NFTA_SET_KEY_LEN,
    NFTA_SET_KEY_TYPE,
    NFTA_SET_NAME,
    NFTA_SET_TABLE,
    NFTA_SET_USERDATA,
    NFTA_TABLE_FLAGS,
    NFTA_TABLE_NAME,
    NFTA_VERDICT_CHAIN,
    NFTA_VERDICT_CODE,
    NFTNL_UDATA_RULE_COMMENT,
    NFTNL_UDATA_SET_DATA_INTERVAL,
    NFTNL_UDATA_SET_DATA_TYPEOF,
    NFTNL_UDATA_SET_DATABYTEORDER,
    NFTNL_UDATA_SET_ELEM_COMMENT,
    NFTNL_UDATA_SET_KEY_TYPEOF,
    NFTNL_UDATA_SET_KEYBYTEORDER,
    RTN_LOCAL,
)
from .nftnat import GROUP_MASK, PICK_CHAINS, PRIORITY, NatPool, Slot, groups, table_of, table_parts
from .nftnat_read import userdata_comment

# nft's datatypes (a concatenation's type is its fields' types, 6 bits each) and its expression types (in userdata)
TYPE_INTEGER, TYPE_IPADDR, TYPE_IP6ADDR, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE = 4, 7, 8, 12, 13
EXPR_PAYLOAD, EXPR_CONCAT, EXPR_NUMGEN = 7, 13, 23
BYTEORDER_INVALID, BYTEORDER_HOST, BYTEORDER_BIG = 0, 1, 2
IPPROTOS = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP}
PROTO_DESCS = {Protocol.UDP: 6, Protocol.TCP: 8}  # nft's proto_desc_id of the transport header
DPORT_FIELD = 2  # the template index of tcp/udp dport

_HOST32 = struct.Struct("=I")
_BIG_U16 = struct.Struct(">H")
_BIG_U64 = struct.Struct(">Q")
_PORT_REGISTER = struct.Struct(">H2x")  # a port in network order, padded to its 32-bit register
_PORTS_KEY = struct.Struct(">B3xH2x")  # inet_proto . inet_service, each field padded to its register
_VALUE_IN = struct.Struct("=HHHH")  # an attribute's header, then its only attribute's
# value_in(NFTA_SET_ELEM_KEY, host32(n)) of a slot number n, all but n's bytes
_SLOT_KEY_HEADER = _VALUE_IN.pack(12, NFTA_SET_ELEM_KEY | NLA_F_NESTED, 8, NFTA_DATA_VALUE)


@dataclass(frozen=True)
class _FamilyLayout:
    nfproto: int
    name: str  # nft's
    address_family: int
    address_type: int
    address_len: int
    saddr_offset: int  # of the source address in the network header
    daddr: tuple[int, int]  # nft's (proto_desc_id, template index) of `ip daddr` / `ip6 daddr`
    port_reg: int  # the register after the address's: where a concatenation's port lands

    def pack(self, address: str) -> bytes:
        return socket.inet_pton(self.address_family, address)

    @functools.cached_property
    def slot_element(self) -> struct.Struct:
        """A slot's element up to its comment's text (_slot_elements): the key's headers and the slot number (host
        order), the data's headers, address and port (network order, padded), the comment's attribute and TLV
        headers. One pack where a full load makes 100,000."""
        return struct.Struct(f"=8sI8s{self.address_len}sH2xHHBB")

    @functools.cached_property
    def destination_header(self) -> bytes:
        """value_in(NFTA_SET_ELEM_DATA, ...) of an address . port, all but their bytes."""
        length = self.address_len + 4
        return _VALUE_IN.pack(8 + length, NFTA_SET_ELEM_DATA | NLA_F_NESTED, 4 + length, NFTA_DATA_VALUE)


_LAYOUTS = {
    Family.IPV4: _FamilyLayout(NFPROTO_IPV4, "ip", socket.AF_INET, TYPE_IPADDR, 4, 12, (12, 12), NFT_REG32_01),
    Family.IPV6: _FamilyLayout(NFPROTO_IPV6, "ip6", socket.AF_INET6, TYPE_IP6ADDR, 16, 8, (13, 9), NFT_REG_2),
}


def host32(value: int) -> bytes:
    return _HOST32.pack(value)


# --- set userdata: libnftnl's TLVs (type, length, value) ---


def _tlv(kind: int, value: bytes) -> bytes:
    return bytes((kind, len(value))) + value


def _typeof(expression: int, *fields: bytes) -> bytes:
    """An expression of `typeof`: its type, then its own attributes (numbered from 0)."""
    return _tlv(0, host32(expression)) + _tlv(1, b"".join(_tlv(n, value) for n, value in enumerate(fields)))


def _payload_typeof(desc: int, field: int) -> bytes:
    return _typeof(EXPR_PAYLOAD, host32(desc), host32(field))


def _set_userdata(key_order: int, key_typeof: bytes | None, data_typeof: bytes | None) -> bytes:
    return b"".join(
        [
            _tlv(NFTNL_UDATA_SET_KEYBYTEORDER, host32(key_order)),
            _tlv(NFTNL_UDATA_SET_DATABYTEORDER, host32(BYTEORDER_INVALID)),
            _tlv(NFTNL_UDATA_SET_KEY_TYPEOF, key_typeof) if key_typeof is not None else b"",
            _tlv(NFTNL_UDATA_SET_DATA_TYPEOF, data_typeof) if data_typeof is not None else b"",
            _tlv(NFTNL_UDATA_SET_DATA_INTERVAL, host32(0)),
        ]
    )


# --- messages ---


class Request(NamedTuple):
    """One nf_tables request of a batch, its attributes encoded (its header is the batch's to number)."""

    type: int  # NFT_MSG_...
    flags: int  # NLM_F_... besides NLM_F_REQUEST and the batch's NLM_F_ACK
    nfproto: int
    attributes: bytes
    subject: str  # its table and object, as an error names them


def message(msg_type: int, flags: int, family: Family, attributes: bytes, subject: str = "") -> Request:
    """A request of nf_tables of `family` (its type, flags and encoded attributes), as one of a batch."""
    return Request(msg_type, flags, _LAYOUTS[family].nfproto, attributes, subject)


def batch_marker(msg_type: int, sequence: int) -> bytes:
    """A batch's begin or end (NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END) for nf_tables: its resource id is the
    subsystem."""
    payload = netlink.NFGENMSG.pack(socket.AF_UNSPEC, 0, socket.htons(netlink.NFNL_SUBSYS_NFTABLES))
    return netlink.message(msg_type, NLM_F_REQUEST, sequence, payload)


def encode_batch(requests: Sequence[Request], sequence: int) -> bytes:
    """The requests between a batch's begin and end, numbered from `sequence` (the begin's), the last one asking for
    an ack: the kernel acks it, and reports any error, once it has committed or aborted the whole batch."""
    last = len(requests) - 1
    parts = [batch_marker(NFNL_MSG_BATCH_BEGIN, sequence)]
    for number, request in enumerate(requests):
        flags = NLM_F_REQUEST | request.flags | (NLM_F_ACK if number == last else 0)
        msg_type, payload = netlink.nftables_request(request.type, request.nfproto, request.attributes)
        parts.append(netlink.message(msg_type, flags, sequence + 1 + number, payload))
    parts.append(batch_marker(NFNL_MSG_BATCH_END, sequence + len(requests) + 1))
    return b"".join(parts)


def expression(name: str, *attributes: bytes) -> bytes:
    """An expression's name and data (its attributes), for a list element or an NFTA_SET_EXPR."""
    return string(NFTA_EXPR_NAME, name) + nested(NFTA_EXPR_DATA, *attributes)


def list_of(kind: int, items: Iterator[bytes] | Sequence[bytes]) -> bytes:
    """Attribute `kind` holding the items (each encoded attributes) as NFTA_LIST_ELEMs."""
    header = netlink.ATTRIBUTE.pack  # each item is padded: a list element is its header and the item
    return nested(kind, *(header(4 + len(item), NFTA_LIST_ELEM | NLA_F_NESTED) + item for item in items))


def value_in(kind: int, value: bytes) -> bytes:
    """Attribute `kind` holding `value` as its NFTA_DATA_VALUE (a key, data, an operand): nested(kind,
    attribute(NFTA_DATA_VALUE, value)), both headers in one pack (hot: each element has a key and data)."""
    padding = -len(value) % 4
    header = _VALUE_IN.pack(8 + len(value) + padding, kind | NLA_F_NESTED, 4 + len(value), NFTA_DATA_VALUE)
    return header + value + bytes(padding)


def verdict(code: int, chain: str | None = None) -> bytes:
    """A verdict as data (of an element, an immediate): NF_*, NFT_* (goto and jump: to `chain`)."""
    target = string(NFTA_VERDICT_CHAIN, chain) if chain is not None else b""
    return nested(NFTA_DATA_VERDICT, big32(NFTA_VERDICT_CODE, code), target)


def compare(operator: int, data: bytes) -> bytes:
    """cmp: reg 1 `operator` (NFT_CMP_*) `data`."""
    return expression(
        "cmp", big32(NFTA_CMP_SREG, NFT_REG_1), big32(NFTA_CMP_OP, operator), value_in(NFTA_CMP_DATA, data)
    )


def equals(data: bytes) -> bytes:
    """cmp eq: reg 1 holds `data`."""
    return compare(NFT_CMP_EQ, data)


# Expressions of few variants (a protocol, a mark, a family) are encoded once each: a function call an attribute.


META_L4PROTO = expression("meta", big32(NFTA_META_KEY, NFT_META_L4PROTO), big32(NFTA_META_DREG, NFT_REG_1))


@functools.cache
def l4proto(protocol: int) -> tuple[bytes, bytes]:
    """`meta l4proto <protocol>`, through reg 1."""
    return META_L4PROTO, equals(bytes([protocol]))


@functools.cache
def set_mark(mark: int) -> tuple[bytes, bytes, bytes]:
    """`ct mark set ct mark | mark`, as nft writes it: (reg & ~mark) ^ mark, host order."""
    return (
        expression("ct", big32(NFTA_CT_KEY, NFT_CT_MARK), big32(NFTA_CT_DREG, NFT_REG_1)),
        expression(
            "bitwise",
            big32(NFTA_BITWISE_SREG, NFT_REG_1),
            big32(NFTA_BITWISE_DREG, NFT_REG_1),
            big32(NFTA_BITWISE_OP, NFT_BITWISE_BOOL),
            big32(NFTA_BITWISE_LEN, 4),
            value_in(NFTA_BITWISE_MASK, host32(~mark & 0xFFFFFFFF)),
            value_in(NFTA_BITWISE_XOR, host32(mark)),
        ),
        expression("ct", big32(NFTA_CT_KEY, NFT_CT_MARK), big32(NFTA_CT_SREG, NFT_REG_1)),
    )


@functools.lru_cache(maxsize=256)  # of a few pool sizes, mostly
def numgen(kind: int, modulus: int) -> bytes:
    """`numgen inc|random mod <modulus>` (NFT_NG_INCREMENTAL, NFT_NG_RANDOM) into reg 1."""
    return expression(
        "numgen",
        big32(NFTA_NG_DREG, NFT_REG_1),
        big32(NFTA_NG_MODULUS, modulus),
        big32(NFTA_NG_TYPE, kind),
        big32(NFTA_NG_OFFSET, 0),
    )


@functools.cache
def dnat(nfproto: int, port_register: int) -> bytes:
    """`dnat to` the address in reg 1, the port in `port_register` (the register after the address's)."""
    return expression(
        "nat",
        big32(NFTA_NAT_TYPE, NFT_NAT_DNAT),
        big32(NFTA_NAT_FAMILY, nfproto),
        big32(NFTA_NAT_REG_ADDR_MIN, NFT_REG_1),
        big32(NFTA_NAT_REG_PROTO_MIN, port_register),
    )


@functools.cache
def payload(base: int, offset: int, length: int, register: int = NFT_REG_1) -> bytes:
    """Load `length` bytes at `offset` of header `base` (NFT_PAYLOAD_*) into `register`."""
    return expression(
        "payload",
        big32(NFTA_PAYLOAD_DREG, register),
        big32(NFTA_PAYLOAD_BASE, base),
        big32(NFTA_PAYLOAD_OFFSET, offset),
        big32(NFTA_PAYLOAD_LEN, length),
    )


def lookup(set_name: str, data_register: int | None = None, *more: bytes) -> bytes:
    """Look reg 1 (and the registers after it: a concatenation) up in set `set_name`: a match, or in a map, the data
    found into `data_register` (a verdict map's: NFT_REG_VERDICT)."""
    found = big32(NFTA_LOOKUP_DREG, data_register) if data_register is not None else b""
    return expression("lookup", big32(NFTA_LOOKUP_SREG, NFT_REG_1), found, string(NFTA_LOOKUP_SET, set_name), *more)


def element(key: bytes, *more: bytes) -> bytes:
    """A set element: its key (a value), then its other attributes."""
    return value_in(NFTA_SET_ELEM_KEY, key) + b"".join(more)


# --- the maps and sets ---


@dataclass(frozen=True)
class _Map:
    name: str
    declaration: bytes  # NEWSET's attributes after table and name: equal declarations need no new set
    elements: Callable[[], list[bytes]]  # encoded only if written: the map a change replaces needs no elements


def _destination(slot: Slot, layout: _FamilyLayout) -> bytes:
    """NFTA_SET_ELEM_DATA of address . port, the port padded to its 32-bit register."""
    return layout.destination_header + layout.pack(slot.address) + _PORT_REGISTER.pack(slot.port)


def _map_declaration(key: tuple[int, int], layout: _FamilyLayout, userdata: bytes, *more: bytes) -> bytes:
    """A map of key (nft datatype, length) to address . inet_service."""
    return b"".join(
        [
            big32(NFTA_SET_FLAGS, NFT_SET_MAP),
            big32(NFTA_SET_KEY_TYPE, key[0]),
            big32(NFTA_SET_KEY_LEN, key[1]),
            big32(NFTA_SET_DATA_TYPE, layout.address_type << 6 | TYPE_INET_SERVICE),
            big32(NFTA_SET_DATA_LEN, layout.address_len + 4),
            netlink.attribute(NFTA_SET_USERDATA, userdata),
            *more,
        ]
    )


@functools.lru_cache(maxsize=256)  # of a few pool sizes, mostly: each encoded once
def _slots_declaration(size: int, protocol: Protocol, layout: _FamilyLayout) -> bytes:
    """`typeof numgen inc mod <size> : ip daddr . <protocol> dport`, `size <size>`, `counter` (each element gets
    one). With its size given, the kernel keeps the map in a hash of fixed size rather than a resizable one: a change
    that declares a pool's map anew costs its commit ~0.2 ms less at 10,000 frontends (BENCHMARKS.md, "Sixth pass")."""
    key_typeof = _typeof(EXPR_NUMGEN, host32(NFT_NG_INCREMENTAL), host32(size), host32(0))
    data_typeof = _typeof(
        EXPR_CONCAT,
        _payload_typeof(*layout.daddr),
        _payload_typeof(PROTO_DESCS[protocol], DPORT_FIELD),
    )
    userdata = _set_userdata(BYTEORDER_HOST, key_typeof, data_typeof)
    return _map_declaration(
        (TYPE_INTEGER, 4),
        layout,
        userdata,
        nested(NFTA_SET_DESC, big32(NFTA_SET_DESC_SIZE, size)),
        nested(NFTA_SET_EXPR, expression("counter")),
    )


def _slots_map(pool: NatPool, family: Family) -> _Map:
    """Map `slots-...`: slot number -> address . port, commented."""
    layout = _LAYOUTS[family]
    declaration = _slots_declaration(len(pool.slots), pool.protocol, layout)
    return _Map(f"slots-{pool.name}", declaration, functools.partial(_slot_elements, pool.slots, layout))


def _slot_elements(slots: Sequence[Slot], layout: _FamilyLayout) -> list[bytes]:
    """Slot number -> address . port, the backend's name as the comment (its userdata)."""
    pack, data_header, htons = layout.slot_element.pack, layout.destination_header, socket.htons
    elements = []
    for number, slot in enumerate(slots):
        comment = slot.name.encode() + b"\0"
        length = 6 + len(comment)  # the attribute's header, the TLV's, the text
        address, port = layout.pack(slot.address), htons(slot.port)
        userdata = (length, NFTA_SET_ELEM_USERDATA, NFTNL_UDATA_SET_ELEM_COMMENT, len(comment))
        head = pack(_SLOT_KEY_HEADER, number, data_header, address, port, *userdata)
        elements.append(head + comment + bytes(-length % 4))
    return elements


_FRONTEND_TYPE = TYPE_INET_PROTOCOL << 6 | TYPE_INET_SERVICE  # inet_proto . inet_service


def _frontend_key(pool: NatPool) -> bytes:
    """`<protocol> . <port>`, each field padded to its register: the key of sets frontends and access."""
    return _PORTS_KEY.pack(IPPROTOS[pool.protocol], pool.port)


@functools.cache
def _table_declarations(layout: _FamilyLayout) -> dict[str, bytes]:
    """The declarations of a table's sets and maps besides the slot maps (nftnat._table), by name. nft 1.0.6 records a
    concatenated `type` as a typeof concatenation of no fields."""
    concat = _typeof(EXPR_CONCAT)
    by_source = (_FRONTEND_TYPE << 6 | layout.address_type, 8 + layout.address_len)  # ... . <address>

    def plain(key: tuple[int, int]) -> bytes:
        userdata = _set_userdata(BYTEORDER_INVALID, concat, None)
        flags, key_type, key_len = (
            big32(NFTA_SET_FLAGS, 0),
            big32(NFTA_SET_KEY_TYPE, key[0]),
            big32(NFTA_SET_KEY_LEN, key[1]),
        )
        return flags + key_type + key_len + netlink.attribute(NFTA_SET_USERDATA, userdata)

    groups = b"".join(
        [
            big32(NFTA_SET_FLAGS, NFT_SET_MAP),
            big32(NFTA_SET_KEY_TYPE, TYPE_INET_SERVICE),
            big32(NFTA_SET_KEY_LEN, 2),
            big32(NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT),
            big32(NFTA_SET_DATA_LEN, 0),
            netlink.attribute(NFTA_SET_USERDATA, _set_userdata(BYTEORDER_BIG, None, None)),
        ]
    )
    return {
        "frontends": plain((_FRONTEND_TYPE, 8)),
        "access": plain((_FRONTEND_TYPE, 8)),
        "unrouted": plain(by_source),
        "self": _map_declaration(by_source, layout, _set_userdata(BYTEORDER_BIG, concat, concat)),
        "groups": groups,
    }


# The table's sets and maps that hold elements of every pool: a change edits those of _EDITED in place, and adds a
# pool's element of set frontends last (removes it first), so that no connection is sent to objects not there yet.
_EDITED = ("access", "unrouted", "self")
_SHARED = ("frontends", *_EDITED)


def _shared_elements(pool: NatPool | None, layout: _FamilyLayout) -> dict[str, dict[bytes, bytes]]:
    """The pool's elements in the table's shared sets and maps (_SHARED): name -> key -> the rest (b"": none)."""
    if pool is None:
        return {name: {} for name in _SHARED}
    key = _frontend_key(pool)
    own = pool.own_connections()
    return {
        "frontends": {key: b""},
        "access": {key: b""} if pool.access else {},
        "unrouted": {key + layout.pack(address): b"" for address, other in own if other is None},
        "self": {key + layout.pack(address): _destination(other, layout) for address, other in own if other},
    }


# --- the rules, as nft 1.0.6 sends nftnat's ---

_DPORT = payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2)


_FRONTEND_OF_PACKET = (META_L4PROTO, payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, NFT_REG32_01))  # l4proto . th dport


def _by_source(layout: _FamilyLayout) -> list[bytes]:
    """`meta l4proto . th dport . ip saddr`."""
    saddr = payload(NFT_PAYLOAD_NETWORK_HEADER, layout.saddr_offset, layout.address_len, NFT_REG32_02)
    return [*_FRONTEND_OF_PACKET, saddr]


def _immediate(code: int, chain: str | None = None) -> bytes:
    """A verdict: `return`, `goto <chain>`."""
    data = nested(NFTA_IMMEDIATE_DATA, verdict(code, chain))
    return expression("immediate", big32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT), data)


@functools.cache
def _fib_type() -> bytes:
    """`fib daddr type` into reg 1."""
    return expression(
        "fib",
        big32(NFTA_FIB_DREG, NFT_REG_1),
        big32(NFTA_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE),
        big32(NFTA_FIB_FLAGS, NFTA_FIB_F_DADDR),
    )


def _pick_rule(pool: NatPool, family: Family) -> list[bytes]:
    """The frontend's rule in its pick chain (nftnat._pick), its comment aside."""
    layout = _LAYOUTS[family]
    generator = NFT_NG_RANDOM if pool.random else NFT_NG_INCREMENTAL
    return [
        _DPORT,
        equals(_BIG_U16.pack(pool.port)),
        *l4proto(IPPROTOS[pool.protocol]),
        numgen(generator, len(pool.slots)),
        lookup(f"slots-{pool.name}", NFT_REG_1),
        dnat(layout.nfproto, layout.port_reg),
    ]


def pick_changes(before: NatPool | None, after: NatPool | None) -> bool:
    """Whether a change replaces the frontend's rule (it came, it went, its size or its kind of rotation changed):
    then its handle is needed, and the commit makes the kernel validate the table's chains."""
    if before is None or after is None:
        return before is not after
    return (before.random, len(before.slots)) != (after.random, len(after.slots))


def _route_rules(options: Options) -> list[list[bytes]]:
    """Chain route's rules (nftnat._route)."""
    layout = _LAYOUTS[options.family]
    not_local = [_fib_type(), compare(NFT_CMP_NEQ, host32(RTN_LOCAL)), _immediate(NFT_RETURN)]
    group_bits = expression(
        "bitwise",
        big32(NFTA_BITWISE_SREG, NFT_REG_1),
        big32(NFTA_BITWISE_DREG, NFT_REG_1),
        big32(NFTA_BITWISE_OP, NFT_BITWISE_BOOL),
        big32(NFTA_BITWISE_LEN, 2),
        value_in(NFTA_BITWISE_MASK, _BIG_U16.pack(GROUP_MASK)),
        value_in(NFTA_BITWISE_XOR, bytes(2)),
    )
    return [
        *([] if options.listen_address else [not_local]),
        list(set_mark(options.mark_bit)),
        [*_FRONTEND_OF_PACKET, lookup("access"), *set_mark(access_bit(options.mark_bit))],
        [*_by_source(layout), lookup("unrouted"), _immediate(NFT_RETURN)],
        [*_by_source(layout), lookup("self", NFT_REG_1), dnat(layout.nfproto, layout.port_reg)],
        [_DPORT, group_bits, lookup("groups", NFT_REG_VERDICT)],
    ]


# --- the change ---

# The kernel requires an id on a new set, unique in its transaction (where it may name the set: here names do).
_set_ids = itertools.count(1)


# Where a message names its table and its object, by kind of object
_CHAIN = (NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME)
_RULES = (NFTA_RULE_TABLE, NFTA_RULE_CHAIN)
_SET = (NFTA_SET_TABLE, NFTA_SET_NAME)
_ELEMENTS = (NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET)


@functools.lru_cache(maxsize=1024)  # the tables' names, and a frontend's names while its messages are made
def _name(kind: int, text: str) -> bytes:
    return string(kind, text)


@dataclass(frozen=True)
class _Objects:
    """The messages about objects of `table`: a chain (`chain`: the one that the chain and rule messages are
    about), the table's sets and maps."""

    family: Family
    table: str
    chain: str = ""

    def _message(
        self, msg_type: int, naming: tuple[int, int], name: str, *attributes: bytes, flags: int = 0
    ) -> Request:
        """A message about object `name` of the table: the table's and the name's attributes, then `attributes`."""
        head = _name(naming[0], self.table) + _name(naming[1], name)
        return message(msg_type, flags, self.family, head + b"".join(attributes), f"{self.table} {name}")

    def chain_message(self, msg_type: int, flags: int = 0) -> Request:
        return self._message(msg_type, _CHAIN, self.chain, flags=flags)

    def add_rule(self, expressions: Sequence[bytes], comment: str | None = None, echo: bool = False) -> Request:
        """A rule appended to the chain, with a comment if given; `echo`: the kernel echoes it back, with its handle
        (NatSocket.send gives it, by comment)."""
        userdata = b""
        if comment is not None:
            userdata = netlink.attribute(NFTA_RULE_USERDATA, _tlv(NFTNL_UDATA_RULE_COMMENT, comment.encode() + b"\0"))
        flags = NLM_F_CREATE | NLM_F_APPEND | (NLM_F_ECHO if echo else 0)
        rule = list_of(NFTA_RULE_EXPRESSIONS, expressions)
        return self._message(NFT_MSG_NEWRULE, _RULES, self.chain, rule, userdata, flags=flags)

    def delete_rule(self, handle: int) -> Request:
        return self._message(
            NFT_MSG_DELRULE, _RULES, self.chain, netlink.attribute(NFTA_RULE_HANDLE, _BIG_U64.pack(handle))
        )

    def elements(self, msg_type: int, name: str, elements: list[bytes] | None, flags: int = 0) -> Request:
        """Elements of set or map `name` to add or delete; None: all of them (a flush)."""
        listed = list_of(NFTA_SET_ELEM_LIST_ELEMENTS, elements) if elements is not None else b""
        return self._message(msg_type, _ELEMENTS, name, listed, flags=flags)

    def add_elements(self, name: str, elements: list[bytes]) -> list[Request]:
        """Elements added (exclusively: one already there is a refusal); none: no message."""
        return [self.elements(NFT_MSG_NEWSETELEM, name, elements, NLM_F_CREATE | NLM_F_EXCL)] if elements else []

    def delete_elements(self, name: str, keys: list[bytes]) -> list[Request]:
        return [self.elements(NFT_MSG_DELSETELEM, name, [element(key) for key in keys])] if keys else []

    def delete_map(self, name: str) -> Request:
        return self._message(NFT_MSG_DELSET, _SET, name)

    def declare_map(self, name: str, declaration: bytes) -> Request:
        """A new set or map, empty (created exclusively)."""
        set_id = big32(NFTA_SET_ID, next(_set_ids))
        return self._message(NFT_MSG_NEWSET, _SET, name, declaration, set_id, flags=NLM_F_CREATE | NLM_F_EXCL)

    def add_map(self, new: _Map) -> list[Request]:
        return [self.declare_map(new.name, new.declaration), *self.add_elements(new.name, new.elements())]

    def base_chain(self, hook: int) -> Request:
        """The chain as a nat base chain of netfilter hook `hook` (NF_INET_*) at PRIORITY, policy accept."""
        hooked = nested(NFTA_CHAIN_HOOK, big32(NFTA_HOOK_HOOKNUM, hook), big32(NFTA_HOOK_PRIORITY, PRIORITY))
        declaration = (string(NFTA_CHAIN_TYPE, "nat"), big32(NFTA_CHAIN_POLICY, NF_ACCEPT), hooked)
        return self._message(NFT_MSG_NEWCHAIN, _CHAIN, self.chain, *declaration, flags=NLM_F_CREATE | NLM_F_EXCL)

    def change_map(self, old: _Map | None, new: _Map | None) -> list[Request]:
        """A map as declared alike is flushed and refilled; one declared otherwise is deleted and added again."""
        if old is not None and new is not None and old.declaration == new.declaration:
            refill = self.add_elements(new.name, new.elements())
            return [self.elements(NFT_MSG_DELSETELEM, new.name, None), *refill]
        return [*([self.delete_map(old.name)] if old else []), *(self.add_map(new) if new else [])]


def change_batch(
    before: NatPool | None, after: NatPool | None, family: Family, handle: int | None = None
) -> list[Request]:
    """The messages (without the batch's begin and end) that turn the kernel's objects of `before` (None: the
    frontend has none yet) into those of `after` (None: remove them), in the table of their port. `handle`: that of
    before's rule, needed if pick_changes. Creations are exclusive: a kernel that does not hold `before` refuses the
    batch rather than merge."""
    pool = after if after is not None else before
    if pool is None:
        return []
    if before is not None and (before.protocol, before.port) != (pool.protocol, pool.port):
        raise ValueError(f"one frontend's change, not {before.name} -> {pool.name}")
    replaced = pick_changes(before, after)
    if before is not None and replaced and handle is None:
        raise ValueError(f"the handle of {before.name}'s rule is needed to replace it")
    layout = _LAYOUTS[family]
    objects = _Objects(family, table_of(pool.port), pool.pick_chain)
    old, new = _shared_elements(before, layout), _shared_elements(after, layout)
    messages = []
    if after is None:  # first: no new connection is sent to the chains as they go
        messages += objects.delete_elements("frontends", list(old["frontends"]))
    if before is not None and replaced:  # before its map: a rule holds the map it looks up
        assert handle is not None
        messages.append(objects.delete_rule(handle))
    old_slots, new_slots = (_slots_map(p, family) if p is not None else None for p in (before, after))
    messages += objects.change_map(old_slots, new_slots)
    for name in _EDITED:
        gone = [key for key, rest in old[name].items() if new[name].get(key) != rest]
        messages += objects.delete_elements(name, gone)
    for name in _EDITED:
        came = [element(key, rest) for key, rest in new[name].items() if old[name].get(key) != rest]
        messages += objects.add_elements(name, came)
    if after is not None and replaced:
        messages.append(objects.add_rule(_pick_rule(after, family), after.name, echo=True))
    if before is None:
        messages += objects.add_elements("frontends", [element(key) for key in new["frontends"]])
    return messages


# --- whole tables: a full load, as `nft -f` of nftnat.ruleset_text makes it ---

_LOOPBACK_MATCH = {  # `ip daddr != 127.0.0.0/8` (nft compares the first byte), `ip6 daddr != ::1`
    Family.IPV4: (16, b"\x7f"),
    Family.IPV6: (24, socket.inet_pton(socket.AF_INET6, "::1")),
}
_HOOKS = (("prerouting", NF_INET_PRE_ROUTING), ("output", NF_INET_LOCAL_OUT))


def _dispatch_rules(options: Options) -> dict[str, list[bytes]]:
    """The base chains' one rule each (nftnat._dispatch): a new connection (to the listen address, if any; from the
    host itself, not to loopback unless asked) to a frontend goes to chain route."""
    family = options.family
    layout = _LAYOUTS[family]
    daddr_offset = layout.saddr_offset + layout.address_len
    local: list[bytes] = []
    if options.listen_address:
        local = [payload(NFT_PAYLOAD_NETWORK_HEADER, daddr_offset, layout.address_len)]
        local.append(equals(layout.pack(options.listen_address)))
        output = local
    else:
        offset, loopback = _LOOPBACK_MATCH[family]
        not_loopback = [payload(NFT_PAYLOAD_NETWORK_HEADER, offset, len(loopback)), compare(NFT_CMP_NEQ, loopback)]
        output = [] if options.route_localhost and family is Family.IPV4 else not_loopback
    to_route = [*_FRONTEND_OF_PACKET, lookup("frontends"), _immediate(NFT_GOTO, "route")]
    return {"prerouting": [*local, *to_route], "output": [*output, *to_route]}


def table_batch(pools: Iterable[NatPool], options: Options, tables: Collection[str]) -> list[Request]:
    """The messages that replace each of `tables` (of options.family) whole with the objects of `pools` (all those
    tables' pools), as `nft -f` of nftnat.ruleset_text does: the table is created if missing, deleted, created
    again and filled. A full load at 10,000 frontends, without the nft tool's parsing (seconds of it)."""
    family = options.family
    layout = _LAYOUTS[family]
    members: dict[str, list[NatPool]] = {name: [] for name in tables}
    for pool in pools:
        members[table_of(pool.port)].append(pool)
    declarations = _table_declarations(layout)
    dispatch, route = _dispatch_rules(options), _route_rules(options)
    messages = []
    for table, table_pools in members.items():
        name = string(NFTA_TABLE_NAME, table)
        messages += [
            message(NFT_MSG_NEWTABLE, NLM_F_CREATE, family, name + big32(NFTA_TABLE_FLAGS, 0), table),
            message(NFT_MSG_DELTABLE, 0, family, name, table),
            message(NFT_MSG_NEWTABLE, NLM_F_CREATE | NLM_F_EXCL, family, name + big32(NFTA_TABLE_FLAGS, 0), table),
        ]
        objects = _Objects(family, table)
        shared = [_shared_elements(pool, layout) for pool in table_pools]
        for set_name in _SHARED:
            messages.append(objects.declare_map(set_name, declarations[set_name]))
            messages += objects.add_elements(set_name, [element(k, v) for s in shared for k, v in s[set_name].items()])
        for pool in table_pools:
            messages += objects.add_map(_slots_map(pool, family))
        picks: dict[str, list[NatPool]] = {chain: [] for chain in PICK_CHAINS}
        for pool in table_pools:
            picks[pool.pick_chain].append(pool)
        for chain, chain_pools in picks.items():
            picking = _Objects(family, table, chain)
            messages.append(picking.chain_message(NFT_MSG_NEWCHAIN, NLM_F_CREATE | NLM_F_EXCL))
            messages += [picking.add_rule(_pick_rule(pool, family), pool.name) for pool in chain_pools]
        messages.append(objects.declare_map("groups", declarations["groups"]))
        gotos = [
            element(_BIG_U16.pack(key), nested(NFTA_SET_ELEM_DATA, verdict(NFT_GOTO, chain))) for key, chain in groups()
        ]
        messages += objects.add_elements("groups", gotos)
        routing = _Objects(family, table, "route")
        messages.append(routing.chain_message(NFT_MSG_NEWCHAIN, NLM_F_CREATE | NLM_F_EXCL))
        messages += [routing.add_rule(rule) for rule in route]
        for hook_name, hook in _HOOKS:  # last: the base chains hold the rest
            base = _Objects(family, table, hook_name)
            messages += [base.base_chain(hook), base.add_rule(dispatch[hook_name])]
    return messages


def load_batches(state: DesiredState, options: Options, parts: int) -> Iterator[list[Request]]:
    """A full load of every table of options.family with `state`: one table_batch per part of nftnat.table_parts,
    each made when the next is asked for (so that it can be sent while the next is made: NatSocket.send_each)."""
    return (table_batch(pools, options, tables) for tables, pools in table_parts(state, options, parts))


def delete_tables(family: Family, names: Iterable[str]) -> list[Request]:
    """The messages that delete these tables of `family` (and everything in them)."""
    return [message(NFT_MSG_DELTABLE, 0, family, string(NFTA_TABLE_NAME, name), name) for name in names]


# --- sending ---

_VERBS = {
    NFT_MSG_NEWTABLE: "add table",
    NFT_MSG_DELTABLE: "delete table",
    NFT_MSG_NEWCHAIN: "add chain",
    NFT_MSG_DELCHAIN: "delete chain",
    NFT_MSG_NEWRULE: "add a rule to chain",
    NFT_MSG_DELRULE: "delete a rule of chain",
    NFT_MSG_NEWSET: "add map",
    NFT_MSG_DELSET: "delete map",
    NFT_MSG_NEWSETELEM: "add elements to map",
    NFT_MSG_DELSETELEM: "delete elements of map",
}
_FAMILY_NAMES = {layout.nfproto: layout.name for layout in _LAYOUTS.values()}


def describe(request: Request) -> str:
    """A message as nft words it, roughly: `delete map ip tcprouter-17 slots-tcp-8017`."""
    verb = _VERBS.get(request.type, f"nf_tables message {request.type}")
    family = _FAMILY_NAMES.get(request.nfproto, str(request.nfproto))
    return " ".join(filter(None, [verb, family, request.subject]))


_NEW_RULE = netlink.NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWRULE


def rule_handles(replies: Iterable[netlink.Message]) -> dict[str, int]:
    """The handles of the rules in NFT_MSG_NEWRULE replies (a dump's, or echoes) that have a comment, by comment."""
    found = {}
    for msg in replies:
        attributes = netlink.attributes(netlink.nftables_attributes(msg))
        comment = userdata_comment(attributes.get(NFTA_RULE_USERDATA, b""), NFTNL_UDATA_RULE_COMMENT)
        if comment and NFTA_RULE_HANDLE in attributes:
            found[comment] = _BIG_U64.unpack(attributes[NFTA_RULE_HANDLE])[0]
    return found


class TransactionRefused(OSError):
    """The kernel refused a transaction (and so changed nothing): `refusals` are (what, errno) pairs."""

    def __init__(self, refusals: list[tuple[str, int]]) -> None:
        self.refusals = refusals
        text = "; ".join(f"{what}: {os.strerror(number)}" for what, number in refusals)
        super().__init__(refusals[0][1], f"nf_tables refused the transaction, nothing changed ({text})")


class NatSocket:
    """A netfilter netlink socket opened in a network namespace (None: this thread's), that sends transactions."""

    def __init__(self, netns: str | None = None, timeout: float = 5.0) -> None:
        self._sock = netlink.open_socket(netlink.NETLINK_NETFILTER, netns)
        self._sock.setsockopt(netlink.SOL_NETLINK, netlink.NETLINK_CAP_ACK, 1)  # an error echoes the header only
        self._sock.settimeout(timeout)  # the kernel answers before sendmsg returns: a guard only
        self._send_buffer = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self._sequence = 0
        self._netns, self._timeout = netns, timeout
        self._dumps: netlink.Requester | None = None  # for chain_handles

    def send(self, messages: Sequence[Request]) -> dict[str, int]:
        """The messages as one transaction, committed whole or not at all; TransactionRefused if refused. The handles
        of the rules added with a comment (_Objects.add_rule), by comment."""
        return self.transact(*self.encode(messages), messages) if messages else {}

    def send_each(self, batches: Iterable[Sequence[Request]]) -> None:
        """Each batch of messages as a transaction of its own, in order, each sent while the next is made: the
        kernel does its work within the send, without the interpreter's lock. TransactionRefused for the first
        refused; those after it are not sent."""
        with ThreadPoolExecutor(1) as sender:
            sending: Future[None] | None = None
            for messages in batches:
                encoded = self.encode(messages)
                if sending is not None:
                    sending.result()
                sending = sender.submit(self.transact, *encoded, messages)
            if sending is not None:
                sending.result()

    def encode(self, messages: Sequence[Request]) -> tuple[bytes, range]:
        """The messages as one batch (encode_batch), with new sequence numbers each batch; its sequence numbers."""
        sequence = range(self._sequence, self._sequence + len(messages) + 2)
        self._sequence = sequence.stop % (1 << 31)
        return encode_batch(messages, sequence.start), sequence

    def transact(self, data: bytes, sequence: range, messages: Sequence[Request]) -> dict[str, int]:
        """Sends an encoded batch, then reads the replies up to the last message's ack, or an error about the
        batch as a whole (reported against its begin); replies of an earlier batch are skipped. The handles of the
        rules the kernel echoed (by comment)."""
        if len(data) > self._send_buffer:  # netlink refuses a message larger than the send buffer
            self._sock.setsockopt(socket.SOL_SOCKET, netlink.SO_SNDBUFFORCE, len(data))
            self._send_buffer = len(data)
        self._sock.send(data)
        refusals: list[tuple[str, int]] = []
        handles: dict[str, int] = {}
        last, done = sequence[-2], False
        while not done:
            for msg in self._replies():
                if msg.sequence not in sequence:
                    continue
                if msg.type == _NEW_RULE:
                    handles.update(rule_handles([msg]))
                    continue
                number = netlink.error_of(msg)
                if number:
                    inside = sequence.start < msg.sequence <= last
                    what = describe(messages[msg.sequence - sequence.start - 1]) if inside else "the batch"
                    refusals.append((what, number))
                done = done or msg.sequence in (last, sequence.start)
        if refusals:
            raise TransactionRefused(refusals)
        return handles

    def _replies(self) -> Iterator[netlink.Message]:
        """The acks, errors and echoed rules in the next datagram."""
        try:
            reply = self._sock.recv(netlink.RECEIVE_SIZE)
        except TimeoutError as error:  # committed or not: unknown
            raise TimeoutError(errno.ETIMEDOUT, "nf_tables did not answer the transaction") from error
        return (msg for msg in netlink.messages(reply) if msg.type in (netlink.NLMSG_ERROR, _NEW_RULE))

    def chain_handles(self, family: Family, table: str, chain: str) -> dict[str, int]:
        """The handles of the chain's rules that have a comment, by comment (one dump)."""
        if self._dumps is None:
            self._dumps = netlink.Requester(netlink.NETLINK_NETFILTER, self._netns, self._timeout)
        attributes = _name(NFTA_RULE_TABLE, table) + _name(NFTA_RULE_CHAIN, chain)
        msg_type, payload = netlink.nftables_request(NFT_MSG_GETRULE, _LAYOUTS[family].nfproto, attributes)
        replies, _ = self._dumps.ask(msg_type, payload, NLM_F_REQUEST | netlink.NLM_F_DUMP)
        return rule_handles(replies)

    def close(self) -> None:
        self._sock.close()
        if self._dumps is not None:
            self._dumps.close()

    def __enter__(self) -> NatSocket:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
