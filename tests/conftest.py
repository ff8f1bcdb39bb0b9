"""Shared fixtures. Kernel tests use private network namespaces; e2e tests use the real Docker engine,
the host's real tables (one session at a time, under a lock) and a client namespace."""

from __future__ import annotations

import os

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")  # Ryuk's image cannot be pulled here

import contextlib
from collections.abc import Callable, Iterator

import docker
import pytest
from testcontainers.core.container import DockerContainer

from tcprouter.netfilter import detect_flavour

from .cluster import engines_lab, swarm_lab  # noqa: F401  (the gateway tests' labs)
from .support import (
    BACKEND_IMAGE,
    BACKEND_PORT,
    ClientHost,
    Router,
    foreign_rules_in_host,
    host_rules_lock,
    owned_rules_in_host,
    tcprouter,
    wait_until,
)


@pytest.fixture(scope="session")
def flavour() -> str:
    return str(detect_flavour())


@pytest.fixture(scope="session")
def docker_api() -> docker.DockerClient:
    return docker.from_env()


@pytest.fixture(scope="session")
def client_namespace(host_tables: str) -> Iterator[ClientHost]:
    """An external client on 198.51.100.0/24 (one per host at a time: it holds the host lock)."""
    host = ClientHost().create()
    yield host
    host.destroy()


@pytest.fixture
def client_host(client_namespace: ClientHost) -> ClientHost:
    """The external client, with no flow of an earlier test left in the host's conntrack table."""
    client_namespace.forget_flows()
    return client_namespace


@pytest.fixture(scope="session")
def host_tables(flavour: str) -> Iterator[str]:
    """Exclusive use of the host's tables; fails the session if tcprouter rules are left behind."""
    with host_rules_lock():
        tcprouter("cleanup")  # a previous run that was killed may have left its rules
        yield flavour
        tcprouter("cleanup")


class Backends:
    """Starts labelled backend containers and removes every one of them at teardown."""

    def __init__(self) -> None:
        self.started: list[DockerContainer] = []

    def start(self, labels: dict[str, str], wait: bool = True, **kwargs: object) -> DockerContainer:
        container = DockerContainer(BACKEND_IMAGE, labels=labels, **kwargs)
        container.start()
        self.started.append(container)
        if wait:
            ip = self.ip(container)
            from .support import connect_outcome

            wait_until(lambda: connect_outcome(None, ip, BACKEND_PORT, 1) == "answered", 10, what=f"{ip} listening")
        return container

    @staticmethod
    def ip(container: DockerContainer) -> str:
        wrapped = container.get_wrapped_container()
        wrapped.reload()
        networks = wrapped.attrs["NetworkSettings"]["Networks"]
        return next(iter(networks.values()))["IPAddress"]

    @staticmethod
    def pid(container: DockerContainer) -> int:
        wrapped = container.get_wrapped_container()
        wrapped.reload()
        return int(wrapped.attrs["State"]["Pid"])

    def remove(self, container: DockerContainer) -> None:
        container.stop()
        self.started.remove(container)

    def remove_all(self) -> None:
        for container in self.started:
            with contextlib.suppress(docker.errors.NotFound):
                container.stop()
        self.started.clear()


@pytest.fixture
def backends() -> Iterator[Backends]:
    pool = Backends()
    yield pool
    pool.remove_all()


LOG_TAIL = 30_000  # characters of each router's log in a failure report


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failing test's report ends with the log of every router it started (see `start_router`)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for router in getattr(item, "routers", ()):
            report.sections.append((f"tcprouter log {router.log_path}", router.log()[-LOG_TAIL:]))


@pytest.fixture
def start_router(host_tables: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., Router]]:
    """Start `tcprouter run` with extra arguments; stopped and cleaned up after the test."""
    routers: list[Router] = []
    request.node.routers = routers

    def start(*args: str) -> Router:
        router = Router(*args).start()
        routers.append(router)
        return router

    yield start
    for router in routers:
        router.stop()
    tcprouter("cleanup")
    assert owned_rules_in_host(host_tables) == []


@pytest.fixture
def foreign_rules(host_tables: str) -> Callable[[], list[str]]:
    return lambda: foreign_rules_in_host(host_tables)
