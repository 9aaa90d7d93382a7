"""The services a command needs, tried before it starts, and their failures told in one line.

A wrong DATABASE_URL or BROKER_URL used to surface as two copies of a long traceback (the
command's, then mode's while stopping). Here each failure becomes one line that names the
setting (the database password hidden), and the command exits non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import asyncpg
from aiokafka import AIOKafkaClient
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from faust.types.auth import CredentialsT

from app.settings import OFFLINE, Settings
from common.redaction import redact_password, redact_url
from generators.sql import TimescaleMode
from store.db import connect

# What a database that is down, unreachable or misconfigured raises.
DATABASE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
# Failures that can heal without a change of settings: the server is down, starting or full.
TRANSIENT_DATABASE_ERRORS = (
    ConnectionRefusedError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)
CHECK_TIMEOUT = 10.0  # seconds for each service to answer
KAFKA_PORT = 9092  # aiokafka's default when BROKER_URL names no port


class CannotStart(Exception):
    """A setting or a service the command needs is unusable; the message is the line to print."""


def say(line: str) -> None:
    print(f"qicore: {line}", file=sys.stderr, flush=True)


def _network_failure(error: OSError) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (is the server running there, on that port?)"
    if isinstance(error, socket.gaierror):
        return f"unknown host ({error.strerror})"
    if isinstance(error, TimeoutError):
        return f"no answer within {CHECK_TIMEOUT:g} s"
    if isinstance(error, FileNotFoundError):
        return f"no server socket at {error.filename or 'that path'}"
    return error.strerror or str(error)


def describe_database_error(error: BaseException, dsn: str) -> str:
    """`DATABASE_URL=<url, password hidden>: <what failed>`."""
    if isinstance(error, OSError):
        reason = _network_failure(error)
    else:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"DATABASE_URL={redact_url(dsn)}: {redact_password(reason, dsn)}"


async def database_error(dsn: str) -> BaseException | None:
    """Connect once; the failure, or None when the database answers."""
    try:
        connection = await connect(dsn, timeout=CHECK_TIMEOUT)
    except DATABASE_ERRORS as error:
        return error
    await connection.close()
    return None


def _bootstrap_servers(broker_url: str) -> list[tuple[str, int]]:
    servers = []
    for url in broker_url.split(";"):
        parts = urlsplit(url)
        servers.append((parts.hostname or "", parts.port or KAFKA_PORT))
    return servers


class _Held(logging.Handler):
    """Keeps a library's log records to itself; remembers the last warning or error."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage()


@contextmanager
def _holding(logger: str, held: _Held) -> Iterator[None]:
    """Keep a library's log records (its modules' too) to itself for a while: before the worker
    sets logging up they would print, tracebacks included, next to our one line; the last one
    often says why (aiokafka's "Unable to bootstrap" hides a refused SASL mechanism)."""
    log = logging.getLogger(logger)
    propagate, log.propagate = log.propagate, False
    log.addHandler(held)
    try:
        yield
    finally:
        log.removeHandler(held)
        log.propagate = propagate


async def broker_problem(settings: Settings, credentials: CredentialsT | None) -> str | None:
    """Why no Kafka client can start on BROKER_URL, or None: a server must accept a connection,
    then a client with the configured security must read its metadata."""
    servers = _bootstrap_servers(settings.broker_url)
    failures = []
    for host, port in servers:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CHECK_TIMEOUT)
        except OSError as error:  # TimeoutError is one too
            failures.append(f"{host}:{port} {_network_failure(error)}")
            continue
        writer.close()
        break
    else:
        return f"cannot reach the broker at BROKER_URL={settings.broker_url}: {'; '.join(failures)}"
    client = AIOKafkaClient(
        bootstrap_servers=[f"{host}:{port}" for host, port in servers],
        request_timeout_ms=int(CHECK_TIMEOUT * 1000),
        **credentials_to_aiokafka_auth(credentials),
    )
    held = _Held()
    try:
        with _holding("aiokafka", held):
            await asyncio.wait_for(client.bootstrap(), CHECK_TIMEOUT)
    except Exception as error:  # TLS, SASL, protocol: whatever stops a client stops the worker
        timed_out = isinstance(error, TimeoutError)
        reason = f"no answer within {CHECK_TIMEOUT:g} s" if timed_out else f"{error}"
        if held.last:
            reason += f" ({held.last})"
        return (
            f"the broker at BROKER_URL={settings.broker_url} refused the client "
            f"(BROKER_SECURITY_PROTOCOL={settings.broker_security_protocol}): {reason}"
        )
    finally:
        await client.close()
    return None


async def worker_preflight(settings: Settings, credentials: CredentialsT | None) -> int:
    """Try what the worker needs; print one line per problem; return the exit status (0: start).

    A database that refuses connections or is starting may come back: the worker starts anyway
    (the poller keeps publishing, the sinks wait for it, /health says so). A database that will
    never accept these settings (unknown database or role, wrong password, unknown host), an
    unreachable broker or an unusable setting stop it."""
    if settings.coingecko_base_url == OFFLINE:
        say(
            f"invalid setting COINGECKO_BASE_URL: {OFFLINE!r} works only under `faust -A app up`, "
            "which serves the bundled fake CoinGecko; set an http(s) URL or leave it unset"
        )
        return 2
    problem = await broker_problem(settings, credentials)
    if problem is not None:
        say(problem)
        return 1
    error = await database_error(settings.database_dsn)
    if error is None:
        return 0
    description = describe_database_error(error, settings.database_dsn)
    if isinstance(error, TRANSIENT_DATABASE_ERRORS):
        say(f"database unavailable at start, {description}; the sinks wait for it (see /health)")
        return 0
    say(f"cannot use the database, {description}")
    return 1


async def migrate(
    dsn: str, *, force: bool = False, timescaledb: TimescaleMode = "auto"
) -> list[str]:
    """`migrate_database`, each failure a `CannotStart` with its one line."""
    # Imported here: the worker imports this module for its preflight, and never migrates.
    from generators.migrate import MigrationRefused, TimescaleUnavailable, migrate_database

    try:
        return await migrate_database(dsn, force=force, timescaledb=timescaledb)
    except MigrationRefused as refused:
        raise CannotStart(f"migration refused: {refused}") from None
    except TimescaleUnavailable as unavailable:
        raise CannotStart(str(unavailable)) from None
    except DATABASE_ERRORS as error:
        raise CannotStart(f"cannot migrate, {describe_database_error(error, dsn)}") from None
