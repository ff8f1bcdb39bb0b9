"""The ports the host already uses: a frontend there would hijack a host process's listener or a port that
Docker publishes (`docker run -p`, a DNAT rule in Docker's nat chain, with or without a userland proxy). A UDP
frontend conflicts with UDP ones only, a TCP frontend with TCP ones only."""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections.abc import Iterable

from . import netlink
from .compiler import split_words
from .model import Protocol

log = logging.getLogger(__name__)

DOCKER_NAT_CHAIN = "DOCKER"
# The socket state of a listener: TCP_LISTEN; for UDP, a bound socket that is not connected to one peer (TCP_CLOSE,
# as the kernel names UDP states too).
_LISTENING = {Protocol.TCP: 10, Protocol.UDP: 7}
_IPPROTO = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP}
# linux/inet_diag.h. The request, inet_diag_req_v2: family, protocol, extensions (none), pad, the mask of states, then
# an inet_diag_sockid left zero (a dump matches any). A reply, inet_diag_msg: family, state, timer, retrans, then the
# sockid: the local port, the remote one, the local address (16 bytes, of which an IPv4 one uses the first 4), ...
_DIAG_REQUEST = struct.Struct("=BBBxI48x")
_DIAG_REPLY = struct.Struct(">4xH2x16s")  # the local port and address
_ADDRESS_SIZE = {socket.AF_INET: 4, socket.AF_INET6: 16}
Endpoint = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


def _listeners(endpoints: Iterable[Endpoint], loopback: bool) -> dict[int, str]:
    """port -> local address of listening sockets; loopback-only ones are left out, but for IPv4 ones with
    `loopback` (--route-localhost routes 127.0.0.1)."""
    listeners: dict[int, str] = {}
    for address, port in endpoints:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not address.is_loopback or (loopback and address.version == 4):  # only 127.0.0.1 is routed
            listeners.setdefault(port, str(address))
    return listeners


def parse_listeners(text: str, loopback: bool = False, protocol: Protocol = Protocol.TCP) -> dict[int, str]:
    """Listening sockets in /proc/net/tcp{,6} format (/proc/net/udp{,6} with `protocol` UDP): port -> local
    address (see _listeners)."""
    state = f"{_LISTENING[protocol]:02X}"
    rows = (line.split() for line in text.splitlines()[1:])
    return _listeners((proc_net_endpoint(f[1]) for f in rows if len(f) >= 4 and f[3] == state), loopback)


def proc_net_endpoint(field: str) -> Endpoint:
    """An `ADDRESS:PORT` field of /proc/net/tcp{,6}; an IPv4-mapped IPv6 address comes back as IPv4."""
    hex_address, hex_port = field.split(":")
    raw = bytes.fromhex(hex_address)
    # The kernel prints each 32-bit word in host (little-endian) order.
    address = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address, int(hex_port, 16)


def netlink_listeners(loopback: bool = False, protocol: Protocol = Protocol.TCP) -> dict[int, str]:
    """The listening sockets of `protocol` in this network namespace, both families, asked of the kernel by
    NETLINK_SOCK_DIAG (inet_diag, as `ss -ltn` does) with a state filter: the kernel skips the other sockets, so the
    cost does not grow with established or TIME_WAIT ones. No capability is needed to list sockets. OSError if the
    kernel has no inet_diag (or udp_diag)."""
    found: list[Endpoint] = []
    with netlink.Requester(netlink.NETLINK_SOCK_DIAG) as diag:
        for family, size in _ADDRESS_SIZE.items():
            request = _DIAG_REQUEST.pack(family, _IPPROTO[protocol], 0, 1 << _LISTENING[protocol])
            replies, _ = diag.ask(netlink.SOCK_DIAG_BY_FAMILY, request, netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP)
            for reply in replies:
                port, address = _DIAG_REPLY.unpack_from(reply.payload)
                found.append((ipaddress.ip_address(address[:size]), port))
    return _listeners(found, loopback)


def proc_listeners(loopback: bool = False, protocol: Protocol = Protocol.TCP) -> dict[int, str]:
    """The same from /proc/net/{tcp,udp}{,6}, which list every socket (a parse that grows with them all)."""
    listeners: dict[int, str] = {}
    for table in (f"/proc/net/{protocol}", f"/proc/net/{protocol}6"):
        try:
            with open(table) as f:
                listeners.update(parse_listeners(f.read(), loopback, protocol))
        except OSError:
            continue
    return listeners


def host_listeners(loopback: bool = False, protocol: Protocol = Protocol.TCP) -> dict[int, str]:
    """The host's TCP (or UDP) listeners that a frontend on the same port would hijack: by netlink, else /proc."""
    try:
        return netlink_listeners(loopback, protocol)
    except OSError as error:  # the kernel's refusal (ENOENT: no inet_diag), a timeout: OSErrors all
        log.warning("listing %s listeners by netlink sock_diag failed (%s): reading /proc instead", protocol, error)
        return proc_listeners(loopback, protocol)


def docker_published_ports(docker_chain: Iterable[str], protocol: Protocol = Protocol.TCP) -> dict[int, str]:
    """Docker's published TCP (or UDP) ports, from the rules of its nat chain (`-p tcp -m tcp --dport N -j DNAT
    --to-destination A:P`, as iptables-save prints them): port -> the destination."""
    published: dict[int, str] = {}
    for spec in docker_chain:
        words = split_words(spec)
        if _value(words, "-p") != protocol or _value(words, "-j") != "DNAT":
            continue
        dport = _value(words, "--dport")
        if dport is not None and dport.isdecimal():
            published.setdefault(int(dport), _value(words, "--to-destination") or "?")
    return published


def _value(words: list[str], option: str) -> str | None:
    return words[words.index(option) + 1] if option in words[:-1] else None


def busy_ports(
    docker_chain: Iterable[str] = (), loopback: bool = False, protocol: Protocol = Protocol.TCP
) -> dict[int, str]:
    """The ports of `protocol` the host already uses (its listeners, Docker's published ports): port -> who uses
    it."""
    # Docker's own description first: with its userland proxy, a published port also has a listener.
    published = docker_published_ports(docker_chain, protocol)
    used = {port: f"Docker publishes it (DNAT to {target})" for port, target in published.items()}
    for port, address in host_listeners(loopback, protocol).items():
        used.setdefault(port, f"a host process already listens on {address}:{port}")
    return used
