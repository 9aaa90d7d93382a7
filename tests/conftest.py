"""Shared fixtures: a real embedded broker and a real embedded PostgreSQL for the whole session,
and for end-to-end tests a broker, a consumer group and worker processes of the test's own."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from workers import Kafka, Worker

from app.embedded import EmbeddedBroker, embedded_postgres
from app.settings import Settings
from schema.migrate import migrate_database


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log_path = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(log_path=log_path) as running:
        yield running


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DSN of the session's PostgreSQL server (its `postgres` database)."""
    with embedded_postgres(Path(tmp_path_factory.mktemp("pg")) / "data") as dsn:
        yield dsn


def dsn_for(server_dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(server_dsn)._replace(path=f"/{database}"))


@pytest.fixture
async def database_dsn(postgres_server: str) -> AsyncIterator[str]:
    """A fresh, empty database per test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield dsn_for(postgres_server, name)
    admin = await asyncpg.connect(postgres_server)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def bare_env() -> dict[str, str]:
    """The environment without any app setting: a developer's own variables cannot leak in."""
    names = {name.upper() for name in Settings.model_fields}
    return {name: value for name, value in os.environ.items() if name.upper() not in names}


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch, bare_env: dict[str, str]) -> pytest.MonkeyPatch:
    """`monkeypatch` on an environment without the developer's own app settings."""
    for name in set(os.environ) - set(bare_env):
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
async def migrated(database_dsn: str) -> str:
    """A fresh database with the app's schema applied."""
    await migrate_database(database_dsn)
    return database_dsn


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker of the test's own: its topics and consumer groups start empty."""
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as running:
        yield running


@pytest.fixture
def app_id() -> str:
    """The test's consumer group (Faust APP_ID)."""
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def kafka(own_broker: EmbeddedBroker, app_id: str) -> AsyncIterator[Kafka]:
    kafka = Kafka(f"127.0.0.1:{own_broker.port}", app_id)
    await kafka.start()
    yield kafka
    await kafka.stop()


@pytest.fixture
def workers(
    own_broker: EmbeddedBroker, app_id: str, bare_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., Worker]]:
    """Starts workers of the test's group on `own_broker`; kills any still running at the end."""
    started: list[Worker] = []

    def start(dsn: str, extra: Mapping[str, str] | None = None) -> Worker:
        started.append(Worker(bare_env, own_broker, dsn, app_id, tmp_path, extra))
        return started[-1]

    yield start
    for worker in started:
        worker.kill()
