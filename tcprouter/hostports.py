"""The ports the host already uses: a frontend there would hijack a host process's listener or a port that
Docker publishes (`docker run -p`, a DNAT rule in Docker's nat chain, with or without a userland proxy)."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable

from pyroute2 import DiagSocket
from pyroute2.netlink.diag import SS_LISTEN

from .compiler import split_words

log = logging.getLogger(__name__)

DOCKER_NAT_CHAIN = "DOCKER"


def _listeners(
    endpoints: Iterable[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]], loopback: bool
) -> dict[int, str]:
    """port -> local address of listening sockets; loopback-only ones are left out, but for IPv4 ones with
    `loopback` (--route-localhost routes 127.0.0.1)."""
    listeners: dict[int, str] = {}
    for address, port in endpoints:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not address.is_loopback or (loopback and address.version == 4):  # only 127.0.0.1 is routed
            listeners.setdefault(port, str(address))
    return listeners


def parse_tcp_listeners(text: str, loopback: bool = False) -> dict[int, str]:
    """Listening sockets in /proc/net/tcp or /proc/net/tcp6 format: port -> local address (see _listeners)."""
    rows = (line.split() for line in text.splitlines()[1:])
    return _listeners((proc_net_endpoint(f[1]) for f in rows if len(f) >= 4 and f[3] == "0A"), loopback)  # 0A: LISTEN


def proc_net_endpoint(field: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """An `ADDRESS:PORT` field of /proc/net/tcp{,6}; an IPv4-mapped IPv6 address comes back as IPv4."""
    hex_address, hex_port = field.split(":")
    raw = bytes.fromhex(hex_address)
    # The kernel prints each 32-bit word in host (little-endian) order.
    address = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address, int(hex_port, 16)


def netlink_tcp_listeners(loopback: bool = False) -> dict[int, str]:
    """The listening TCP sockets of this network namespace, both families, asked of the kernel by NETLINK_SOCK_DIAG
    (inet_diag, as `ss -ltn` does) with a LISTEN state filter: the kernel skips the other sockets, so the cost does
    not grow with established or TIME_WAIT ones. No capability is needed to list sockets. OSError if the kernel
    has no inet_diag."""
    with DiagSocket() as diag:
        diag.bind()
        found = [
            (ipaddress.ip_address(row["idiag_src"]), row["idiag_sport"])
            for family in (socket.AF_INET, socket.AF_INET6)
            for row in diag.get_sock_stats(family=family, states=1 << SS_LISTEN)
        ]
    return _listeners(found, loopback)


def proc_tcp_listeners(loopback: bool = False) -> dict[int, str]:
    """The same from /proc/net/tcp and tcp6, which list every socket (a parse that grows with them all)."""
    listeners: dict[int, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                listeners.update(parse_tcp_listeners(f.read(), loopback))
        except OSError:
            continue
    return listeners


def host_tcp_listeners(loopback: bool = False) -> dict[int, str]:
    """The host's TCP listeners that a frontend on the same port would hijack: by netlink, else from /proc."""
    try:
        return netlink_tcp_listeners(loopback)
    except OSError as error:  # pyroute2's NetlinkError is an OSError too
        log.warning("listing listeners by netlink sock_diag failed (%s): reading /proc/net/tcp instead", error)
        return proc_tcp_listeners(loopback)


def docker_published_ports(docker_chain: Iterable[str]) -> dict[int, str]:
    """Docker's published TCP ports, from the rules of its nat chain (`-p tcp -m tcp --dport N -j DNAT
    --to-destination A:P`, as iptables-save prints them): port -> the destination."""
    published: dict[int, str] = {}
    for spec in docker_chain:
        words = split_words(spec)
        if _value(words, "-p") != "tcp" or _value(words, "-j") != "DNAT":
            continue
        dport = _value(words, "--dport")
        if dport is not None and dport.isdecimal():
            published.setdefault(int(dport), _value(words, "--to-destination") or "?")
    return published


def _value(words: list[str], option: str) -> str | None:
    return words[words.index(option) + 1] if option in words[:-1] else None


def busy_ports(docker_chain: Iterable[str] = (), loopback: bool = False) -> dict[int, str]:
    """The ports the host already uses (its listeners, Docker's published ports): port -> who uses it."""
    # Docker's own description first: with its userland proxy, a published port also has a listener.
    used = {
        port: f"Docker publishes it (DNAT to {target})" for port, target in docker_published_ports(docker_chain).items()
    }
    for port, address in host_tcp_listeners(loopback).items():
        used.setdefault(port, f"a host process already listens on {address}:{port}")
    return used
