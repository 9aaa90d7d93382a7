"""The worker and `faust -A app up`, started as processes exactly the way users start them."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Collection
from functools import partial
from pathlib import Path
from typing import TypeVar

import asyncpg
import httpx
import psutil
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from generators.topics import topic_configs
from local.embedded import EmbeddedBroker, free_port
from models import RECORDS, CryptoPriceData
from models.codec import decode_record
from testkit.databases import assert_exactly, primary_key, stored
from testkit.workers import STOP_TIMEOUT, Kafka, Process, eventually, faust_command

pytestmark = pytest.mark.slow

API_KEY = "sekrit-123"
DB_PASSWORD = "pg-sekrit-456"
START_TIMEOUT = 90.0  # generous: the suite shares two cores
# Refuses connections: the tests never reach the internet.
NO_COINGECKO = "http://127.0.0.1:9/api/v3"
T = TypeVar("T")


def worker_ready(output: str) -> bool:
    return "[^Worker]: Ready" in output


async def test_worker_declares_generated_topics_and_stops_cleanly(
    broker: EmbeddedBroker,
    database_dsn: str,
    bare_env: dict[str, str],
    tmp_path: Path,
    processes: list[Process],
) -> None:
    env = {
        **bare_env,
        "APP_ID": f"qicore-test-{uuid.uuid4().hex[:8]}",  # its own consumer group
        "BROKER_URL": broker.url,
        # Trust authentication accepts any password: this one exists only to be hidden.
        "DATABASE_URL": database_dsn.replace("postgres:@", f"postgres:{DB_PASSWORD}@"),
        "COINGECKO_API_KEY": API_KEY,
        "COINGECKO_BASE_URL": NO_COINGECKO,
        "WEB_ENABLED": "false",  # as the Procfile's `worker` process type runs it
        **EmbeddedBroker.GROUP_TIMEOUTS,
        "DATA_DIR": str(tmp_path / "data"),
        "LOG_FORMAT": "json",
    }
    worker = Process(faust_command("worker", "-l", "info"), env, tmp_path / "worker.log")
    processes.append(worker)
    await worker.wait_until(worker_ready, "worker start", START_TIMEOUT)

    expected = {config.name: config for config in topic_configs()}
    admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{broker.port}")
    await admin.start()
    try:
        # Declaring is a startup task: it may finish just after "Ready". Until every topic is
        # listed, naming one (describe_topics) would auto-create it with the broker's count.
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT
        while not set(expected) <= set(listed := await admin.list_topics()):
            assert asyncio.get_running_loop().time() < deadline, listed
            await asyncio.sleep(0.2)
        described = await admin.describe_topics(list(expected))
        assert all(topic["error_code"] == 0 for topic in described), described
        partitions = {topic["topic"]: len(topic["partitions"]) for topic in described}
        resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in expected]
        responses = await admin.describe_configs(resources)
    finally:
        await admin.close()

    listening = [
        connection
        for connection in psutil.Process(worker.popen.pid).net_connections("inet")
        if connection.status == psutil.CONN_LISTEN
    ]
    assert listening == []  # WEB_ENABLED=false: no web server
    assert partitions == {name: config.partitions for name, config in expected.items()}
    reported = {
        name: {entry[0]: entry[1] for entry in entries}
        for response in responses
        for _error, _message, _type, name, entries in response.resources
    }
    for name, config in expected.items():
        for key, value in config.config.items():
            assert reported[name][key] == value, (name, key)

    assert await worker.stop(signal.SIGTERM) == 0, worker.output
    assert API_KEY not in worker.output
    assert DB_PASSWORD not in worker.output
    # LOG_FORMAT=json: every log line is a JSON object (Faust's banner, on stdout, is not a log).
    lines = worker.output.splitlines()
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    assert {"timestamp", "level", "logger", "message"} <= set(logged[0])
    assert any(entry["message"] == "[^Worker]: Ready" for entry in logged)
    assert not [line for line in lines if "] [INFO] " in line or "] [WARNING] " in line]


def _banner(output: str, name: str) -> list[str]:
    """The words of `up`'s banner line `qicore: <name> ...`."""
    return next(line for line in output.splitlines() if line.startswith(f"qicore: {name} ")).split()


def _leftovers(output: str, data_dir: Path, pids: Collection[int] = ()) -> list[str]:
    """Processes of an `up` run still alive: by pid, or by a command line naming its broker's
    listener or its data directory (the embedded PostgreSQL is not a child: pg_ctl detaches it)."""
    marks = (str(data_dir), _banner(output, "broker")[2].replace("kafka://", "tcp://"))
    alive = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        command = " ".join(process.info["cmdline"] or ())
        if process.info["status"] != psutil.STATUS_ZOMBIE and (
            process.info["pid"] in pids or any(mark in command for mark in marks)
        ):
            alive.append(command)
    return alive


def _up_env(bare_env: dict[str, str], data_dir: Path, web_port: int) -> dict[str, str]:
    """No BROKER_URL and no DATABASE_URL: `up` must bring its own."""
    return {
        **bare_env,
        "APP_ID": f"qicore-test-{uuid.uuid4().hex[:8]}",
        "COINGECKO_API_KEY": API_KEY,
        "COINGECKO_BASE_URL": NO_COINGECKO,
        "WEB_PORT": str(web_port),
        "DATA_DIR": str(data_dir),
    }


async def test_up_runs_everything_on_embedded_services_and_stops_them(
    bare_env: dict[str, str], tmp_path: Path, processes: list[Process]
) -> None:
    data_dir = tmp_path / "data"
    web_port = free_port()
    up = Process(faust_command("up"), _up_env(bare_env, data_dir, web_port), tmp_path / "up.log")
    processes.append(up)
    await up.wait_until(worker_ready, "worker start", START_TIMEOUT)
    socket.create_connection(("127.0.0.1", web_port), timeout=5).close()  # the web server

    assert _banner(up.output, "broker")[-1] == "(embedded)"
    assert _banner(up.output, "database")[-1] == "(embedded)"
    connection = await asyncpg.connect(_banner(up.output, "database")[2])
    try:
        for record in RECORDS:
            assert await connection.fetchval("SELECT to_regclass($1)", record.table.name)
        await connection.execute("CREATE TABLE survives_restart ()")
    finally:
        await connection.close()
    assert (data_dir / "broker.log").exists()
    children = {child.pid for child in psutil.Process(up.popen.pid).children(recursive=True)}
    assert len(children) >= 2  # the broker and the worker
    assert len(_leftovers(up.output, data_dir)) >= 2  # the broker and PostgreSQL

    assert await up.stop(signal.SIGINT) == 0, up.output
    assert "stopped (status 0)" in up.output
    assert _leftovers(up.output, data_dir, children) == []
    assert API_KEY not in up.output

    # The database is kept in DATA_DIR: a second run finds what the first one left...
    crashing = Process(
        faust_command("up"), _up_env(bare_env, data_dir, free_port()), tmp_path / "again.log"
    )
    processes.append(crashing)
    await crashing.wait_until(worker_ready, "worker restart", START_TIMEOUT)
    connection = await asyncpg.connect(_banner(crashing.output, "database")[2])
    try:
        assert await connection.fetchval("SELECT to_regclass('survives_restart')")
    finally:
        await connection.close()

    # ...even after a crash that cleaned nothing up (PostgreSQL is left running)...
    orphans = psutil.Process(crashing.popen.pid).children(recursive=True)
    crashing.kill()
    for orphan in orphans:
        orphan.kill()
    psutil.wait_procs(orphans, timeout=10)
    assert _leftovers(crashing.output, data_dir) != []

    # ...and the next run still stops everything, the PostgreSQL it found running included.
    after_crash = Process(
        faust_command("up"), _up_env(bare_env, data_dir, free_port()), tmp_path / "after-crash.log"
    )
    processes.append(after_crash)
    await after_crash.wait_until(worker_ready, "worker start after a crash", START_TIMEOUT)
    assert await after_crash.stop(signal.SIGTERM) == 0, after_crash.output
    assert _leftovers(after_crash.output, data_dir) == []


async def test_up_run_again_on_the_same_data_dir_stores_the_new_runs_prices(
    bare_env: dict[str, str], tmp_path: Path, processes: list[Process]
) -> None:
    """The README's run, stopped and started again: the embedded broker starts empty, so its
    offsets start at 0 again, below those the kept database stored in the first run. Every
    price record each run's broker holds must be in the table, with exact values."""
    env = {
        **_up_env(bare_env, tmp_path / "data", free_port()),
        "COINGECKO_BASE_URL": "offline",
        "PRICE_POLL_SECONDS": "5",
    }
    produced: dict[str, list[CryptoPriceData]] = {}
    for run in ("first", "second"):
        web_port = free_port()
        up = Process(
            faust_command("up"), {**env, "WEB_PORT": str(web_port)}, tmp_path / f"{run}.log"
        )
        processes.append(up)
        await up.wait_until(worker_ready, f"{run} run's worker start", START_TIMEOUT)
        dsn = _banner(up.output, "database")[2]
        broker = Kafka(_banner(up.output, "broker")[2].removeprefix("kafka://"), "reader")
        records = await eventually(
            partial(_all_prices_stored, broker, dsn), up, f"{run} run's rows", START_TIMEOUT
        )
        # A poll that met an unchanged snapshot sent the same record again: one row.
        produced[run] = list({primary_key(record): record for record in records}.values())
        rows = await stored(dsn, CryptoPriceData)
        for earlier in produced.values():  # the first run's rows are kept as they were
            assert_exactly({primary_key(r): rows[primary_key(r)] for r in earlier}, earlier)
        async with httpx.AsyncClient() as client:
            health = (await client.get(f"http://127.0.0.1:{web_port}/health")).json()
        resets = health["sink"][CryptoPriceData.topic.name]["log_resets"]
        assert await up.stop(signal.SIGINT) == 0, up.output
        if run == "first":
            assert resets == 0
        else:
            assert resets > 0
            assert "not the log its stored offsets came from (the broker's cluster id" in up.output
    first, second = ({primary_key(r) for r in produced[run]} for run in ("first", "second"))
    assert not first & second


async def _all_prices_stored(broker: Kafka, dsn: str) -> list[CryptoPriceData] | None:
    """The broker's price records so far, once every one of them is in the table."""
    messages = await broker.read_all(CryptoPriceData.topic.name)
    records = [decode_record(CryptoPriceData, value) for *_, value, _ in messages]
    rows = await stored(dsn, CryptoPriceData)
    return records if records and all(primary_key(r) in rows for r in records) else None


async def test_up_stops_everything_when_the_worker_dies(
    database_dsn: str, bare_env: dict[str, str], tmp_path: Path, processes: list[Process]
) -> None:
    """With DATABASE_URL set, `up` uses that database and starts only the broker."""
    data_dir = tmp_path / "data"
    with socket.socket() as taken:  # the worker cannot bind its web port, so it exits
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = _up_env(bare_env, data_dir, taken.getsockname()[1])
        env["DATABASE_URL"] = database_dsn.replace("postgres:@", f"postgres:{DB_PASSWORD}@")
        up = Process(faust_command("up"), env, tmp_path / "up.log")
        processes.append(up)
        status = await asyncio.to_thread(up.popen.wait, START_TIMEOUT + STOP_TIMEOUT)

    assert status != 0, up.output
    assert "the worker exited on its own" in up.output
    assert _banner(up.output, "broker")[-1] == "(embedded)"
    assert _banner(up.output, "database")[2] == database_dsn.replace("postgres:@", "postgres:***@")
    assert DB_PASSWORD not in up.output
    assert not (data_dir / "postgres").exists()
    assert _leftovers(up.output, data_dir) == []


@pytest.mark.parametrize(
    ("procfile", "types"),
    [
        ("Procfile", "release, web, worker"),
        ("Procfile.topics", "release, web, poller, prices, analytics"),
    ],
)
def test_procfile_is_valid(procfile: str, types: str) -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "honcho"), "-f", procfile, "check"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert f"({types})" in result.stderr
