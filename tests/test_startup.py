"""First-day failures: a database, broker or setting the command cannot use is one line naming
the setting and a non-zero exit, never a traceback. The commands run as users run them, against
the embedded PostgreSQL and broker, a closed port, or a database that is not there."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from app.settings import load_settings
from generators.migrate import NOT_PRELOADED, TimescaleUnavailable, migrate_database
from local.embedded import EmbeddedBroker, free_port
from models import RECORDS
from testkit.databases import dsn_for
from testkit.records import prices
from testkit.workers import Kafka, Worker

PROJECT = Path(__file__).resolve().parent.parent
DB_PASSWORD = "pg-sekrit-789"
TIMEOUT = 120.0
NO_COINGECKO = "http://127.0.0.1:9/api/v3"


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "faust", "-A", "app", *args],
        cwd=PROJECT,
        env={"COINGECKO_BASE_URL": NO_COINGECKO, **env},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The command's only line on stderr; there is no traceback anywhere."""
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def closed_port_dsn() -> str:
    return f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1:{free_port()}/postgres"


def unknown_database(server: str) -> str:
    return dsn_for(server, "no_such_database")


def unknown_role(server: str) -> str:
    return server.replace("postgres:@", f"nobody:{DB_PASSWORD}@")


# (DSN from the server's, what the line says): databases these settings can never use...
NEVER_USABLE = [
    pytest.param(unknown_database, 'database "no_such_database" does not exist', id="database"),
    pytest.param(unknown_role, 'role "nobody" does not exist', id="role"),
]
# ...and one that may come back.
REFUSING = pytest.param(lambda _server: closed_port_dsn(), "connection refused", id="refused")


@pytest.mark.slow
@pytest.mark.parametrize(("dsn_of", "reason"), [REFUSING, *NEVER_USABLE])
async def test_migrate_names_an_unusable_database_in_one_line(
    postgres_server: str,
    bare_env: dict[str, str],
    tmp_path: Path,
    dsn_of: Callable[[str], str],
    reason: str,
) -> None:
    dsn = dsn_of(postgres_server)
    env = {**bare_env, "DATABASE_URL": dsn, "DATA_DIR": str(tmp_path)}
    result = await asyncio.to_thread(run, ["migrate"], env)
    assert result.returncode == 1
    line = one_line(result)
    shown = dsn.replace(f":{DB_PASSWORD}@", ":***@")
    assert line.startswith(f"qicore: cannot migrate, DATABASE_URL={shown}: "), line
    assert reason in line
    assert DB_PASSWORD not in result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("dsn_of", "reason"), NEVER_USABLE)
async def test_worker_stops_on_a_database_it_can_never_use(
    broker: EmbeddedBroker,
    postgres_server: str,
    bare_env: dict[str, str],
    tmp_path: Path,
    dsn_of: Callable[[str], str],
    reason: str,
) -> None:
    env = {
        **bare_env,
        "BROKER_URL": broker.url,
        "DATABASE_URL": dsn_of(postgres_server),
        "DATA_DIR": str(tmp_path),
    }
    result = await asyncio.to_thread(run, ["worker", "-l", "info"], env)
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith("qicore: cannot use the database, DATABASE_URL="), line
    assert reason in line


@pytest.mark.slow
async def test_worker_stops_when_the_broker_cannot_be_reached(
    migrated: str, bare_env: dict[str, str], tmp_path: Path
) -> None:
    url = f"kafka://127.0.0.1:{free_port()}"
    env = {**bare_env, "BROKER_URL": url, "DATABASE_URL": migrated, "DATA_DIR": str(tmp_path)}
    result = await asyncio.to_thread(run, ["worker", "-l", "info"], env)
    assert result.returncode == 1
    assert one_line(result) == (
        f"qicore: cannot reach the broker at BROKER_URL={url}: {url.removeprefix('kafka://')} "
        "connection refused (is the server running there, on that port?)"
    )


@pytest.mark.slow
async def test_worker_stops_when_the_broker_refuses_its_security_protocol(
    broker: EmbeddedBroker, migrated: str, bare_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **bare_env,
        "BROKER_URL": broker.url,  # plain text only
        "BROKER_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "BROKER_SASL_USERNAME": "qicore",
        "BROKER_SASL_PASSWORD": DB_PASSWORD,
        "DATABASE_URL": migrated,
        "DATA_DIR": str(tmp_path),
    }
    result = await asyncio.to_thread(run, ["worker", "-l", "info"], env)
    assert result.returncode == 1
    assert one_line(result).startswith(
        f"qicore: the broker at BROKER_URL={broker.url} refused the client "
        "(BROKER_SECURITY_PROTOCOL=SASL_PLAINTEXT): "
    )
    assert DB_PASSWORD not in result.stdout + result.stderr


@pytest.mark.slow
async def test_worker_refuses_the_offline_coingecko_outside_up(
    broker: EmbeddedBroker, migrated: str, bare_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **bare_env,
        "BROKER_URL": broker.url,
        "DATABASE_URL": migrated,
        "DATA_DIR": str(tmp_path),
        "COINGECKO_BASE_URL": "offline",
    }
    result = await asyncio.to_thread(run, ["worker", "-l", "info"], env)
    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith("qicore: invalid setting COINGECKO_BASE_URL: 'offline' works only")


@pytest.mark.parametrize(
    "url", ["ftp://example.com/api/v3", "api.coingecko.com/api/v3", "file:///etc/hosts"]
)
def test_a_coingecko_base_url_that_is_not_http_is_an_invalid_setting(
    environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    environ.setenv("COINGECKO_BASE_URL", url)
    with pytest.raises(SystemExit) as stopped:
        load_settings()
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "qicore: invalid setting COINGECKO_BASE_URL: must be an http(s) URL "
        "(or 'offline' under `faust -A app up`)"
    ]


@pytest.mark.slow
async def test_worker_starts_on_a_database_that_is_down_and_logs_no_traceback(
    kafka: Kafka, workers: Callable[..., Worker]
) -> None:
    """A database that refuses connections may come back: the worker starts, says so in one
    line, and its sinks retry (one line each) instead of failing with tracebacks."""
    dsn = closed_port_dsn()
    worker = workers(dsn)
    await kafka.send_records(prices("down", 3, coins=3))
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while "[ERROR] sink crypto-prices: " not in worker.output:  # its retry, in one line
        worker.assert_alive()
        assert asyncio.get_running_loop().time() < deadline, worker.excerpt()
        await asyncio.sleep(0.25)
    shown = dsn.replace(f":{DB_PASSWORD}@", ":***@")
    assert (
        f"qicore: database unavailable at start, DATABASE_URL={shown}: connection refused"
        in worker.output
    )
    assert "Traceback" not in worker.output
    assert DB_PASSWORD not in worker.output


@pytest.mark.slow
async def test_up_stops_in_one_line_on_a_database_that_refuses(
    bare_env: dict[str, str], tmp_path: Path
) -> None:
    dsn = closed_port_dsn()
    env = {**bare_env, "DATABASE_URL": dsn, "DATA_DIR": str(tmp_path / "data")}
    result = await asyncio.to_thread(run, ["up"], env)
    assert result.returncode == 1
    assert one_line(result).startswith("qicore: cannot migrate, DATABASE_URL=postgresql://")
    assert "(embedded)" in result.stdout  # its broker was started, and stopped again
    assert "stopped" not in result.stdout


@pytest.mark.slow
async def test_up_stops_in_one_line_on_a_broker_it_cannot_reach(
    database_dsn: str, bare_env: dict[str, str], tmp_path: Path
) -> None:
    url = f"kafka://127.0.0.1:{free_port()}"
    env = {**bare_env, "BROKER_URL": url, "DATABASE_URL": database_dsn}
    result = await asyncio.to_thread(run, ["up"], {**env, "DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 1
    assert one_line(result).startswith(f"qicore: cannot reach the broker at BROKER_URL={url}: ")
    assert "worker    pid" not in result.stdout


async def _tables(dsn: str) -> dict[str, str]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT relname::text, relkind::text FROM pg_class"
            " WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p')"
        )
    finally:
        await connection.close()
    return {row["relname"]: row["relkind"] for row in rows}


@pytest.mark.slow
async def test_timescaledb_on_without_timescaledb_stops_in_one_line_and_creates_nothing(
    database_dsn: str, bare_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**bare_env, "DATABASE_URL": database_dsn, "TIMESCALEDB": "on", "DATA_DIR": str(tmp_path)}
    result = await asyncio.to_thread(run, ["migrate"], env)
    assert result.returncode == 1
    assert one_line(result) == (
        "qicore: TIMESCALEDB=on but the database server has no timescaledb extension: install "
        "TimescaleDB there, or set TIMESCALEDB=auto to fall back to plain PostgreSQL"
    )
    assert await _tables(database_dsn) == {}


async def test_timescaledb_off_migrates_plain_postgresql_and_says_so(database_dsn: str) -> None:
    report = await migrate_database(database_dsn, timescaledb="off")
    assert report[0].endswith("candles as plain views (TIMESCALEDB=off)")
    tables = await _tables(database_dsn)
    assert {tables[record.table.name] for record in RECORDS} == {"p"}


async def _event_trigger(dsn: str, body: str) -> None:
    """Run `body` at the start of every DDL statement in this database (the first is migrate's
    CREATE TABLE): a real server failing mid-migration the way the test needs."""
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(
            "CREATE FUNCTION fail_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$\n"
            f"BEGIN\n{body};\nEND\n$$"
        )
        await connection.execute(
            "CREATE EVENT TRIGGER fail_ddl ON ddl_command_start EXECUTE FUNCTION fail_ddl()"
        )
    finally:
        await connection.close()


@pytest.mark.slow
async def test_a_session_the_server_ends_mid_migration_is_reported_with_its_reason(
    database_dsn: str, bare_env: dict[str, str], tmp_path: Path
) -> None:
    """A FATAL error ends the session (TimescaleDB's "must be preloaded" is one): the command
    says why, not that a transaction could not be closed on a closed connection."""
    await _event_trigger(database_dsn, "PERFORM pg_terminate_backend(pg_backend_pid())")
    env = {**bare_env, "DATABASE_URL": database_dsn, "DATA_DIR": str(tmp_path)}
    result = await asyncio.to_thread(run, ["migrate"], env)
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith(f"qicore: cannot migrate, DATABASE_URL={database_dsn}: "), line
    assert "terminating connection due to administrator command" in line


@pytest.mark.slow
async def test_timescaledb_installed_but_not_preloaded_is_one_line_saying_what_to_do(
    database_dsn: str, bare_env: dict[str, str], tmp_path: Path
) -> None:
    # The error TimescaleDB's loader raises (SQLSTATE XX000), raised by the real server.
    await _event_trigger(
        database_dsn,
        "RAISE EXCEPTION USING ERRCODE = 'XX000', "
        "MESSAGE = 'extension \"timescaledb\" must be preloaded'",
    )
    with pytest.raises(TimescaleUnavailable, match=r"^TimescaleDB is installed"):
        await migrate_database(database_dsn)
    env = {**bare_env, "DATABASE_URL": database_dsn, "DATA_DIR": str(tmp_path)}
    result = await asyncio.to_thread(run, ["migrate"], env)
    assert result.returncode == 1
    assert one_line(result) == f"qicore: {NOT_PRELOADED}"
    assert "shared_preload_libraries" in NOT_PRELOADED and "TIMESCALEDB=off" in NOT_PRELOADED
