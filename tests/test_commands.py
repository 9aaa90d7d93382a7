"""`faust -A app tables | agents | records` describe the app's own tables, agents and records."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app.main import app
from models import RECORDS

pytestmark = pytest.mark.slow  # each test runs a `faust` command


def run(bare_env: dict[str, str], command: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "faust", "-A", "app", command],
        env=bare_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def rows(output: str) -> dict[str, list[str]]:
    """A tabulated listing's rows by first cell (without Faust's `@` agent prefix)."""
    cells = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in output.splitlines()
        if line.startswith("|")
    ]
    return {row[0].lstrip("@"): row[1:] for row in cells}


def test_tables_have_their_help(bare_env: dict[str, str]) -> None:
    listed = rows(run(bare_env, "tables"))
    assert len(app.tables) == 3
    for name, table in app.tables.items():
        assert table.help and "Missing description" not in table.help
        assert listed[name] == [table.help]


def test_agents_have_their_help(bare_env: dict[str, str]) -> None:
    listed = rows(run(bare_env, "agents"))
    for record in RECORDS:
        topic, help_text = listed[f"sink_{record.table.name}"]
        assert topic == record.topic.name
        assert record.__name__ in help_text and record.table.name in help_text
        assert record.topic.dead_letter_name in help_text


def test_records_lists_each_record_with_its_topic_and_table(bare_env: dict[str, str]) -> None:
    listed = rows(run(bare_env, "records"))
    assert set(listed) == {"record", *(record.__name__ for record in RECORDS)}
    for record in RECORDS:
        topic, table, help_text = listed[record.__name__]
        assert topic.startswith(f"{record.topic.name} (key {record.topic.key_field}, ")
        assert record.topic.dead_letter_name in topic
        assert table.startswith(f"{record.table.name} (time {record.table.time_column}, ")
        assert help_text == (record.__doc__ or "").strip()
