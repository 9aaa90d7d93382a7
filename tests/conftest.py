"""Shared fixtures: a real embedded broker and a real embedded PostgreSQL for the whole session."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from app.embedded import EmbeddedBroker, embedded_postgres
from app.settings import Settings


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
