"""One frontend's change to the nat layout of nftnat.py as one nf_tables transaction over netlink, without the nft CLI
(which reads its whole cache before each command: ~130 ms at 10,000 frontends, against a few ms here).

change_batch(before, after, family) gives the messages that turn the kernel's objects of one NatPool into those of
another (or create or remove them) in the table of its port: the chain `<protocol>-<port>`, its maps `slots-...` and
`self-...`, and its element of map `ports`. The objects end up as `nft -f` of ruleset_text makes them (nft 1.0.6:
the same set flags, types and userdata, element comments, rule expressions); NatSocket sends such messages, from one
or more changes, as one transaction, in a network namespace of choice.

Rules are replaced by flushing the chain and adding them again; a map whose declaration changes (`typeof numgen inc
mod N` carries the pool's size in the map's userdata) is deleted and created again, other maps are flushed and
refilled. Either way the slots' counters start again from 0, as after a reload by `nft -f`.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink import NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
from pyroute2.netlink.nfnetlink.nftsocket import (
    NFPROTO_IPV4,
    NFPROTO_IPV6,
    NFT_MSG_DELCHAIN,
    NFT_MSG_DELRULE,
    NFT_MSG_DELSET,
    NFT_MSG_DELSETELEM,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWSET,
    NFT_MSG_NEWSETELEM,
    Cmp,
    Meta,
    Regs,
    nft_chain_msg,
    nft_rule_msg,
    nft_set_elem_list_msg,
    nft_set_msg,
)

from .model import Family, Protocol
from .nftnat import NatPool, Slot, table_of

Attrs = list[tuple[str, Any]]
Nest = dict[str, Attrs]

# nf_tables and nfnetlink constants pyroute2 does not name (linux/netfilter/nf_tables.h, nfnetlink.h)
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_CT_MARK, NFT_BITWISE_BOOL, NFT_NAT_DNAT = 3, 0, 1
NFT_NG_INCREMENTAL, NFT_NG_RANDOM = 0, 1
NFT_PAYLOAD_NETWORK_HEADER = 1
NFT_GOTO, NFT_RETURN = -4, -5
NETLINK_NETFILTER, NLMSG_ERROR, SOL_NETLINK, NETLINK_CAP_ACK, SO_SNDBUFFORCE = 12, 2, 270, 10, 32

# nft's datatypes (a concatenation's type is its fields' types, 6 bits each) and its expression types (in userdata)
TYPE_INTEGER, TYPE_IPADDR, TYPE_IP6ADDR, TYPE_INET_SERVICE = 4, 7, 8, 13
EXPR_PAYLOAD, EXPR_CONCAT, EXPR_NUMGEN = 7, 13, 23
BYTEORDER_INVALID, BYTEORDER_HOST, BYTEORDER_BIG = 0, 1, 2
IPPROTOS = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP}
PROTO_DESCS = {Protocol.UDP: 6, Protocol.TCP: 8}  # nft's proto_desc_id of the transport header
DPORT_FIELD = 2  # the template index of tcp/udp dport


@dataclass(frozen=True)
class _FamilyLayout:
    nfproto: int
    address_family: int
    address_type: int
    address_len: int
    saddr_offset: int  # of the source address in the network header
    daddr: tuple[int, int]  # nft's (proto_desc_id, template index) of `ip daddr` / `ip6 daddr`
    port_reg: int  # the register after the address's: where a concatenation's port lands

    def pack(self, address: str) -> bytes:
        return socket.inet_pton(self.address_family, address)


_LAYOUTS = {
    Family.IPV4: _FamilyLayout(NFPROTO_IPV4, socket.AF_INET, TYPE_IPADDR, 4, 12, (12, 12), Regs.NFT_REG32_01),
    Family.IPV6: _FamilyLayout(NFPROTO_IPV6, socket.AF_INET6, TYPE_IP6ADDR, 16, 8, (13, 9), Regs.NFT_REG_2),
}


def host32(value: int) -> bytes:
    return struct.pack("=I", value)


# --- set userdata: libnftnl's TLVs (type, length, value), only read back by nft to print a set as declared ---


def _tlv(kind: int, value: bytes) -> bytes:
    return bytes((kind, len(value))) + value


def _typeof(expression: int, *fields: bytes) -> bytes:
    """An expression of `typeof`: its type, then its own attributes (numbered from 0)."""
    return _tlv(0, host32(expression)) + _tlv(1, b"".join(_tlv(n, value) for n, value in enumerate(fields)))


def _payload_typeof(desc: int, field: int) -> bytes:
    return _typeof(EXPR_PAYLOAD, host32(desc), host32(field))


def _set_userdata(key_order: int, key_typeof: bytes | None, data_typeof: bytes | None) -> Attrs:
    userdata: Attrs = [
        ("NFTNL_UDATA_SET_KEYBYTEORDER", host32(key_order)),
        ("NFTNL_UDATA_SET_DATABYTEORDER", host32(BYTEORDER_INVALID)),
    ]
    if key_typeof is not None:
        userdata.append(("NFTNL_UDATA_SET_KEY_TYPEOF", key_typeof))
    if data_typeof is not None:
        userdata.append(("NFTNL_UDATA_SET_DATA_TYPEOF", data_typeof))
    return [*userdata, ("NFTNL_UDATA_SET_DATA_INTERVAL", host32(0))]


# --- messages ---


def message(cls: type[nfgen_msg], msg_type: int, flags: int, family: Family, attrs: Attrs) -> nfgen_msg:
    """A request of nf_tables of `family` (its type, flags and attributes), as one of a batch."""
    msg = cls()
    msg["nfgen_family"] = _LAYOUTS[family].nfproto
    msg["attrs"] = attrs
    msg["header"]["type"] = NFNL_SUBSYS_NFTABLES << 8 | msg_type
    msg["header"]["flags"] = NLM_F_REQUEST | flags
    return msg


def batch_marker(msg_type: int) -> nfgen_msg:
    """A batch's begin or end (NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END) for nf_tables."""
    msg = nfgen_msg()
    msg["res_id"] = NFNL_SUBSYS_NFTABLES
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = NLM_F_REQUEST
    return msg


def expression(name: str, *attrs: tuple[str, Any]) -> Nest:
    return {"attrs": [("NFTA_EXPR_NAME", name), ("NFTA_EXPR_DATA", {"attrs": list(attrs)})]}


def data_value(data: bytes) -> Nest:
    return {"attrs": [("NFTA_DATA_VALUE", data)]}


def _verdict(code: int, chain: str | None = None) -> Nest:
    verdict: Attrs = [("NFTA_VERDICT_CODE", code)]
    if chain is not None:
        verdict.append(("NFTA_VERDICT_CHAIN", chain))
    return {"attrs": [("NFTA_DATA_VERDICT", {"attrs": verdict})]}


# --- the maps ---


@dataclass(frozen=True)
class _Map:
    name: str
    declaration: Attrs  # NEWSET's attributes after table and name: equal declarations need no new set
    elements: list[Nest]


def _destination(slot: Slot, layout: _FamilyLayout) -> bytes:
    """address . port, the port padded to its 32-bit register."""
    return layout.pack(slot.address) + struct.pack(">H2x", slot.port)


def _concat_type(layout: _FamilyLayout) -> int:
    return layout.address_type << 6 | TYPE_INET_SERVICE


def _slots_map(pool: NatPool, family: Family) -> _Map:
    """`typeof numgen inc mod N : ip daddr . <protocol> dport`, `counter`: slot -> address . port, commented."""
    layout = _LAYOUTS[family]
    key_typeof = _typeof(EXPR_NUMGEN, host32(NFT_NG_INCREMENTAL), host32(len(pool.slots)), host32(0))
    data_typeof = _typeof(
        EXPR_CONCAT,
        _payload_typeof(*layout.daddr),
        _payload_typeof(PROTO_DESCS[pool.protocol], DPORT_FIELD),
    )
    declaration = [
        ("NFTA_SET_FLAGS", {"NFT_SET_MAP"}),
        ("NFTA_SET_KEY_TYPE", TYPE_INTEGER),
        ("NFTA_SET_KEY_LEN", 4),
        ("NFTA_SET_DATA_TYPE", _concat_type(layout)),
        ("NFTA_SET_DATA_LEN", layout.address_len + 4),
        ("NFTA_SET_USERDATA", _set_userdata(BYTEORDER_HOST, key_typeof, data_typeof)),
        ("NFTA_SET_EXPR", expression("counter")),  # each element gets a counter of its own
    ]
    elements = [
        {
            "attrs": [
                ("NFTA_SET_ELEM_KEY", data_value(host32(number))),
                ("NFTA_SET_ELEM_DATA", data_value(_destination(slot, layout))),
                ("NFTA_SET_ELEM_USERDATA", [("NFTNL_UDATA_SET_ELEM_COMMENT", slot.name)]),
            ]
        }
        for number, slot in enumerate(pool.slots)
    ]
    return _Map(f"slots-{pool.chain}", declaration, elements)


def _self_map(pool: NatPool, family: Family) -> _Map:
    """`type <address> : <address> . inet_service`: a backend's address -> where its own connections go."""
    layout = _LAYOUTS[family]
    declaration = [
        ("NFTA_SET_FLAGS", {"NFT_SET_MAP"}),
        ("NFTA_SET_KEY_TYPE", layout.address_type),
        ("NFTA_SET_KEY_LEN", layout.address_len),
        ("NFTA_SET_DATA_TYPE", _concat_type(layout)),
        ("NFTA_SET_DATA_LEN", layout.address_len + 4),
        # nft 1.0.6 records a concatenated `type` as a typeof concatenation of no fields
        ("NFTA_SET_USERDATA", _set_userdata(BYTEORDER_BIG, None, _typeof(EXPR_CONCAT))),
    ]
    elements = [
        {
            "attrs": [
                ("NFTA_SET_ELEM_KEY", data_value(layout.pack(address))),
                ("NFTA_SET_ELEM_DATA", data_value(_destination(slot, layout))),
            ]
        }
        for address, slot in pool.fallbacks
    ]
    return _Map(f"self-{pool.chain}", declaration, elements)


def _maps(pool: NatPool | None, family: Family) -> dict[str, _Map]:
    if pool is None:
        return {}
    maps = [_slots_map(pool, family), *([_self_map(pool, family)] if pool.fallbacks else [])]
    return {m.name: m for m in maps}


def _ports_element(pool: NatPool, with_verdict: bool) -> Nest:
    """`<protocol> . <port> : goto <chain>` of map ports (each field padded to its 32-bit register)."""
    key = struct.pack("=B3x", IPPROTOS[pool.protocol]) + struct.pack(">H2x", pool.port)
    attrs: Attrs = [("NFTA_SET_ELEM_KEY", data_value(key))]
    if with_verdict:
        attrs.append(("NFTA_SET_ELEM_DATA", _verdict(NFT_GOTO, pool.chain)))
    return {"attrs": attrs}


# --- the chain's rules, as nft 1.0.6 sends nftnat's ---


def _l4proto(protocol: Protocol) -> list[Nest]:
    return [
        expression("meta", ("NFTA_META_KEY", Meta.NFT_META_L4PROTO), ("NFTA_META_DREG", Regs.NFT_REG_1)),
        expression(
            "cmp",
            ("NFTA_CMP_SREG", Regs.NFT_REG_1),
            ("NFTA_CMP_OP", Cmp.NFT_CMP_EQ),
            ("NFTA_CMP_DATA", data_value(bytes([IPPROTOS[protocol]]))),
        ),
    ]


def _saddr(layout: _FamilyLayout) -> Nest:
    return expression(
        "payload",
        ("NFTA_PAYLOAD_DREG", Regs.NFT_REG_1),
        ("NFTA_PAYLOAD_BASE", NFT_PAYLOAD_NETWORK_HEADER),
        ("NFTA_PAYLOAD_OFFSET", layout.saddr_offset),
        ("NFTA_PAYLOAD_LEN", layout.address_len),
    )


def _dnat_through(map_name: str, layout: _FamilyLayout) -> list[Nest]:
    """Look reg 1 up in the map, DNAT to the address . port found (the port in the register after the address)."""
    return [
        expression(
            "lookup",
            ("NFTA_LOOKUP_SREG", Regs.NFT_REG_1),
            ("NFTA_LOOKUP_DREG", Regs.NFT_REG_1),
            ("NFTA_LOOKUP_SET", map_name),
        ),
        expression(
            "nat",
            ("NFTA_NAT_TYPE", NFT_NAT_DNAT),
            ("NFTA_NAT_FAMILY", layout.nfproto),
            ("NFTA_NAT_REG_ADDR_MIN", Regs.NFT_REG_1),
            ("NFTA_NAT_REG_PROTO_MIN", layout.port_reg),
        ),
    ]


def _mark(mark: int) -> list[Nest]:
    """`ct mark set ct mark | mark`, as nft writes it: (reg & ~mark) ^ mark, host order."""
    return [
        expression("ct", ("NFTA_CT_KEY", NFT_CT_MARK), ("NFTA_CT_DREG", Regs.NFT_REG_1)),
        expression(
            "bitwise",
            ("NFTA_BITWISE_SREG", Regs.NFT_REG_1),
            ("NFTA_BITWISE_DREG", Regs.NFT_REG_1),
            ("NFTA_BITWISE_OP", NFT_BITWISE_BOOL),
            ("NFTA_BITWISE_LEN", 4),
            ("NFTA_BITWISE_MASK", data_value(host32(~mark & 0xFFFFFFFF))),
            ("NFTA_BITWISE_XOR", data_value(host32(mark))),
        ),
        expression("ct", ("NFTA_CT_KEY", NFT_CT_MARK), ("NFTA_CT_SREG", Regs.NFT_REG_1)),
    ]


def _unrouted(pool: NatPool, layout: _FamilyLayout) -> list[Nest]:
    """`ip saddr { address } return`: nft makes a one-element set a comparison. nat_pool never gives more than one
    address (only a pool of one address has any), and more would need an anonymous set."""
    if len(pool.unrouted) != 1:
        raise ValueError(f"{pool.chain}: {len(pool.unrouted)} unrouted addresses, the netlink writer takes one")
    return [
        _saddr(layout),
        expression(
            "cmp",
            ("NFTA_CMP_SREG", Regs.NFT_REG_1),
            ("NFTA_CMP_OP", Cmp.NFT_CMP_EQ),
            ("NFTA_CMP_DATA", data_value(layout.pack(pool.unrouted[0]))),
        ),
        expression(
            "immediate", ("NFTA_IMMEDIATE_DREG", Regs.NFT_REG_VERDICT), ("NFTA_IMMEDIATE_DATA", _verdict(NFT_RETURN))
        ),
    ]


def _pick(pool: NatPool, layout: _FamilyLayout) -> list[Nest]:
    """`meta l4proto <protocol> dnat to numgen inc|random mod N map @slots-...`."""
    numgen = expression(
        "numgen",
        ("NFTA_NG_DREG", Regs.NFT_REG_1),
        ("NFTA_NG_MODULUS", len(pool.slots)),
        ("NFTA_NG_TYPE", NFT_NG_RANDOM if pool.random else NFT_NG_INCREMENTAL),
        ("NFTA_NG_OFFSET", 0),
    )
    return [*_l4proto(pool.protocol), numgen, *_dnat_through(f"slots-{pool.chain}", layout)]


def _rules(pool: NatPool, family: Family) -> Iterator[list[Nest]]:
    """The chain's rules in order, each as its expressions (nftnat._chain)."""
    layout = _LAYOUTS[family]
    yield _mark(pool.mark)
    if pool.fallbacks:
        yield [*_l4proto(pool.protocol), _saddr(layout), *_dnat_through(f"self-{pool.chain}", layout)]
    if pool.unrouted:
        yield _unrouted(pool, layout)
    yield _pick(pool, layout)


# --- the change ---

# The kernel requires an id on a new set, unique in its transaction (where it may name the set: here names do).
_set_ids = itertools.count(1)


@dataclass(frozen=True)
class _Objects:
    """The messages about one frontend's objects: its chain and maps in `table`."""

    family: Family
    table: str
    chain: str

    def _message(self, cls: type[nfgen_msg], msg_type: int, attrs: Attrs, flags: int = 0) -> nfgen_msg:
        return message(cls, msg_type, flags, self.family, attrs)

    def chain_message(self, msg_type: int, flags: int = 0) -> nfgen_msg:
        attrs = [("NFTA_CHAIN_TABLE", self.table), ("NFTA_CHAIN_NAME", self.chain)]
        return self._message(nft_chain_msg, msg_type, attrs, flags)

    def flush_rules(self) -> nfgen_msg:
        attrs = [("NFTA_RULE_TABLE", self.table), ("NFTA_RULE_CHAIN", self.chain)]  # no handle: every rule
        return self._message(nft_rule_msg, NFT_MSG_DELRULE, attrs)

    def add_rule(self, expressions: list[Nest]) -> nfgen_msg:
        attrs = [("NFTA_RULE_TABLE", self.table), ("NFTA_RULE_CHAIN", self.chain)]
        attrs.append(("NFTA_RULE_EXPRESSIONS", expressions))
        return self._message(nft_rule_msg, NFT_MSG_NEWRULE, attrs, NLM_F_CREATE | NLM_F_APPEND)

    def elements(self, msg_type: int, name: str, elements: list[Nest] | None, flags: int = 0) -> nfgen_msg:
        """Elements of map `name` to add or delete; None: all of them (a flush)."""
        attrs: Attrs = [("NFTA_SET_ELEM_LIST_TABLE", self.table), ("NFTA_SET_ELEM_LIST_SET", name)]
        if elements is not None:
            attrs.append(("NFTA_SET_ELEM_LIST_ELEMENTS", elements))
        return self._message(nft_set_elem_list_msg, msg_type, attrs, flags)

    def delete_map(self, name: str) -> nfgen_msg:
        return self._message(nft_set_msg, NFT_MSG_DELSET, [("NFTA_SET_TABLE", self.table), ("NFTA_SET_NAME", name)])

    def add_map(self, new: _Map) -> list[nfgen_msg]:
        attrs = [("NFTA_SET_TABLE", self.table), ("NFTA_SET_NAME", new.name), *new.declaration]
        attrs.append(("NFTA_SET_ID", next(_set_ids)))
        return [
            self._message(nft_set_msg, NFT_MSG_NEWSET, attrs, NLM_F_CREATE | NLM_F_EXCL),
            self.elements(NFT_MSG_NEWSETELEM, new.name, new.elements, NLM_F_CREATE | NLM_F_EXCL),
        ]

    def change_map(self, old: _Map | None, new: _Map | None) -> list[nfgen_msg]:
        """A map as declared alike is flushed and refilled; one declared otherwise is deleted and added again."""
        if old is not None and new is not None and old.declaration == new.declaration:
            refill = self.elements(NFT_MSG_NEWSETELEM, new.name, new.elements, NLM_F_CREATE | NLM_F_EXCL)
            return [self.elements(NFT_MSG_DELSETELEM, new.name, None), refill]
        return [*([self.delete_map(old.name)] if old else []), *(self.add_map(new) if new else [])]


def change_batch(before: NatPool | None, after: NatPool | None, family: Family) -> list[nfgen_msg]:
    """The messages (without the batch's begin and end) that turn the kernel's objects of `before` (None: the
    frontend has none yet) into those of `after` (None: remove them), in the table of their port. Creations are
    exclusive: a kernel that does not hold `before` refuses the batch rather than merge."""
    pool = after if after is not None else before
    if pool is None:
        return []
    if before is not None and (before.protocol, before.port) != (pool.protocol, pool.port):
        raise ValueError(f"one frontend's change, not {before.chain} -> {pool.chain}")
    objects = _Objects(family, table_of(pool.port), pool.chain)
    messages = []
    if before is None:
        messages.append(objects.chain_message(NFT_MSG_NEWCHAIN, NLM_F_CREATE | NLM_F_EXCL))
    else:
        messages.append(objects.flush_rules())  # first: the rules hold the maps they look up
    if after is None:  # the ports element holds the chain it goes to
        messages.append(objects.elements(NFT_MSG_DELSETELEM, "ports", [_ports_element(pool, False)]))
        messages.append(objects.chain_message(NFT_MSG_DELCHAIN))
    old, new = _maps(before, family), _maps(after, family)
    for name in dict.fromkeys([*old, *new]):
        messages += objects.change_map(old.get(name), new.get(name))
    if after is not None:
        messages += [objects.add_rule(expressions) for expressions in _rules(after, family)]
    if before is None:
        flags = NLM_F_CREATE | NLM_F_EXCL
        messages.append(objects.elements(NFT_MSG_NEWSETELEM, "ports", [_ports_element(pool, True)], flags))
    return messages


# --- sending ---

_VERBS = {
    NFT_MSG_NEWCHAIN: "add chain",
    NFT_MSG_DELCHAIN: "delete chain",
    NFT_MSG_NEWRULE: "add a rule to chain",
    NFT_MSG_DELRULE: "flush chain",
    NFT_MSG_NEWSET: "add map",
    NFT_MSG_DELSET: "delete map",
    NFT_MSG_NEWSETELEM: "add elements to map",
    NFT_MSG_DELSETELEM: "delete elements of map",
}
_FAMILY_NAMES = {NFPROTO_IPV4: "ip", NFPROTO_IPV6: "ip6"}


def describe(msg: nfgen_msg) -> str:
    """A message as nft words it, roughly: `delete map ip tcprouter-17 slots-tcp-8017`."""
    msg_type = msg["header"]["type"] & 0xFF
    names = [value for _, value in msg["attrs"] if isinstance(value, str)][:2]  # the table, then the object
    family = _FAMILY_NAMES.get(msg["nfgen_family"], str(msg["nfgen_family"]))
    return " ".join([_VERBS.get(msg_type, f"nf_tables message {msg_type}"), family, *names])


class TransactionRefused(OSError):
    """The kernel refused a transaction (and so changed nothing): `refusals` are (what, errno) pairs."""

    def __init__(self, refusals: list[tuple[str, int]]) -> None:
        self.refusals = refusals
        text = "; ".join(f"{what}: {os.strerror(number)}" for what, number in refusals)
        super().__init__(refusals[0][1], f"nf_tables refused the transaction, nothing changed ({text})")


def netfilter_socket(netns: str | None) -> socket.socket:
    """A netfilter netlink socket opened in network namespace `netns` (None: this thread's). Unlike pyroute2's
    pushns, a missing namespace is an error (FileNotFoundError), not created; only this thread moves, and back."""
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        pyroute2_netns.setns(netns, flags=0)
        try:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        finally:
            pyroute2_netns.setns(here)
    finally:
        os.close(here)


class NatSocket:
    """A netfilter netlink socket opened in a network namespace (None: this thread's), that sends transactions."""

    def __init__(self, netns: str | None = None, timeout: float = 5.0) -> None:
        self._sock = netfilter_socket(netns)
        self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # an error echoes the request's header only
        self._sock.settimeout(timeout)  # the kernel answers before sendmsg returns: a guard only
        self._send_buffer = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self._sequence = 0

    def send(self, messages: Sequence[nfgen_msg]) -> None:
        """The messages as one transaction, committed whole or not at all; TransactionRefused if refused."""
        if messages:
            self.transact(*self.encode(messages), messages)

    def encode(self, messages: Sequence[nfgen_msg]) -> tuple[bytes, range]:
        """The messages between a batch's begin and end, as one buffer; the batch's sequence numbers. Numbers the
        messages (new numbers each batch) and asks for the last one's ack: the kernel acks it, and reports any
        error, once it has committed or aborted the whole batch."""
        begin, end = batch_marker(NFNL_MSG_BATCH_BEGIN), batch_marker(NFNL_MSG_BATCH_END)
        batch = [begin, *messages, end]
        for number, msg in enumerate(batch, self._sequence):
            msg["header"]["sequence_number"] = number
        messages[-1]["header"]["flags"] |= NLM_F_ACK
        sequence = range(self._sequence, self._sequence + len(batch))
        self._sequence = sequence.stop % (1 << 31)
        for msg in batch:
            msg.encode()
        return b"".join(msg.data for msg in batch), sequence

    def transact(self, data: bytes, sequence: range, messages: Sequence[nfgen_msg]) -> None:
        """Sends an encoded batch, then reads the replies up to the last message's ack, or an error about the
        batch as a whole (reported against its begin); replies of an earlier batch are skipped."""
        if len(data) > self._send_buffer:  # netlink refuses a message larger than the send buffer
            self._sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(data))
            self._send_buffer = len(data)
        self._sock.send(data)
        refusals: list[tuple[str, int]] = []
        last, done = sequence[-2], False
        while not done:
            for seq, error in self._errors():
                if seq not in sequence:
                    continue
                if error:
                    inside = sequence.start < seq <= last
                    refusals.append((describe(messages[seq - sequence.start - 1]) if inside else "the batch", -error))
                done = done or seq in (last, sequence.start)
        if refusals:
            raise TransactionRefused(refusals)

    def _errors(self) -> Iterator[tuple[int, int]]:
        """The (sequence number, error) of each ack or error in the next datagram (error 0: an ack)."""
        try:
            reply = self._sock.recv(1 << 16)
        except TimeoutError as error:  # committed or not: unknown
            raise TimeoutError(errno.ETIMEDOUT, "nf_tables did not answer the transaction") from error
        offset = 0
        while offset + 20 <= len(reply):
            length, msg_type, _, seq, _, error = struct.unpack_from("=IHHIIi", reply, offset)
            if msg_type == NLMSG_ERROR:
                yield seq, error
            offset += (max(length, 16) + 3) & ~3

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NatSocket:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
