"""`faust -A app up`: the whole pipeline on one machine, from a fresh clone, with one command.

Every service whose variable is unset gets an embedded stand-in (see `EMBEDDED_SERVICES`); then
the schema is migrated and the worker is started exactly as a user starts it
(`faust -A app worker`), as a child process with the environment pointing at the stand-ins.
This process only supervises: SIGINT/SIGTERM/SIGHUP stop the worker first (it commits and leaves
its group while the broker and database are still up), then the stand-ins, in reverse order.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

from app.settings import OFFLINE, Settings
from common.redaction import redact_url
from local.embedded import EmbeddedBroker, embedded_postgres

# Heroku's SIGTERM -> SIGKILL window: a worker that takes longer is killed.
WORKER_STOP_SECONDS = 30.0
# Under DATA_DIR: the environment `up --no-worker` writes for workers started elsewhere.
STAND_INS_ENV = "stand-ins.env"


def is_set(variable: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Settings read the environment case-insensitively, so `broker_url` counts as set too."""
    return any(name.upper() == variable for name in environ)


def _broker(settings: Settings, services: ExitStack) -> dict[str, str]:
    if is_set("BROKER_URL"):
        return {}
    log_path = Path(settings.data_dir) / "broker.log"
    broker = services.enter_context(EmbeddedBroker(log_path=log_path))
    timeouts = {
        name: value for name, value in EmbeddedBroker.GROUP_TIMEOUTS.items() if not is_set(name)
    }
    return {"BROKER_URL": broker.url, **timeouts}


def _postgres(settings: Settings, services: ExitStack) -> dict[str, str]:
    if is_set("DATABASE_URL"):
        return {}
    dsn = services.enter_context(embedded_postgres(Path(settings.data_dir) / "postgres"))
    return {"DATABASE_URL": dsn}


def _coingecko(settings: Settings, services: ExitStack) -> dict[str, str]:
    """COINGECKO_BASE_URL=offline: the bundled CoinGecko-shaped server, a new snapshot per poll."""
    if settings.coingecko_base_url != OFFLINE:
        return {}
    from coingecko.fake_server import fake_coingecko_in_thread

    tick = max(1, round(settings.price_poll_seconds))
    return {"COINGECKO_BASE_URL": services.enter_context(fake_coingecko_in_thread(tick=tick))}


# Each entry starts one stand-in (if its variable is unset) and returns the environment the worker
# needs to use it; `services` stops it. Add a new embedded service here and nowhere else.
EMBEDDED_SERVICES: tuple[Callable[[Settings, ExitStack], dict[str, str]], ...] = (
    _broker,
    _postgres,
    _coingecko,
)


class _StopRequests:
    """Counts stop signals instead of raising, so no start-up step is cut in half."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.count = 0
        self.signum = 0
        for signum in self.SIGNALS:
            signal.signal(signum, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def worker_command(settings: Settings) -> list[str]:
    return [sys.executable, "-m", "faust", "-A", "app", "worker", "-l", settings.log_level]


def _say(line: str) -> None:
    print(f"qicore: {line}", flush=True)


def _banner(
    settings: Settings,
    broker_url: str,
    dsn: str,
    embedded: Mapping[str, str],
    *,
    worker: bool = True,
) -> None:
    def origin(variable: str) -> str:
        return " (embedded)" if variable in embedded else ""

    _say(f"broker    {broker_url}{origin('BROKER_URL')}")
    _say(f"database  {redact_url(dsn)}{origin('DATABASE_URL')}")
    if not settings.web_enabled:
        _say("web       disabled (WEB_ENABLED=false)")
    elif not worker:
        _say("web       none here (--no-worker)")
    else:
        host = "127.0.0.1" if settings.web_bind == "0.0.0.0" else settings.web_bind
        _say(f"web       http://{host}:{settings.web_listen_port}/")
    coingecko = embedded.get("COINGECKO_BASE_URL", settings.coingecko_url)
    if settings.coingecko_source == "mcp":  # offline: the worker starts the fake MCP server
        from coingecko.mcp import describe_server

        coingecko = f"MCP {describe_server(settings)}"
    _say(f"coingecko {coingecko}{origin('COINGECKO_BASE_URL')} ({settings.plan} plan)")
    _say(f"data      {Path(settings.data_dir).resolve()}")


def _stop_worker(worker: subprocess.Popen[bytes], stops: _StopRequests) -> int:
    """SIGTERM, then wait up to WORKER_STOP_SECONDS (or until another stop signal), then kill."""
    worker.terminate()
    seen = stops.count
    deadline = time.monotonic() + WORKER_STOP_SECONDS
    while worker.poll() is None and time.monotonic() < deadline and stops.count == seen:
        time.sleep(0.1)
    if worker.poll() is None:
        _say("worker did not stop in time: killing it")
        worker.kill()
    return worker.wait()


def _supervise(worker: subprocess.Popen[bytes], stops: _StopRequests) -> int:
    """Run until a stop signal (exit with the worker's status) or the worker's death (non-zero)."""
    try:
        while worker.poll() is None and not stops.count:
            time.sleep(0.1)
        if stops.count:
            _say("stopping the worker")
            return _stop_worker(worker, stops)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    status = worker.returncode
    _say(f"the worker exited on its own with status {status}: stopping")
    return (128 - status if status < 0 else status) or 1


def _serve_stand_ins(path: Path, embedded: Mapping[str, str], stops: _StopRequests) -> int:
    """`--no-worker`: keep the stand-ins up for workers started elsewhere (the Procfile under
    honcho) until a stop signal; their environment goes to `path`, in honcho's .env format."""
    lines = [f"{name}={shlex.quote(value)}" for name, value in embedded.items()]
    # honcho's PORT makes `web` listen beyond loopback, where /mcp needs a token: one of its own
    # for this run, kept in the file (a secret: not printed).
    token = [] if is_set("MCP_TOKEN") else [f"MCP_TOKEN={secrets.token_urlsafe(24)}"]
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)  # the token's file: its owner's alone
    path.write_text("".join(f"{line}\n" for line in lines + token))
    _say(f"no worker (--no-worker): the stand-ins' environment, also in {path}:")
    for line in lines:
        print(f"export {line}", flush=True)
    if token:
        _say(f"MCP_TOKEN for /mcp: generated for this run, in {path} only")
    _say(f"run the Procfile on them: .venv/bin/honcho start -e {path} web worker")
    _say("Ctrl-C stops the stand-ins")
    try:
        while not stops.count:
            time.sleep(0.1)
    finally:
        path.unlink(missing_ok=True)
    _say("stopping the embedded services")
    return 0


def up(settings: Settings, *, run_worker: bool = True) -> int:
    """Start the stand-ins, migrate, run the worker (or serve the stand-ins alone); return the
    exit status."""
    from app.checks import CannotStart, broker_problem, migrate, say
    from app.main import broker_credentials

    stops = _StopRequests()
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    with ExitStack() as services:
        embedded: dict[str, str] = {}
        for start in EMBEDDED_SERVICES:
            embedded.update(start(settings, services))
            if stops.count:
                return stops.exit_status
        dsn = embedded.get("DATABASE_URL", settings.database_dsn)
        broker_url = embedded.get("BROKER_URL", settings.broker_url)
        _banner(settings, broker_url, dsn, embedded, worker=run_worker)
        try:
            for line in asyncio.run(migrate(dsn, timescaledb=settings.timescaledb)):
                _say(line)
        except CannotStart as failed:
            say(str(failed))
            return 1
        if "BROKER_URL" not in embedded:
            unreachable = asyncio.run(broker_problem(settings, broker_credentials(settings)))
            if unreachable is not None:
                say(unreachable)
                return 1
        if stops.count:
            return stops.exit_status
        if not run_worker:
            return _serve_stand_ins(Path(settings.data_dir) / STAND_INS_ENV, embedded, stops)
        # Its own process group: a terminal's Ctrl-C reaches only this supervisor, which decides
        # the order of shutdown.
        worker = subprocess.Popen(
            worker_command(settings), env={**os.environ, **embedded}, process_group=0
        )
        _say(f"worker    pid {worker.pid}; Ctrl-C stops everything")
        status = _supervise(worker, stops)
        _say("stopping the embedded services")
    _say(f"stopped (status {status})")
    return status
