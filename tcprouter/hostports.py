"""The host's own TCP listeners: a frontend on a port where a host process listens would hijack it."""

from __future__ import annotations

import ipaddress


def parse_tcp_listeners(text: str) -> dict[int, str]:
    """Listening sockets in /proc/net/tcp or /proc/net/tcp6 format: port -> local address.

    Loopback-only listeners are left out: tcprouter never routes loopback destinations.
    """
    listeners: dict[int, str] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != "0A":  # 0A: TCP_LISTEN
            continue
        address, port = proc_net_endpoint(fields[1])
        if not address.is_loopback:
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


def host_tcp_listeners() -> dict[int, str]:
    """The host's TCP listeners that a frontend on the same port would hijack."""
    listeners: dict[int, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                listeners.update(parse_tcp_listeners(f.read()))
        except OSError:
            continue
    return listeners
