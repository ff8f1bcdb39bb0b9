"""Containers and desired states for tests: a plain factory, and hypothesis strategies."""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from tcprouter.model import (
    OPEN,
    Access,
    Backend,
    Balance,
    ContainerSnapshot,
    DesiredState,
    Frontend,
    Protocol,
    timestamp_ns,
)

ports = st.integers(min_value=1, max_value=65535)
names = st.from_regex(r"[a-z][a-z0-9_.-]{0,20}", fullmatch=True)


@st.composite
def backends(draw: st.DrawFn, index: int) -> Backend:
    subnet_octet = draw(st.integers(min_value=16, max_value=31))
    dual = draw(st.booleans())  # on a network created with --ipv6: an IPv6 address too
    return Backend(
        container_id=f"{index:064x}",
        name=f"{draw(names)}-{index}",
        ip=f"172.{subnet_octet}.{index // 250}.{index % 250 + 2}",
        port=draw(ports),
        weight=draw(st.integers(min_value=1, max_value=4)),
        subnet=f"172.{subnet_octet}.0.0/16",
        ip6=f"fd00:{subnet_octet:x}::{index + 2:x}" if dual else "",
        subnet6=f"fd00:{subnet_octet:x}::/64" if dual else None,
    )


networks = st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(8, 32)).map(
    lambda t: str(ipaddress.IPv4Network(f"{t[0]}.{t[1]}.0.0/{t[2]}", strict=False))
) | st.tuples(st.integers(0, 0xFFFF), st.integers(16, 128)).map(
    lambda t: str(ipaddress.IPv6Network(f"2001:db8:{t[0]:x}::/{t[1]}", strict=False))
)
accesses = st.builds(
    Access,
    allow=st.lists(networks, max_size=3, unique=True).map(tuple),
    maxconn=st.none() | st.integers(1, 65535),
    rate=st.none() | st.integers(1, 100_000),
    burst=st.none() | st.integers(1, 10_000),
)


@st.composite
def desired_states(draw: st.DrawFn, max_frontends: int = 5, max_backends: int = 5, udp: bool = False) -> DesiredState:
    """TCP frontends; with `udp`, UDP ones too (open to every client, on port numbers the TCP ones may share)."""
    counter = 0

    def pools(protocol: Protocol) -> dict[int, Frontend]:
        nonlocal counter
        frontends = {}
        for port in draw(st.lists(ports, max_size=max_frontends, unique=True)):
            count = draw(st.integers(min_value=0, max_value=max_backends))
            pool = []
            for _ in range(count):
                counter += 1
                pool.append(draw(backends(counter)))
            tcp = protocol is Protocol.TCP
            frontends[port] = Frontend(
                port,
                draw(st.sampled_from(Balance)),
                tuple(pool),
                access=draw(accesses) if tcp else OPEN,
                synproxy=draw(st.booleans()) if tcp else False,
                protocol=protocol,
            )
        return frontends

    tcp = pools(Protocol.TCP)
    return DesiredState(frontends=tcp, udp_frontends=pools(Protocol.UDP) if udp else {})


label_values = st.one_of(
    st.text(max_size=4),
    st.integers(min_value=-5, max_value=70000).map(str),
    st.sampled_from(["roundrobin", "random", " 80", "0x50", "1e3", "bridge", "other"]),
)
label_keys = st.sampled_from(["tcp.port", "tcp.backend_port", "tcp.network", "tcp.balance", "tcp.weight", "tcp.x"])


@st.composite
def containers(draw: st.DrawFn, index: int = 0) -> ContainerSnapshot:
    networks = draw(st.dictionaries(st.sampled_from(["bridge", "backend", "front"]), st.just(""), max_size=2))
    networks = {name: f"10.{i}.0.{index % 250 + 2}" for i, name in enumerate(sorted(networks))}
    remote = draw(st.booleans())  # a container of another host (engines, Swarm): reached at its published ports
    return ContainerSnapshot(
        id=f"{index:064x}",
        name=f"c{index}",
        created=timestamp_ns(f"2026-01-01T00:00:{index % 60:02d}Z"),
        labels=draw(st.dictionaries(label_keys, label_values, max_size=4)),
        running=draw(st.booleans()),
        health=draw(st.sampled_from([None, "starting", "healthy", "unhealthy"])),
        networks=networks,
        exposed_tcp_ports=tuple(draw(st.lists(ports, max_size=2, unique=True))),
        node=f"node{index % 3}" if remote else "",
        host_address=f"198.18.99.{index % 3 + 11}" if remote else "",
        published_tcp_ports=draw(st.dictionaries(ports, ports, max_size=2)) if remote else {},
    )


def container(i: int, **fields: object) -> ContainerSnapshot:
    """Running container c<i> labelled tcp.port=80 at 10.9.0.<i+1>, created <i> s into 2026; `fields` override."""
    values: dict[str, object] = {
        "id": f"{i:064x}",
        "name": f"c{i}",
        "created": timestamp_ns(f"2026-01-01T00:00:{i:02d}Z"),
        "labels": {"tcp.port": "80"},
        "running": True,
        "networks": {"bridge": f"10.9.0.{i + 1}"},
        "subnets": {"bridge": "10.9.0.0/24"},
    }
    values.update(fields)
    return ContainerSnapshot(**values)  # type: ignore[arg-type]
