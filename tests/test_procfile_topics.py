"""`Procfile.topics`, the example of process types scaled apart: read as honcho and Heroku read
it, each worker line's settings are valid and together they run everything exactly once."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from app.settings import RECORD_TOPICS, Settings

PROCFILE = Path(__file__).resolve().parent.parent / "Procfile.topics"


def worker_settings(environ: pytest.MonkeyPatch) -> dict[str, Settings]:
    """Each worker process type's settings: its line's `NAME=value` words before `exec`."""
    found = {}
    for line in PROCFILE.read_text().splitlines():
        name, command = line.split(":", 1)
        words = shlex.split(command)
        if "worker" not in words:
            continue
        assignments = dict(w.split("=", 1) for w in words[: words.index("exec")])
        with environ.context() as scoped:
            for variable, value in assignments.items():
                if variable != "PATH":
                    scoped.setenv(variable, value)
            found[name] = Settings()
    return found


def test_the_process_types_sink_each_topic_once_poll_once_and_serve_the_web_once(
    environ: pytest.MonkeyPatch,
) -> None:
    types = worker_settings(environ)
    assert set(types) == {"web", "poller", "prices", "analytics"}
    sunk = [topic for settings in types.values() for topic in settings.sink_topics]
    assert sorted(sunk) == sorted(RECORD_TOPICS)  # every record topic, by one process type
    assert [name for name, s in types.items() if s.poller_enabled] == ["poller"]
    assert [name for name, s in types.items() if s.web_enabled] == ["web"]
    groups = [settings.consumer_group for settings in types.values()]
    assert len(set(groups)) == len(groups)  # each scales in a consumer group of its own
    assert types["web"].mcp_http_enabled  # the views and /mcp
