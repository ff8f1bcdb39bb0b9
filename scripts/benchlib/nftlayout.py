"""Rule layouts for N frontends x 10 backends: what a full load and a one-backend change cost in the kernel.

The question behind issue 14's missed targets (full sync <= 2 s, partial sync <= 30 ms at 10,000 x 10): does a
native nftables layout (kube-proxy's: a port verdict map, one chain per frontend with one `numgen` rule) get there,
and which form of it? Each layout is loaded into a private namespace of its own by the tool a writer would run
(iptables-nft-restore or nft -f), from empty tables (*full*), then one frontend's pool goes from 10 backends to 9
and back, rewritten the way that layout allows (*partial*, the writer process's wall time, median of the runs).

- iptables-nft: today's layout (TCPR-FE-<port> chains of 10 statistic/DNAT rules, flat dispatch), one nat table.
- nft-anon-T: T tables (ports split evenly), a vmap port -> goto chain, each chain one rule with an anonymous map
  `numgen inc mod n map { 0 : addr . port, ... }`; partial: flush the chain, add the rule.
- nft-named-T: as nft-anon-T, with the map a named one per frontend, a counter per element (per-backend connection
  counts, which the kernel updates on lookup); partial: flush the chain and the map, add elements and the rule.
- nft-named-T-netlink: nft-named-T written by a writer without the nft CLI (which reads its whole cache before each
  command): each write is one nf_tables batch encoded with tcprouter.nftnat_netlink's primitives (as tcprouter's
  own changes are) and sent by this process, timed from building it to the last ack, the socket opened beforehand.
  Full: the very messages `nft -f` sends for nft-named-T's text, one transaction; its cell shows, in brackets, the
  part of the full seconds spent building and encoding it, the rest being sendmsg (in which the kernel processes
  and commits the batch) and the ack. Checked afterwards by counting tables, chains, maps, elements and rules, and
  before each size by comparing `nft -a list ruleset` with nft -f's at 3 frontends. Partial: flush the map, add the
  elements, replace the rule by handle (looked up beforehand), each write checked afterwards with nft (elements and
  modulus).

Usage: python -m benchlib.nftlayout [FRONTENDS,... [RUNS [LAYOUT,...]]]   (from scripts/, as root; default
1000,10000 5, all layouts)
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import json
import re
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from tcprouter.model import Family
from tcprouter.netlink import NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REPLACE, attribute, big32, nested, string
from tcprouter.nf_tables import (
    NFPROTO_IPV4,
    NFT_GOTO,
    NFT_MSG_DELSETELEM,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWSET,
    NFT_MSG_NEWSETELEM,
    NFT_NG_INCREMENTAL,
    NFT_REG32_01,
    NFT_REG_1,
    NFT_REG_VERDICT,
    NFT_SET_MAP,
    NFTA_CHAIN_NAME,
    NFTA_CHAIN_TABLE,
    NFTA_RULE_CHAIN,
    NFTA_RULE_EXPRESSIONS,
    NFTA_RULE_TABLE,
    NFTA_SET_DATA_LEN,
    NFTA_SET_DATA_TYPE,
    NFTA_SET_ELEM_DATA,
    NFTA_SET_ELEM_LIST_ELEMENTS,
    NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE,
    NFTA_SET_EXPR,
    NFTA_SET_FLAGS,
    NFTA_SET_ID,
    NFTA_SET_KEY_LEN,
    NFTA_SET_KEY_TYPE,
    NFTA_SET_NAME,
    NFTA_SET_TABLE,
    NFTA_SET_USERDATA,
)
from tcprouter.nftnat_netlink import (
    NatSocket,
    Request,
    dnat,
    element,
    equals,
    expression,
    host32,
    l4proto,
    list_of,
    lookup,
    message,
    numgen,
    payload,
    set_mark,
    value_in,
    verdict,
)

from .common import median, netns_add, sh

BACKENDS = 10
FIRST_PORT = 20000
MARK = "0x100000"


def _address(frontend: int, backend: int) -> str:
    k = frontend * BACKENDS + backend
    return f"198.18.{k // 250 % 256}.{k % 250 + 1}"


def _pool(frontend: int, backends: int) -> list[str]:
    return [f"{_address(frontend, b)} . 8080" for b in range(backends)]


def _elements(addresses: list[str], counter: bool) -> str:
    tag = " counter" if counter else ""
    return ", ".join(f"{slot}{tag} : {address}" for slot, address in enumerate(addresses))


@dataclass(frozen=True)
class NftLayout:
    tables: int
    named: bool

    @property
    def name(self) -> str:
        return f"nft-{'named' if self.named else 'anon'}-{self.tables}"

    def _table_of(self, frontend: int, frontends: int) -> int:
        return frontend * self.tables // frontends

    def _rule(self, frontend: int, addresses: list[str]) -> str:
        port = FIRST_PORT + frontend
        target = f"@b{port}" if self.named else "{ " + _elements(addresses, counter=False) + " }"
        return (
            f"meta l4proto tcp ct mark set ct mark or {MARK} "
            f"dnat ip addr . port to numgen inc mod {len(addresses)} map {target}"
        )

    def full(self, frontends: int) -> str:
        lines = []
        for table in range(self.tables):
            members = [f for f in range(frontends) if self._table_of(f, frontends) == table]
            lines += [
                f"table ip tcpr{table} {{",
                "  map frontends { type inet_service : verdict; }",
                "  chain prerouting { type nat hook prerouting priority -101; policy accept; "
                "fib daddr type local tcp dport vmap @frontends; }",
            ]
            for frontend in members:
                port, addresses = FIRST_PORT + frontend, _pool(frontend, BACKENDS)
                if self.named:
                    lines.append(
                        f"  map b{port} {{ typeof numgen inc mod 2 : ip daddr . tcp dport; counter; "
                        f"elements = {{ {_elements(addresses, counter=True)} }} }}"
                    )
                lines.append(f"  chain fe{port} {{ {self._rule(frontend, addresses)}; }}")
            lines.append("}")
            if members:
                verdicts = ", ".join(f"{FIRST_PORT + f} : goto fe{FIRST_PORT + f}" for f in members)
                lines.append(f"add element ip tcpr{table} frontends {{ {verdicts} }}")
        return "\n".join(lines) + "\n"

    def partial(self, frontend: int, frontends: int, backends: int) -> str:
        table, port, addresses = self._table_of(frontend, frontends), FIRST_PORT + frontend, _pool(frontend, backends)
        lines = [f"flush chain ip tcpr{table} fe{port}"]
        if self.named:
            lines += [
                f"flush map ip tcpr{table} b{port}",
                f"add element ip tcpr{table} b{port} {{ {_elements(addresses, counter=True)} }}",
            ]
        lines.append(f"add rule ip tcpr{table} fe{port} {self._rule(frontend, addresses)}")
        return "\n".join(lines) + "\n"

    def load(self, netns: str, text: str) -> None:
        sh("ip", "netns", "exec", netns, "nft", "-f", "-", input=text, timeout=600)


# nf_tables.h: the attributes and values of what only this benchmark writes (tables, base chains, a verdict map)
NFT_MSG_NEWTABLE = 0
NFTA_TABLE_NAME, NFTA_TABLE_FLAGS = 1, 2
NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY = 1, 2
NFTA_CHAIN_HOOK, NFTA_CHAIN_POLICY, NFTA_CHAIN_TYPE = 4, 5, 7
NFTA_RULE_HANDLE = 3  # be64
NFTA_SET_ELEM_EXPR, NFTA_SET_ELEM_LIST_SET_ID, NFTA_LOOKUP_SET_ID = 7, 4, 4
NFTA_FIB_DREG, NFTA_FIB_RESULT, NFTA_FIB_FLAGS = 1, 2, 3
NFT_FIB_RESULT_ADDRTYPE, NFTA_FIB_F_DADDR = 3, 2
NFT_PAYLOAD_TRANSPORT_HEADER, NF_ACCEPT, NF_INET_PRE_ROUTING, RTN_LOCAL = 2, 1, 0, 2
NFT_DATA_VERDICT = 0xFFFFFF00


def _rule_expressions(port: int, backends: int, set_id: int | None = None) -> list[bytes]:
    """What nft 1.0.6 sends for NftLayout._rule (`nft --debug=netlink`), attribute for attribute; the set id nft adds
    beside the map's name only if given (an id only names a set created in the same batch; the kernel tries the
    name first)."""
    lookup_id = [big32(NFTA_LOOKUP_SET_ID, set_id)] if set_id else []
    return [
        *l4proto(socket.IPPROTO_TCP),
        *set_mark(int(MARK, 16)),
        numgen(NFT_NG_INCREMENTAL, backends),
        lookup(f"b{port}", NFT_REG_1, *lookup_id),
        dnat(NFPROTO_IPV4, NFT_REG32_01),  # the port in the 32-bit register after the address's
    ]


def _element(slot: int, address: str, port: int) -> bytes:
    """slot (numgen's output, host order) : address . port (the port padded to its 32-bit register), a counter."""
    return element(
        host32(slot),
        value_in(NFTA_SET_ELEM_DATA, socket.inet_aton(address) + struct.pack(">H2x", port)),
        nested(NFTA_SET_ELEM_EXPR, expression("counter")),
    )


def _message(msg_type: int, flags: int, *attributes: bytes) -> Request:
    return message(msg_type, flags, Family.IPV4, b"".join(attributes))


# Sets as nft 1.0.6 declares NftLayout's maps: NFTA_SET_USERDATA is libnftnl TLVs that only nft reads back (to print
# the map as declared): key and data byte order, the typeof expressions, data interval 0.
VMAP_USERDATA = bytes.fromhex("000402000000010400000000060400000000")  # type inet_service : verdict
POOL_USERDATA = bytes.fromhex(  # typeof numgen inc mod 2 : ip daddr . tcp dport
    "000401000000"
    "010400000000"
    "031a0004170000000112000400000000010402000000020400000000"
    "043400040d000000012c0014000407000000010c00040c00000001040c0000000114000407000000010c00040800000001040200"
    "0000"
    "060400000000"
)
TYPE_INTEGER, TYPE_IPADDR, TYPE_INET_SERVICE = 4, 7, 13  # nft's datatypes
PORT_KEY, VERDICT_DATA = (TYPE_INET_SERVICE, 2), (NFT_DATA_VERDICT, 0)  # (datatype, length) of a key or data
SLOT_KEY, BACKEND_DATA = (TYPE_INTEGER, 4), (TYPE_IPADDR << 6 | TYPE_INET_SERVICE, 8)  # a concatenation: a << 6 | b


def _set(table: str, name: str, set_id: int, key: tuple[int, int], data: tuple[int, int], userdata: bytes) -> bytes:
    """A map named name in table; key and data are (nft datatype, length)."""
    return b"".join(
        [
            string(NFTA_SET_TABLE, table),
            string(NFTA_SET_NAME, name),
            big32(NFTA_SET_FLAGS, NFT_SET_MAP),
            big32(NFTA_SET_KEY_TYPE, key[0]),
            big32(NFTA_SET_KEY_LEN, key[1]),
            big32(NFTA_SET_DATA_TYPE, data[0]),
            big32(NFTA_SET_DATA_LEN, data[1]),
            big32(NFTA_SET_ID, set_id),
            attribute(NFTA_SET_USERDATA, userdata),
        ]
    )


def _element_list(table: str, name: str, set_id: int, elements: list[bytes]) -> bytes:
    return b"".join(
        [
            string(NFTA_SET_ELEM_LIST_TABLE, table),
            string(NFTA_SET_ELEM_LIST_SET, name),
            big32(NFTA_SET_ELEM_LIST_SET_ID, set_id),
            list_of(NFTA_SET_ELEM_LIST_ELEMENTS, elements),
        ]
    )


def _goto(port: int) -> bytes:
    return element(struct.pack(">H", port), nested(NFTA_SET_ELEM_DATA, verdict(NFT_GOTO, f"fe{port}")))


def _dispatch_expressions(set_id: int) -> list[bytes]:
    """`fib daddr type local tcp dport vmap @frontends`, as nft 1.0.6 sends it."""
    fib = expression(
        "fib",
        big32(NFTA_FIB_FLAGS, NFTA_FIB_F_DADDR),
        big32(NFTA_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE),
        big32(NFTA_FIB_DREG, NFT_REG_1),
    )
    return [
        fib,
        equals(host32(RTN_LOCAL)),
        *l4proto(socket.IPPROTO_TCP),
        payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2),
        lookup("frontends", NFT_REG_VERDICT, big32(NFTA_LOOKUP_SET_ID, set_id)),
    ]


@dataclass(frozen=True)
class NftNetlinkLayout(NftLayout):
    named: bool = field(default=True, init=False)

    @property
    def name(self) -> str:
        return f"{super().name}-netlink"

    def full_batch(self, frontends: int) -> list[Request]:
        """The transaction `nft -f` sends for self.full(frontends) (nft 1.0.6, read with strace), message for
        message, between the batch's begin and end: per table NEWTABLE, the base chain and the frontend chains, the
        vmap, each pool map with its elements, the rules, then the vmap's elements. Each set is also named by the id
        nft numbers it with."""
        messages, set_ids = [], itertools.count(1)

        def add(msg_type: int, *attributes: bytes, flags: int = NLM_F_CREATE) -> None:
            messages.append(_message(msg_type, flags, *attributes))

        for number in range(self.tables):
            table = f"tcpr{number}"
            ports = [FIRST_PORT + f for f in range(frontends) if self._table_of(f, frontends) == number]
            add(NFT_MSG_NEWTABLE, string(NFTA_TABLE_NAME, table), big32(NFTA_TABLE_FLAGS, 0), flags=0)
            hook = nested(
                NFTA_CHAIN_HOOK, big32(NFTA_HOOK_HOOKNUM, NF_INET_PRE_ROUTING), big32(NFTA_HOOK_PRIORITY, -101)
            )
            base = string(NFTA_CHAIN_TYPE, "nat") + big32(NFTA_CHAIN_POLICY, NF_ACCEPT) + hook
            for chain, attributes in [("prerouting", base), *((f"fe{port}", b"") for port in ports)]:
                add(NFT_MSG_NEWCHAIN, string(NFTA_CHAIN_TABLE, table), string(NFTA_CHAIN_NAME, chain), attributes)
            vmap = next(set_ids)
            add(NFT_MSG_NEWSET, _set(table, "frontends", vmap, PORT_KEY, VERDICT_DATA, VMAP_USERDATA))
            rules = [("prerouting", _dispatch_expressions(vmap))]
            for port in ports:
                pool, name = next(set_ids), f"b{port}"
                pool_map = _set(table, name, pool, SLOT_KEY, BACKEND_DATA, POOL_USERDATA)
                add(NFT_MSG_NEWSET, pool_map, nested(NFTA_SET_EXPR, expression("counter")))  # `counter;`
                elements = [_element(slot, _address(port - FIRST_PORT, slot), 8080) for slot in range(BACKENDS)]
                add(NFT_MSG_NEWSETELEM, _element_list(table, name, pool, elements))
                rules.append((f"fe{port}", _rule_expressions(port, BACKENDS, pool)))
            for chain, expressions in rules:
                rule = string(NFTA_RULE_TABLE, table), string(NFTA_RULE_CHAIN, chain)
                add(
                    NFT_MSG_NEWRULE,
                    *rule,
                    list_of(NFTA_RULE_EXPRESSIONS, expressions),
                    flags=NLM_F_CREATE | NLM_F_APPEND,
                )
            if ports:
                gotos = [_goto(port) for port in ports]
                add(NFT_MSG_NEWSETELEM, _element_list(table, "frontends", vmap, gotos))
        return messages

    def load_full(self, netns: str, frontends: int) -> tuple[float, float]:
        """self.full(frontends) as one transaction from this process: (seconds building and encoding the batch,
        seconds sending it and reading its last message's ack). The socket is opened beforehand; a fresh one numbers
        the batch from 0, as nft does, and only the last message asks for an ack (errors are acked anyway)."""
        with NatSocket(netns, timeout=600) as sock:
            started = time.perf_counter()
            messages = self.full_batch(frontends)
            data, sequence = sock.encode(messages)
            encoded = time.perf_counter()
            sock.transact(data, sequence, messages)
            return encoded - started, time.perf_counter() - encoded

    @staticmethod
    def batch(table: str, frontend: int, backends: int, handle: int) -> list[Request]:
        """One transaction: flush map b<port> (DELSETELEM without elements), add the pool's elements, replace the
        chain's rule (NEWRULE with NLM_F_REPLACE and its handle) by one of the new modulus; each acked."""
        port = FIRST_PORT + frontend
        where = string(NFTA_SET_ELEM_LIST_TABLE, table) + string(NFTA_SET_ELEM_LIST_SET, f"b{port}")
        elements = [_element(slot, _address(frontend, slot), 8080) for slot in range(backends)]
        rule = [
            string(NFTA_RULE_TABLE, table),
            string(NFTA_RULE_CHAIN, f"fe{port}"),
            attribute(NFTA_RULE_HANDLE, struct.pack(">Q", handle)),
            list_of(NFTA_RULE_EXPRESSIONS, _rule_expressions(port, backends)),
        ]
        return [
            _message(NFT_MSG_DELSETELEM, NLM_F_ACK, where),
            _message(
                NFT_MSG_NEWSETELEM, NLM_F_ACK | NLM_F_CREATE, where, list_of(NFTA_SET_ELEM_LIST_ELEMENTS, elements)
            ),
            _message(NFT_MSG_NEWRULE, NLM_F_ACK | NLM_F_REPLACE, *rule),
        ]

    def check_equivalent(self, frontends: int = 3) -> None:
        """RuntimeError unless load_full gives, rule handles included, the ruleset `nft -f` gives for the same
        text (in two namespaces of their own)."""
        with contextlib.ExitStack() as stack:
            ours, theirs = netns_add(stack, "tbl"), netns_add(stack, "tbl")
            self.load_full(ours, frontends)
            self.load(theirs, self.full(frontends))
            listed = [sh("ip", "netns", "exec", netns, "nft", "-a", "list", "ruleset") for netns in (ours, theirs)]
        if listed[0] != listed[1]:
            diff = "\n".join(
                difflib.unified_diff(*(text.splitlines() for text in listed), "netlink", "nft -f", lineterm="")
            )
            raise RuntimeError(f"{self.name}: the netlink full load differs from nft -f's:\n{diff}")

    def check_counts(self, netns: str, frontends: int) -> None:
        """RuntimeError unless netns holds the tables, chains, maps, map elements and rules of self.full."""
        listed = json.loads(sh("ip", "netns", "exec", netns, "nft", "-j", "list", "ruleset", timeout=600))
        objects = [next(iter(item.items())) for item in listed["nftables"]]
        counts = Counter(kind for kind, _ in objects)
        counts["element"] = sum(len(body.get("elem", [])) for kind, body in objects if kind == "map")
        tables = self.tables
        expected = {"table": tables, "chain": tables + frontends, "map": tables + frontends}
        expected |= {"rule": tables + frontends, "element": frontends * (BACKENDS + 1)}
        if found := {kind: counts[kind] for kind in expected if counts[kind] != expected[kind]}:
            raise RuntimeError(f"{self.name}: {frontends} frontends loaded as {found}, not {expected}")

    def write_pools(self, netns: str, frontend: int, frontends: int, pools: list[int]) -> list[float]:
        """Each pool size in turn, one batch each: the seconds from building the batch to its last ack (a refusal
        raises TransactionRefused), each write then checked with nft."""
        table, port = f"tcpr{self._table_of(frontend, frontends)}", FIRST_PORT + frontend
        with NatSocket(netns) as sock:
            handle = _check_named(netns, table, port, _pool(frontend, BACKENDS))
            seconds = []
            for backends in pools:
                started = time.perf_counter()
                sock.send(self.batch(table, frontend, backends, handle))
                seconds.append(time.perf_counter() - started)
                handle = _check_named(netns, table, port, _pool(frontend, backends))
        return seconds


def _check_named(netns: str, table: str, port: int, pool: list[str]) -> int:
    """The handle of chain fe<port>'s rule, once checked that map b<port> holds exactly this pool (slot i :
    pool[i]) and that the chain holds one rule, of the pool's size as modulus; RuntimeError if not."""
    nft = ("ip", "netns", "exec", netns, "nft")
    listed = sh(*nft, "list", "map", "ip", table, f"b{port}")
    elements = sorted(re.findall(r"(\d+) counter packets \d+ bytes \d+ : (\S+ \. \d+)", listed))
    if elements != sorted((str(slot), address) for slot, address in enumerate(pool)):
        raise RuntimeError(f"map {table} b{port} holds {elements}, not the pool {pool}")
    chain = sh(*nft, "-a", "list", "chain", "ip", table, f"fe{port}")
    rules = [line for line in chain.splitlines() if "# handle" in line and "{" not in line]
    found = re.search(rf"numgen inc mod (\d+) map @b{port} # handle (\d+)$", rules[0]) if len(rules) == 1 else None
    if not found or int(found[1]) != len(pool):
        raise RuntimeError(f"chain {table} fe{port} is not one rule of modulus {len(pool)}:\n{chain}")
    return int(found[2])


class IptablesLayout:
    name = "iptables-nft"

    @staticmethod
    def _chain(frontend: int, backends: int) -> list[str]:
        port = FIRST_PORT + frontend
        rules = []
        for b, address in enumerate(_address(frontend, b) for b in range(backends)):
            every = f"-m statistic --mode nth --every {backends - b} --packet 0 " if b < backends - 1 else ""
            rules.append(f"-A TCPR-FE-{port} -p tcp {every}-j DNAT --to-destination {address}:8080")
        return rules

    def full(self, frontends: int) -> str:
        ports = [FIRST_PORT + f for f in range(frontends)]
        lines = ["*nat", ":TCPR-FRONTENDS - [0:0]"] + [f":TCPR-FE-{p} - [0:0]" for p in ports]
        lines.append("-A PREROUTING -m addrtype --dst-type LOCAL -j TCPR-FRONTENDS")
        lines += [f"-A TCPR-FRONTENDS -p tcp --dport {p} -j TCPR-FE-{p}" for p in ports]
        for frontend in range(frontends):
            lines += self._chain(frontend, BACKENDS)
        return "\n".join([*lines, "COMMIT"]) + "\n"

    def partial(self, frontend: int, frontends: int, backends: int) -> str:
        port = FIRST_PORT + frontend
        return "\n".join(["*nat", f":TCPR-FE-{port} - [0:0]", *self._chain(frontend, backends), "COMMIT"]) + "\n"

    def load(self, netns: str, text: str) -> None:
        sh("ip", "netns", "exec", netns, "iptables-nft-restore", "--noflush", input=text, timeout=600)


LAYOUTS = [
    IptablesLayout(),
    NftLayout(tables=1, named=False),
    NftLayout(tables=1, named=True),
    NftLayout(tables=64, named=False),
    NftLayout(tables=64, named=True),
    NftNetlinkLayout(tables=64),
]


def _seconds(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def measure(layout: NftLayout | IptablesLayout, frontends: int, runs: int) -> dict[str, float]:
    with contextlib.ExitStack() as stack:
        netns = netns_add(stack, "tbl")
        figures = {}
        if isinstance(layout, NftNetlinkLayout):
            layout.check_equivalent()
            figures["full_encode_s"], send = layout.load_full(netns, frontends)
            full = figures["full_encode_s"] + send
            layout.check_counts(netns, frontends)
        else:
            full_text = layout.full(frontends)
            full = _seconds(lambda: layout.load(netns, full_text))
        victim = frontends // 2
        pools = [BACKENDS - 1 if run % 2 == 0 else BACKENDS for run in range(2 * runs)]  # 10 -> 9 backends, then back
        if isinstance(layout, NftNetlinkLayout):
            partial = layout.write_pools(netns, victim, frontends, pools)
        else:
            partial = []
            for backends in pools:
                text = layout.partial(victim, frontends, backends)
                partial.append(_seconds(lambda text=text: layout.load(netns, text)))
        return {
            **figures,
            "full_s": full,
            "partial_ms_p50": median(partial) * 1e3,
            "partial_ms_max": max(partial) * 1e3,
        }


def main(argv: list[str]) -> None:
    sizes = [int(n) for n in (argv[0] if argv else "1000,10000").split(",")]
    runs = int(argv[1]) if len(argv) > 1 else 5
    known = {layout.name: layout for layout in LAYOUTS}
    names = argv[2].split(",") if len(argv) > 2 else list(known)
    if unknown := [name for name in names if name not in known]:
        raise SystemExit(f"unknown layout(s) {', '.join(unknown)}; known: {', '.join(known)}")
    header = "full s [encoding s] / partial ms p50 (max)"
    print(f"| layout | {' | '.join(f'{n:,} x {BACKENDS}: {header}' for n in sizes)} |")
    print(f"|---|{'---|' * len(sizes)}")
    for layout in (known[name] for name in names):
        cells = []
        for frontends in sizes:
            figures = measure(layout, frontends, runs)
            encoding = f" [{figures['full_encode_s']:.2f}]" if "full_encode_s" in figures else ""
            partial = f"{figures['partial_ms_p50']:.0f} ({figures['partial_ms_max']:.0f})"
            cells.append(f"{figures['full_s']:.2f}{encoding} / {partial}")
        print(f"| {layout.name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
