"""The ports the host already uses: a frontend there would hijack a host process's listener or a port that
Docker publishes (`docker run -p`, a DNAT rule in Docker's nat chain, with or without a userland proxy). A UDP
frontend conflicts with UDP ones only, a TCP frontend with TCP ones only."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .compiler import split_words
from .model import Protocol

DOCKER_NAT_CHAIN = "DOCKER"
# The socket state of a listener in /proc/net/{tcp,udp}: TCP_LISTEN; for UDP, a bound socket that is not
# connected to one peer (TCP_CLOSE, as the kernel prints UDP states).
_LISTENING = {Protocol.TCP: "0A", Protocol.UDP: "07"}


def parse_tcp_listeners(text: str, loopback: bool = False, protocol: Protocol = Protocol.TCP) -> dict[int, str]:
    """Listening sockets in /proc/net/tcp or /proc/net/tcp6 format (/proc/net/udp{,6} with `protocol` UDP):
    port -> local address.

    Loopback-only listeners are left out, but for IPv4 ones with `loopback` (--route-localhost routes 127.0.0.1).
    """
    listeners: dict[int, str] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != _LISTENING[protocol]:
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


def host_tcp_listeners(loopback: bool = False, protocol: Protocol = Protocol.TCP) -> dict[int, str]:
    """The host's TCP (or UDP) listeners that a frontend on the same port would hijack."""
    listeners: dict[int, str] = {}
    for table in (f"/proc/net/{protocol}", f"/proc/net/{protocol}6"):
        try:
            with open(table) as f:
                listeners.update(parse_tcp_listeners(f.read(), loopback, protocol))
        except OSError:
            continue
    return listeners


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
    for port, address in host_tcp_listeners(loopback, protocol).items():
        used.setdefault(port, f"a host process already listens on {address}:{port}")
    return used
