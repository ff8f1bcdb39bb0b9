"""The ports the host already uses: a frontend there would hijack a host process's listener or a port that
Docker publishes (`docker run -p`, a DNAT rule in Docker's nat chain, with or without a userland proxy)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .compiler import split_words

DOCKER_NAT_CHAIN = "DOCKER"


def parse_tcp_listeners(text: str, loopback: bool = False) -> dict[int, str]:
    """Listening sockets in /proc/net/tcp or /proc/net/tcp6 format: port -> local address.

    Loopback-only listeners are left out, but for IPv4 ones with `loopback` (--route-localhost routes 127.0.0.1).
    """
    listeners: dict[int, str] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != "0A":  # 0A: TCP_LISTEN
            continue
        address, port = proc_net_endpoint(fields[1])
        if not address.is_loopback or (loopback and address.version == 4):  # only 127.0.0.1 is routed
            listeners.setdefault(port, str(address))
    return listeners


def proc_net_endpoint(field: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """An `ADDRESS:PORT` field of /proc/net/tcp{,6}; an IPv4-mapped IPv6 address comes back as IPv4."""
    hex_address, hex_port = field.split(":")
    raw = bytes.fromhex(hex_address)
    # The kernel prints each 32-bit word in host (little-endian) order.
    address = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address, int(hex_port, 16)


def host_tcp_listeners(loopback: bool = False) -> dict[int, str]:
    """The host's TCP listeners that a frontend on the same port would hijack."""
    listeners: dict[int, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                listeners.update(parse_tcp_listeners(f.read(), loopback))
        except OSError:
            continue
    return listeners


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
