"""The tests' fixtures (loaded by `tests/conftest.py` through `pytest_plugins`): a real embedded
broker and a real embedded PostgreSQL for the whole session, fresh databases, the local CoinGecko
fake, and for end-to-end tests a broker, a consumer group and worker processes of the test's own.
Each name is defined once, here: no test module redefines one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

import asyncpg
import httpx
import pytest

from coingecko.fake_server import FakeCoinGecko, serve_fake_coingecko
from generators.migrate import migrate_database
from local.embedded import EmbeddedBroker, embedded_postgres
from store.db import create_pool
from testkit.databases import fresh_database
from testkit.pollers import BrokerTopics
from testkit.workers import Kafka, Process, Worker, env_without_settings


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "fake_coingecko(extra_coins=N): how many generated coins the `fake_coingecko` fixture "
        "lists besides the recorded ones (default 0)",
    )


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


@pytest.fixture
async def database_dsn(postgres_server: str) -> AsyncIterator[str]:
    """A fresh, empty database per test, dropped afterwards."""
    async with fresh_database(postgres_server) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def bare_env() -> dict[str, str]:
    """The environment without any app setting: a developer's own variables cannot leak in."""
    return env_without_settings()


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
async def pool(migrated: str) -> AsyncIterator[asyncpg.Pool]:
    """A one-connection pool on a migrated database, as the app opens it: every batch reuses the
    same session (and its staging table)."""
    pool = await create_pool(migrated, min_size=1, max_size=1)
    yield pool
    await pool.close()


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
    """The test's side of `own_broker`: its producer and its group's committed offsets."""
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


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Every process a test starts (it appends them); stopped if the test fails first."""
    started: list[Process] = []
    yield started
    for process in started:
        process.close()


@pytest.fixture
async def topics(broker: EmbeddedBroker) -> AsyncIterator[BrokerTopics]:
    """Publishing like the app to the session broker, under topic names of the test's own."""
    published = BrokerTopics(broker)
    await published.producer.start()
    yield published
    await published.producer.stop()


@pytest.fixture
async def fake_coingecko(request: pytest.FixtureRequest) -> AsyncIterator[FakeCoinGecko]:
    """The local CoinGecko fake, speaking HTTP on a port of its own (see the `fake_coingecko`
    marker for its size)."""
    marker = request.node.get_closest_marker("fake_coingecko")
    extra_coins = marker.kwargs.get("extra_coins", 0) if marker else 0
    async with serve_fake_coingecko(extra_coins=extra_coins) as server:
        yield server


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeCoinGecko, FakeCoinGecko]]:
    """Two CoinGecko fakes, one per worker of a test that tells which of them polled."""
    async with serve_fake_coingecko() as first, serve_fake_coingecko() as second:
        yield first, second


@pytest.fixture
async def web(
    migrated: str, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the worker's views served in-process over `migrated` (`pool` is the
    test's own connection to it, for writing rows)."""
    from testkit.web import serve_views  # imports the Faust app: only the tests that ask for it

    async with serve_views(migrated, monkeypatch) as client:
        yield client
