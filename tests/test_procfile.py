"""The README's Procfile run, as written: `.venv/bin/honcho start web worker` from a shell whose
PATH does not hold the virtualenv, against the stand-ins of `faust -A app up --no-worker`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from local.embedded import free_port
from local.up import STAND_INS_ENV

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TIMEOUT = 120.0  # generous: three processes start on a shared machine
STOP_TIMEOUT = 45.0


def _without_venv(path: str) -> str:
    """PATH as a shell that never activated the virtualenv has it."""
    return os.pathsep.join(p for p in path.split(os.pathsep) if p and Path(p) != VENV_BIN)


async def _until(
    condition: Callable[[], bool], process: subprocess.Popen[bytes], log: Path, what: str
) -> None:
    """Wait for `condition`; fail with the process's log if it exits first or it takes too long."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not condition():
        assert process.poll() is None, f"exited before {what}:\n{log.read_text()}"
        assert asyncio.get_running_loop().time() < deadline, f"no {what}:\n{log.read_text()}"
        await asyncio.sleep(0.25)


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        return process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


async def test_honcho_runs_the_procfile_web_and_worker_on_the_stand_ins(
    bare_env: dict[str, str], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    env = {
        **bare_env,
        "PATH": _without_venv(bare_env.get("PATH", "")),
        "APP_ID": f"qicore-test-{uuid.uuid4().hex[:8]}",
        "DATA_DIR": str(data_dir),
        "COINGECKO_BASE_URL": "http://127.0.0.1:9/api/v3",  # refuses: no internet in tests
    }
    env.pop("VIRTUAL_ENV", None)
    stand_ins_log, honcho_log = tmp_path / "stand-ins.log", tmp_path / "honcho.log"
    env_file = data_dir / STAND_INS_ENV
    with stand_ins_log.open("wb") as out:
        stand_ins = subprocess.Popen(
            [str(VENV_BIN / "faust"), "-A", "app", "up", "--no-worker"],
            cwd=PROJECT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    honcho: subprocess.Popen[bytes] | None = None
    try:
        await _until(env_file.exists, stand_ins, stand_ins_log, "stand-ins")
        port = free_port()
        with honcho_log.open("wb") as out:
            honcho = subprocess.Popen(
                [
                    str(VENV_BIN / "honcho"),
                    "start",
                    "-e",
                    str(env_file),
                    "-p",
                    str(port),
                    "web",
                    "worker",
                ],
                cwd=PROJECT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        def ready() -> bool:
            lines = honcho_log.read_text(errors="replace").splitlines()
            return all(
                any(
                    line.split("|")[0].strip().endswith(name) and "[^Worker]: Ready" in line
                    for line in lines
                )
                for name in ("web.1", "worker.1")
            )

        await _until(ready, honcho, honcho_log, "both processes ready")
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.get(f"http://127.0.0.1:{port}/health")
        assert answer.status_code == 200, answer.text
        assert answer.json()["database"]["reachable"] is True

        lines = honcho_log.read_text(errors="replace").splitlines()
        banner_web = [line for line in lines if "| web " in line]
        assert [line.split("|")[0].split()[-1] for line in banner_web] == ["web.1"]
        assert f"http://localhost:{port}/" in banner_web[0]  # honcho's PORT
        listening = {
            (c.laddr.ip, c.laddr.port)
            for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert ("0.0.0.0", port) in listening  # what PORT means: Heroku routes to it
    finally:
        if honcho is not None:
            _stop(honcho)
        assert _stop(stand_ins) == 0, stand_ins_log.read_text()
    output = honcho_log.read_text(errors="replace")
    assert "not found" not in output
    assert "Traceback" not in output
    assert not env_file.exists()
