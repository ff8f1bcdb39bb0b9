"""Desired state -> rule set: the pure heart of tcprouter.

Every rule is written exactly as `iptables-save` prints it back, so that the rules read from the
kernel can be compared with the compiled ones as plain text (see diff.py).

Layout (DESIGN.md):
  nat    PREROUTING/OUTPUT -> TCPR-FRONTENDS -> TCPR-FE-<port> (CONNMARK, then one DNAT per rotation slot),
         or TCPR-UDP-<port> for a UDP frontend (the same, per new UDP flow); with more than 64 frontends of a
         protocol, TCPR-FRONTENDS -> TCPR-DT<port>x4096 -> TCPR-DT<port>x256 (port ranges, UDP: TCPR-DU) -> them
         POSTROUTING -> TCPR-POSTROUTING (MASQUERADE for hairpin flows, or for all with --snat always)
  filter DOCKER-USER (after the operator's rules; else FORWARD) -> TCPR-FORWARD (accept the marked
         connections; new ones to a frontend with access labels first pass TCPR-ACCESS -> TCPR-AC-<port>;
         INVALID TCP packets from or to a backend network are dropped in TCPR-INVALID)
The connection mark, the FORWARD lock and hairpin SNAT apply to UDP flows as to TCP ones; the access chains,
TCPR-INVALID and the SYN proxy are TCP only.
SYN-flood protection (frontends with synproxy, IPv4), the raw table becoming a third owned table:
  raw    PREROUTING -> TCPR-NOTRACK (a client's SYN to such a frontend is not tracked)
  filter INPUT -> TCPR-INPUT -> TCPR-SYNPROXY (SYNPROXY answers it with a SYN cookie; once the client's ACK
         proves the cookie, the kernel sends the SYN again with ip_local_out: that one is tracked and crosses
         nat OUTPUT, so TCPR-FRONTENDS DNATs it as usual, rotation included; other untracked or INVALID
         segments to the port are dropped)
The nat and filter tables also hold an empty TCPR-CANARY chain: if it vanishes, someone flushed the table.
One rule set per address family (Options.family): the same layout in iptables and ip6tables, each routing the
pools' backends of its family (DesiredState.of_family); a pool without IPv6 backends is not routed over IPv6.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import islice

from .model import Access, Backend, Balance, DesiredState, Family, Frontend, Protocol, family_of
from .policy import Policy

PREFIX = "TCPR-"
FRONTENDS_CHAIN = "TCPR-FRONTENDS"
POSTROUTING_CHAIN = "TCPR-POSTROUTING"
FORWARD_CHAIN = "TCPR-FORWARD"
INPUT_CHAIN = "TCPR-INPUT"
CANARY_CHAIN = "TCPR-CANARY"
FRONTEND_CHAIN_PREFIX = "TCPR-FE-"
UDP_FRONTEND_CHAIN_PREFIX = "TCPR-UDP-"
_CHAIN_PREFIXES = {Protocol.TCP: FRONTEND_CHAIN_PREFIX, Protocol.UDP: UDP_FRONTEND_CHAIN_PREFIX}
# The dispatch tree (dispatch_rules): chains TCPR-DT<first port>x<ports> (TCP), TCPR-DU<first port>x<ports> (UDP).
_BUCKET_PREFIXES = {Protocol.TCP: "TCPR-DT", Protocol.UDP: "TCPR-DU"}
_DISPATCH_CHAIN = re.compile(r"TCPR-D[TU](?:0|[1-9][0-9]*)x([1-9][0-9]*)")
FLAT_DISPATCH_MAX = 64  # frontends of a protocol dispatched by flat rules; more get the tree
DISPATCH_LEVELS = (4096, 256)  # the sizes of the tree's port ranges, from TCPR-FRONTENDS's down
BUCKET_SIZE = DISPATCH_LEVELS[-1]  # a bucket (the last level) holds its frontends' dispatch rules
ACCESS_CHAIN = "TCPR-ACCESS"
INVALID_CHAIN = "TCPR-INVALID"
ACCESS_CHAIN_PREFIX = "TCPR-AC-"  # + port: the frontend's limits
ALLOW_CHAIN_PREFIX = "TCPR-AL-"  # + port: the frontend's allowed client networks
NOTRACK_CHAIN = "TCPR-NOTRACK"  # raw: the SYNs that SYNPROXY answers
SYNPROXY_CHAIN = "TCPR-SYNPROXY"
# SYNPROXY's answer on the backends' behalf: the TCP options it offers must be ones the backends accept (any
# Linux does); the client's own MSS and options are what the backend then sees in the proxied SYN.
SYNPROXY_TARGET = "SYNPROXY --sack-perm --timestamp --wscale 7 --mss 1460"
HASHLIMIT_DEFAULT_BURST = 5
_HASHLIMIT_SCALE = 1_000_000  # the kernel keeps a rate as the interval between packets, in microseconds
_RATE_UNITS = (("day", 86400), ("hour", 3600), ("min", 60), ("sec", 1))
_REFUSAL = re.compile(r"refused-([0-9]+)-([a-z]+)")
DEFAULT_MARK_BIT = 0x100000
LOCALNET_RECORD = "route_localnet-before-"  # + the value, in the comment of TCPR-INPUT's rule
TCP_LOOSE_RECORD = "tcp_loose-before-"  # + nf_conntrack_tcp_loose's value, in the comment of TCPR-INPUT's jump
COMMENT_MAX = 64
# A rule's text as iptables-restore splits it: double-quoted parts (a backslash escapes any character in
# them), other characters but whitespace, whitespace between words; anything else is an unclosed quote.
_SEGMENT = re.compile(r'"((?:[^"\\]|\\.)*)"|([^\s"]+)|(\s+)|(")', re.DOTALL)
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)
# A comment match and its argument, double-quoted or bare (save_string's two forms), a word of its own.
_COMMENT = re.compile(r'(?:^|\s)-m comment --comment (?:"((?:[^"\\]|\\.)*)"|([^\s"]+))(?=\s|$)', re.DOTALL)

# The tables tcprouter reads and owns chains in, in the order a script writes them (raw only with synproxy:
# last, so that SYNPROXY is in place before the SYNs it answers go untracked).
TABLES = ("nat", "filter", "raw")
# table -> chain -> rule specs (the text after "-A <chain> ", as iptables-save prints it)
Tables = dict[str, dict[str, tuple[str, ...]]]


class Synproxy(StrEnum):
    LABEL = "label"  # frontends labelled tcp.synproxy=true
    ALL = "all"  # every frontend (--synproxy)
    OFF = "off"  # none: nf_conntrack_tcp_loose could not be set to 0, without which SYNPROXY breaks connections


@dataclass(frozen=True)
class Options:
    mark_bit: int = DEFAULT_MARK_BIT
    listen_address: str | None = None  # match only this destination instead of every local address
    snat_always: bool = False  # masquerade every routed flow (backends behind another router)
    route_localhost: bool = False  # route 127.0.0.1:<port> from the host too (needs route_localnet=1)
    route_localnet_before: int = 0  # the value of route_localnet before tcprouter set it to 1 (localnet.py)
    synproxy: Synproxy = Synproxy.LABEL
    tcp_loose_before: int = 1  # nf_conntrack_tcp_loose before tcprouter set it to 0 for synproxy (sysctls.py)
    forward_parent: str = "DOCKER-USER"  # where the filter hook goes: DOCKER-USER if it exists, else FORWARD
    family: Family = Family.IPV4  # the rules of which family (iptables or ip6tables): its backends only
    policy: Policy = field(default_factory=Policy)  # who may claim a port: applied by labels.desired_state
    nat_tables: bool = False  # the frontends' dispatch and DNAT live in nftables tables of their own (nftnat.py)


@dataclass(frozen=True)
class RuleSet:
    """Owned chains and their contents, plus the jumps from chains we do not own (hooks).

    Each hook is the first rule of its parent chain, except in DOCKER-USER, where it follows the operator's
    rules (diff.hook_index).
    """

    chains: Tables
    hooks: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)  # table -> (parent, rule)

    def rule_count(self) -> int:
        return sum(len(rules) for chains in self.chains.values() for rules in chains.values())


def frontend_chain(port: int, protocol: Protocol = Protocol.TCP) -> str:
    """The nat chain of the frontend on (`protocol`, `port`); frontend_of reads them back."""
    return f"{_CHAIN_PREFIXES[protocol]}{port}"


def frontend_of(chain: str) -> tuple[Protocol, int] | None:
    """The protocol and port of a frontend chain (frontend_chain's inverse); None for any other chain."""
    for protocol, prefix in _CHAIN_PREFIXES.items():
        digits = chain.removeprefix(prefix)
        if chain.startswith(prefix) and digits.isdecimal() and str(int(digits)) == digits:
            return protocol, int(digits)
    return None


def frontend_port(chain: str) -> int | None:
    """The port of a TCP frontend chain; None for any other chain."""
    found = frontend_of(chain)
    return found[1] if found and found[0] is Protocol.TCP else None


def rotation(backends: Sequence[Backend]) -> list[Backend]:
    """Smooth weighted round-robin order: each backend appears `weight` times, spread out.

    With weights (A=1, B=2) this gives B, A, B rather than A, B, B.
    """
    if all(b.weight == 1 for b in backends):
        return list(backends)  # what the loop below gives them, without its n x n steps (10,000 pools at a start)
    total = sum(b.weight for b in backends)
    current = [0] * len(backends)
    order: list[Backend] = []
    for _ in range(total):
        for i, backend in enumerate(backends):
            current[i] += backend.weight
        best = max(range(len(backends)), key=lambda i: current[i])  # first index wins ties
        current[best] -= total
        order.append(backends[best])
    return order


def _probability_text(probability: float) -> str:
    """The probability as the statistic match stores (u32 of 2^31) and prints it (%.11f)."""
    stored = int(probability * 0x80000000 + 0.5)
    return f"{stored / 0x80000000:.11f}"


def save_string(value: str) -> str:
    """A match argument as iptables-save prints it (xtables_save_string): bare if it is only
    [A-Za-z0-9_-], else double-quoted with quotes and backslashes escaped. split_words reads it back."""
    if value and all(c.isascii() and (c.isalnum() or c in "_-") for c in value):
        return value
    return '"' + "".join("\\" + c if c in "\"\\'" else c for c in value) + '"'


def split_words(spec: str) -> list[str]:
    """A rule spec -> its words, as iptables-restore splits it (so save_string's output is one word again).

    Not shlex: inside double quotes it keeps the backslash of an escaped single quote, and it treats
    single quotes as quotes, where iptables-restore takes them literally.
    """
    words: list[str] = []
    word: str | None = None
    for quoted, bare, space, unclosed in _SEGMENT.findall(spec):
        if unclosed:
            raise ValueError(f"unclosed quote in {spec!r}")
        if space:
            if word is not None:
                words.append(word)
            word = None
        else:
            word = (word or "") + (bare or _ESCAPED.sub(r"\1", quoted))
    return words if word is None else [*words, word]


def rule_comment(spec: str) -> str | None:
    """The text of a rule's comment match (the backend's name in a DNAT rule), None if it has none. As split_words
    would read its argument (one word, as save_string writes it), without splitting the whole rule: the metrics
    read this out of every DNAT rule of the kernel's tables, 110,000 at 10,000 frontends."""
    match = _COMMENT.search(spec)
    if match is None:
        return None
    quoted, bare = match.groups()
    return bare if bare is not None else _ESCAPED.sub(r"\1", quoted)


def refusal(spec: str) -> tuple[int, str] | None:
    """(frontend port, reason) of a rule that refuses clients (its comment says so), None for any other."""
    match = _REFUSAL.fullmatch(rule_comment(spec) or "")
    return (int(match.group(1)), match.group(2)) if match else None


def access_bit(mark_bit: int) -> int:
    """The conntrack mark bit next to `mark_bit` that tags connections of frontends with access labels."""
    return mark_bit << 1 if mark_bit < 1 << 31 else mark_bit >> 1


def hashlimit_rate(per_second: int) -> str:
    """`per_second` as iptables-save prints it back: the kernel keeps 1,000,000 // rate microseconds, so
    1105/sec reads back as 1106/sec (iptables' print_rate, which may also pick a longer unit)."""
    period = _HASHLIMIT_SCALE // per_second
    unit = _RATE_UNITS[0]
    for name, seconds in _RATE_UNITS[1:]:
        mult = _HASHLIMIT_SCALE * seconds
        if period > mult or mult // period < mult % period:
            break
        unit = (name, seconds)
    return f"{_HASHLIMIT_SCALE * unit[1] // period}/{unit[0]}"


_HOST_BITS = {Family.IPV4: 32, Family.IPV6: 128}
_LOOPBACK = {Family.IPV4: "127.0.0.0/8", Family.IPV6: "::1/128"}


def host(address: str) -> str:
    """One address as a network, as iptables-save and ip6tables-save print it (`/32`, `/128`)."""
    return f"{address}/{_HOST_BITS[family_of(address)]}"


def destination(address: str, port: int) -> str:
    """A DNAT target as iptables-save prints it: ip6tables brackets an IPv6 address."""
    return f"[{address}]:{port}" if family_of(address) is Family.IPV6 else f"{address}:{port}"


def _reject(port: int, reason: str) -> str:
    return f"-m comment --comment refused-{port}-{reason} -j REJECT --reject-with tcp-reset"


def access_rules(port: int, access: Access, family: Family = Family.IPV4) -> dict[str, tuple[str, ...]]:
    """The filter chains that check a new connection to the frontend on `port`; a refused one gets a reset.

    In `family`'s rules, only the allowed networks of that family are: an allow list without any refuses every
    client of the family.

    Allowed networks first (a client outside them does not use up a limit), then connections, then rate.
    The hashlimit table's name carries its settings: the kernel keeps a table's first settings as long as a
    rule uses that name, so a changed rate takes a new name.
    """
    checks: list[str] = []
    chains: dict[str, tuple[str, ...]] = {}
    if access.allow:
        allow_chain = f"{ALLOW_CHAIN_PREFIX}{port}"
        chains[allow_chain] = (
            *(f"-s {network} -j RETURN" for network in access.allow if family_of(network) is family),
            f"-p tcp {_reject(port, 'allow')}",
        )
        checks.append(f"-j {allow_chain}")
    if access.maxconn is not None:
        checks.append(
            f"-p tcp -m connlimit --connlimit-above {access.maxconn} --connlimit-mask {_HOST_BITS[family]} "
            f"--connlimit-saddr {_reject(port, 'maxconn')}"
        )
    if access.rate is not None:
        burst = access.burst or HASHLIMIT_DEFAULT_BURST
        checks.append(
            f"-p tcp -m hashlimit --hashlimit-above {hashlimit_rate(access.rate)} --hashlimit-burst {burst} "
            f"--hashlimit-mode srcip --hashlimit-name tcpr-{port}-{access.rate}-{burst} " + _reject(port, "rate")
        )
    chains[f"{ACCESS_CHAIN_PREFIX}{port}"] = tuple(checks)
    return chains


def _forward_chains(routed: Sequence[Frontend], mark_bit: int, family: Family) -> dict[str, tuple[str, ...]]:
    """TCPR-FORWARD and the chains it jumps to.

    A routed connection is accepted at the first rule unless its frontend has access labels (its mark has the
    access bit as well): then its first packet is checked in TCPR-ACCESS, and every packet is accepted by the
    third rule. A frontend without access labels costs one rule per packet, one with them three, whatever
    its labels say. An INVALID packet has no connection (so no mark); only a TCP one from a backend's network
    (a backend's reply that would leave un-NATed) or to it (a stray segment) is dropped, not the host's other
    forwarded traffic.
    """
    both = mark_bit | access_bit(mark_bit)
    forward = [f"-m connmark --mark {mark_bit:#x}/{both:#x} -j ACCEPT"]
    chains: dict[str, tuple[str, ...]] = {}
    guarded = [f for f in routed if f.access]
    if guarded:
        forward.append(f"-m connmark --mark {both:#x}/{both:#x} -m conntrack --ctstate NEW -j {ACCESS_CHAIN}")
        chains[ACCESS_CHAIN] = tuple(
            f"-m conntrack --ctorigdstport {f.port} -j {ACCESS_CHAIN_PREFIX}{f.port}" for f in guarded
        )
        for frontend in guarded:
            chains.update(access_rules(frontend.port, frontend.access, family))
    forward += [
        f"-m connmark --mark {mark_bit:#x}/{mark_bit:#x} -j ACCEPT",
        f"-m conntrack --ctstate INVALID -j {INVALID_CHAIN}",
    ]
    # To and from the backends' networks (remote backends: their hosts), not endpoints: this chain then changes when a
    # network appears, not whenever a backend joins, and a change stays one frontend chain's rewrite.
    sources = sorted({b.subnet or host(b.ip) for f in routed for b in f.backends})
    chains[INVALID_CHAIN] = tuple(f"{way} {net} -p tcp -j DROP" for net in sources for way in ("-s", "-d"))
    return {FORWARD_CHAIN: tuple(forward), **chains}


def _dnat(backend: Backend, protocol: Protocol, condition: str = "", skip_self: bool = True) -> str:
    comment = save_string(backend.name[:COMMENT_MAX] or backend.container_id[:12])
    statistic = f" -m statistic {condition}" if condition else ""
    source = f"! -s {host(backend.ip)} " if skip_self else ""
    return (
        f"{source}-p {protocol} -m comment --comment {comment}{statistic} "
        f"-j DNAT --to-destination {destination(backend.ip, backend.port)}"
    )


def _conditions(frontend: Frontend) -> list[tuple[Backend, str]]:
    """The rotation slots and the statistic condition of each; the last slot takes what is left."""
    if frontend.balance is Balance.RANDOM:
        remaining = sum(b.weight for b in frontend.backends)
        slots = []
        for backend in frontend.backends:
            slots.append((backend, f"--mode random --probability {_probability_text(backend.weight / remaining)}"))
            remaining -= backend.weight
    else:
        order = rotation(frontend.backends)
        slots = [(backend, f"--mode nth --every {len(order) - i} --packet 0") for i, backend in enumerate(order)]
    slots[-1] = (slots[-1][0], "")
    return slots


@functools.lru_cache(maxsize=8192)  # a pure function: unchanged pools are not recompiled on every event
def pool_rules(frontend: Frontend, mark: str) -> tuple[str, ...]:
    """The rules of one frontend chain: mark the connection, then pick a backend.

    A slot never sends a backend's own connection back to it (`! -s`): with bridge netfilter on, the
    bridge drops a packet DNATed back out of the port it came in on. The source test comes before the
    statistic match, so skipping does not advance the rotation that every other client sees. A backend
    whose own connection passes every slot goes to the first other backend; a lone backend gets a refusal.
    """
    slots = _conditions(frontend)
    protocol = frontend.protocol
    rules = [f"-j CONNMARK --set-xmark {mark}", *(_dnat(backend, protocol, condition) for backend, condition in slots)]
    last = slots[-1][0]
    fallback = next((backend for backend, _ in slots if backend != last), None)
    if fallback is not None:
        rules.append(f"-s {host(last.ip)} " + _dnat(fallback, protocol, skip_self=False))
    return tuple(rules)


def dispatch_tree(ports: Collection[int]) -> bool:
    """Whether the dispatch of these ports (one protocol's) is a tree of port ranges rather than flat rules."""
    return len(ports) > FLAT_DISPATCH_MAX


def bucket_start(port: int) -> int:
    """The first port of the bucket (the tree's leaf range) `port` falls in."""
    return port - port % BUCKET_SIZE


def dispatch_chain(start: int, size: int = BUCKET_SIZE, protocol: Protocol = Protocol.TCP) -> str:
    """The nat chain of the port range [start, start + size) in the tree: TCPR-DT<start>x<size> (TCP) or
    TCPR-DU<start>x<size> (UDP); no `-<digits>` tail, which frontend chains and other per-port chains have."""
    return f"{_BUCKET_PREFIXES[protocol]}{start}x{size}"


def bucket_chain(port: int, protocol: Protocol = Protocol.TCP) -> str:
    """The chain of the bucket `port` falls in: the one that holds its frontend's dispatch rule."""
    return dispatch_chain(bucket_start(port), BUCKET_SIZE, protocol)


def dispatch_range_size(chain: str) -> int | None:
    """The size of the port range of a tree's chain (dispatch_chain's names); None for any other chain."""
    match = _DISPATCH_CHAIN.fullmatch(chain)
    return int(match.group(1)) if match else None


def is_bucket_chain(chain: str) -> bool:
    """Whether `chain` is a bucket (a leaf of the tree, holding frontends' dispatch rules)."""
    return dispatch_range_size(chain) == BUCKET_SIZE


def _dispatch(port: int, protocol: Protocol) -> str:
    return f"-p {protocol} -m {protocol} --dport {port} -j {frontend_chain(port, protocol)}"


def _ranges(
    ports: Sequence[int], protocol: Protocol, levels: Sequence[int]
) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """The rules that send `ports` (sorted) on through the ranges of `levels`, and the chains below them."""
    if not levels:
        return tuple(_dispatch(port, protocol) for port in ports), {}
    size = levels[0]
    groups: dict[int, list[int]] = {}
    for port in ports:
        groups.setdefault(port - port % size, []).append(port)
    rules, chains = [], {}
    for start, members in groups.items():
        chain = dispatch_chain(start, size, protocol)
        rules.append(f"-p {protocol} -m {protocol} --dport {start}:{start + size - 1} -j {chain}")
        chains[chain], below = _ranges(members, protocol, levels[1:])
        chains.update(below)
    return tuple(rules), chains


def dispatch_rules(
    ports: Iterable[int], protocol: Protocol = Protocol.TCP, tree: bool | None = None
) -> dict[str, tuple[str, ...]]:
    """The nat chains that send a new connection to its frontend chain: TCPR-FRONTENDS's rules of `protocol` and,
    for a tree, the chains of its port ranges.

    Flat (one rule per frontend, crossed in order) up to FLAT_DISPATCH_MAX frontends; beyond, or with `tree`,
    a tree of fixed port ranges (DISPATCH_LEVELS): TCPR-FRONTENDS holds one rule per non-empty range of 4096
    ports, its chain one per non-empty bucket of 256, and the bucket's chain its frontends' rules. A first
    packet crosses at most 16 + 16 + 256 rules. The ranges are fixed, so a frontend that joins or leaves changes
    its bucket's chain only (and the chains above it when its bucket appears or empties)."""
    ordered = sorted(ports)
    if not (dispatch_tree(ordered) if tree is None else tree):
        return {FRONTENDS_CHAIN: tuple(_dispatch(port, protocol) for port in ordered)}
    rules, chains = _ranges(ordered, protocol, DISPATCH_LEVELS)
    return {FRONTENDS_CHAIN: rules, **chains}


def _snat_rules(frontends: Iterable[Frontend], mark: str, options: Options, route_localhost: bool) -> tuple[str, ...]:
    if options.snat_always:
        return (f"-m connmark --mark {mark} -j MASQUERADE",)
    # A connection to 127.0.0.1 carries a loopback source that cannot leave the host.
    localhost = (f"-s 127.0.0.0/8 -m connmark --mark {mark} -j MASQUERADE",) if route_localhost else ()
    # Hairpin: a client on a backend's own subnet would get the reply straight from the backend,
    # bypassing the reverse NAT, unless the flow is masqueraded through the host.
    subnets = sorted({b.subnet for f in frontends for b in f.backends if b.subnet})
    return localhost + tuple(f"-s {s} -d {s} -m connmark --mark {mark} -j MASQUERADE" for s in subnets)


def synproxy_ports(frontends: Iterable[Frontend], options: Options) -> list[int]:
    """The ports of the routed frontends whose SYNs SYNPROXY answers (an empty pool stays the host's)."""
    if options.synproxy is Synproxy.OFF or options.family is not Family.IPV4:  # IPv4 only, for now
        return []
    everyone = options.synproxy is Synproxy.ALL
    tcp = (f for f in frontends if f.protocol is Protocol.TCP)  # a SYN proxy is TCP's
    return sorted(f.port for f in tcp if f.backends and (everyone or f.synproxy))


def _synproxy_rules(ports: Sequence[int], options: Options) -> tuple[Tables, str, str]:
    """The raw chains, the raw PREROUTING hook, and the TCPR-INPUT rule (which records tcp_loose's earlier
    value, as long as it exists) with the filter chain it jumps to.

    SYNPROXY sits in INPUT because an untracked SYN is not DNATed: it is for a local address. TCPR-INPUT is
    INPUT's first rule, so an operator's INPUT rules (a default DROP, a DROP of INVALID packets: the client's
    ACK is INVALID until SYNPROXY takes it) cannot stop the handshake; they still see every other packet.
    """
    destination = f"-d {options.listen_address}/32 " if options.listen_address else ""
    syn = "-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN"
    hook = (
        f"{destination}{syn} -j {NOTRACK_CHAIN}"
        if destination
        else f"{syn} -m addrtype --dst-type LOCAL -j {NOTRACK_CHAIN}"
    )
    raw = {NOTRACK_CHAIN: tuple(f"-p tcp -m tcp --dport {port} -j CT --notrack" for port in ports)}
    proxy = tuple(
        f"{destination}-p tcp -m tcp --dport {port} -j {target}"
        for port in ports
        for target in (SYNPROXY_TARGET, "DROP")
    )
    jump = (
        f"-p tcp -m conntrack --ctstate INVALID,UNTRACKED "
        f"-m comment --comment {TCP_LOOSE_RECORD}{options.tcp_loose_before} -j {SYNPROXY_CHAIN}"
    )
    return {"raw": raw, "filter": {SYNPROXY_CHAIN: proxy}}, hook, jump


def tree_protocols(state: DesiredState, family: Family = Family.IPV4) -> frozenset[Protocol]:
    """The protocols whose frontends routed in `family` are dispatched by a tree (dispatch_tree)."""

    def routed(frontend: Frontend) -> bool:
        return bool(frontend.backends) if family is Family.IPV4 else any(b.ip6 for b in frontend.backends)

    def first_routed(protocol: Protocol) -> list[int]:  # enough of them to decide: this runs at every sync
        return list(islice((port for port, f in state.pools(protocol).items() if routed(f)), FLAT_DISPATCH_MAX + 1))

    return frozenset(p for p in Protocol if dispatch_tree(first_routed(p)))


def compile_rules(
    state: DesiredState, options: Options = Options(), trees: Collection[Protocol] | None = None
) -> RuleSet:
    """The rules of `options.family`: the frontends' backends of that family. `trees`: the protocols dispatched by
    a tree (None: tree_protocols of `state`), for the compile of a part of a state in the layout of the whole.
    IPv6 has no route_localnet: with --route-localhost, ::1 is still not routed (the rules of IPv6 ignore it)."""
    family = options.family
    mark = f"{options.mark_bit:#x}/{options.mark_bit:#x}"
    route_localhost = options.route_localhost and family is Family.IPV4
    # An empty pool is not routed: RST (TCP) or ICMP port unreachable (UDP) from the host.
    routed = [f for f in state.of_family(family).every_frontend() if f.backends]
    if options.listen_address:
        local = f"-d {host(options.listen_address)}"
        output_match = local
    else:
        local = "-m addrtype --dst-type LOCAL"
        # Loopback destinations stay with the host unless asked for: DNAT of 127.0.0.1 needs route_localnet.
        output_match = local if route_localhost else f"! -d {_LOOPBACK[family]} {local}"

    nat: dict[str, tuple[str, ...]] = {
        CANARY_CHAIN: (),
        POSTROUTING_CHAIN: _snat_rules(routed, mark, options, route_localhost),
    }
    if not options.nat_tables:
        nat.update(_frontend_chains(state, routed, options, trees))

    filter_chains = {CANARY_CHAIN: (), **_forward_chains(routed, options.mark_bit, family)}
    filter_hooks = [(options.forward_parent, f"-j {FORWARD_CHAIN}")]
    tables: Tables = {"nat": nat, "filter": filter_chains}
    hooks: dict[str, tuple[tuple[str, str], ...]] = {}
    inputs: list[str] = []
    if route_localhost:
        # route_localnet also lets other machines reach 127.0.0.1 services (CVE-2020-8558): drop
        # martian packets to 127.0.0.0/8 that come from anywhere but loopback and were not DNATed.
        # The comment keeps the value route_localnet had before, for `cleanup` (it lives as long as the rule).
        record = f"{LOCALNET_RECORD}{options.route_localnet_before}"
        inputs.append(
            "! -s 127.0.0.0/8 -d 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT "
            f"-m comment --comment {record} -j DROP"
        )
    ports = synproxy_ports(routed, options)
    if ports:
        synproxy, raw_hook, jump = _synproxy_rules(ports, options)
        tables["raw"] = synproxy["raw"]
        filter_chains.update(synproxy["filter"])
        hooks["raw"] = (("PREROUTING", raw_hook),)
        inputs.append(jump)
    if inputs:
        filter_chains[INPUT_CHAIN] = tuple(inputs)
        filter_hooks.append(("INPUT", f"-j {INPUT_CHAIN}"))
    dispatch_hooks = (
        ()
        if options.nat_tables
        else (("PREROUTING", f"{local} -j {FRONTENDS_CHAIN}"), ("OUTPUT", f"{output_match} -j {FRONTENDS_CHAIN}"))
    )
    hooks |= {"nat": (*dispatch_hooks, ("POSTROUTING", f"-j {POSTROUTING_CHAIN}")), "filter": tuple(filter_hooks)}
    return RuleSet(chains=tables, hooks=hooks)


def _frontend_chains(
    state: DesiredState, routed: Sequence[Frontend], options: Options, trees: Collection[Protocol] | None
) -> dict[str, tuple[str, ...]]:
    """The nat chains that dispatch a new connection (TCPR-FRONTENDS and the tree's) and the frontends' chains."""
    mark = f"{options.mark_bit:#x}/{options.mark_bit:#x}"
    if trees is None:
        trees = tree_protocols(state, options.family)
    dispatch = [
        dispatch_rules((f.port for f in routed if f.protocol is protocol), protocol, protocol in trees)
        for protocol in Protocol
    ]
    nat = {FRONTENDS_CHAIN: tuple(rule for chains in dispatch for rule in chains.pop(FRONTENDS_CHAIN))}
    for chains in dispatch:
        nat.update(chains)
    guarded_bits = options.mark_bit | access_bit(options.mark_bit)
    guarded_mark = f"{guarded_bits:#x}/{guarded_bits:#x}"
    for frontend in routed:
        nat[frontend_chain(frontend.port, frontend.protocol)] = pool_rules(
            frontend, guarded_mark if frontend.access else mark
        )
    return nat
