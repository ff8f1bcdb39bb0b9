"""What the Docker providers share: connecting as the Docker CLI does, timestamps, and following a source
through disconnections (subscribe, list, follow; on loss reconnect with a short, capped backoff)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

import docker
import docker.errors
import requests
from docker.utils import kwargs_from_env
from tenacity import RetryCallState, Retrying, retry_if_exception_type, retry_if_not_exception_type, wait_exponential

from ..metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")
# What a lost, refused, hung or broken connection to a Docker API raises.
DOCKER_ERRORS = (docker.errors.DockerException, requests.RequestException, OSError)


def connect(base_url: str | None, timeout: float) -> docker.APIClient:
    """A low-level client with a timeout on every call but the event stream.

    Without a URL: `DOCKER_HOST` or the local socket. TLS as the Docker CLI does it: `DOCKER_TLS_VERIFY` and
    `DOCKER_CERT_PATH` (ca.pem, cert.pem, key.pem) apply to every tcp:// URL; ssh:// URLs use the ssh client.
    """
    if not base_url:
        return docker.from_env(timeout=timeout).api
    tls = kwargs_from_env().get("tls") if base_url.startswith(("tcp://", "https://")) else None
    return docker.APIClient(
        base_url=base_url,
        timeout=timeout,
        version="auto",
        tls=tls or False,
        use_ssh_client=base_url.startswith("ssh://"),
    )


def url_host(url: str) -> str:
    """The host part of a tcp://, https:// or ssh:// Docker URL ("" for a Unix socket)."""
    parts = urlsplit(url)
    return "" if parts.scheme in ("unix", "npipe", "") else parts.hostname or ""


class Stopping(Exception):
    """Raised out of a reconnect loop when the daemon stops."""


def follow_forever(
    source: str,
    stopping: threading.Event,
    metrics: Metrics,
    start: Callable[[], T],
    follow: Callable[[T], None],
    close: Callable[[T], None],
) -> None:
    """Run one session after another until `stopping`: `start()` connects, subscribes and lists (retried with a
    backoff capped at 3 s, so routes follow the source soon after it returns), `follow(session)` returns or
    raises when the connection is lost, `close(session)` releases it. Never raises for Docker errors.

    The backoff restarts after every session that got going, so an outage hours later starts from a short wait.
    """
    connected = metrics.docker_connected.labels(source)
    while not stopping.is_set():
        try:
            session = _start_with_backoff(source, stopping, metrics, start)
        except Stopping:
            return
        connected.set(1)
        try:
            follow(session)
        except DOCKER_ERRORS as error:
            log.warning("%s: Docker connection lost: %s", source, error)
        except Exception:  # a bug or data no one expected: never a provider that silently stops following
            metrics.internal_errors.labels(source).inc()
            log.exception("%s: unexpected error while following Docker; reconnecting to list everything again", source)
            stopping.wait(1.0)
        finally:
            connected.set(0)
            close(session)
        if not stopping.is_set():
            metrics.docker_reconnects.labels(source).inc()


def _start_with_backoff(source: str, stopping: threading.Event, metrics: Metrics, start: Callable[[], T]) -> T:
    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, DOCKER_ERRORS):
            log.warning("%s: Docker unreachable (%s); retrying in %.1fs", source, error, state.upcoming_sleep)
        else:
            metrics.internal_errors.labels(source).inc()
            log.error(
                "%s: unexpected error while listing; retrying in %.1fs", source, state.upcoming_sleep, exc_info=error
            )

    for attempt in Retrying(
        wait=wait_exponential(multiplier=0.2, max=3),
        retry=retry_if_exception_type(Exception) & retry_if_not_exception_type(Stopping),
        before_sleep=before_sleep,
    ):
        with attempt:
            if stopping.is_set():
                raise Stopping
            return start()
    raise AssertionError("unreachable: Retrying retries forever")
