"""LOG_FORMAT: the logging Faust (mode) sets up for the worker and the `faust -A app` commands,
given the app's `logging_config`, writes one JSON object per line, or Faust's text lines."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from decimal import Decimal

import pytest
from mode.utils.logging import setup_logging

from common.logs import logging_config


@pytest.fixture
def logged(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """Root logging restored after the test (setup_logging replaces the root's handlers)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield capsys
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def log_lines(captured: pytest.CaptureFixture[str], log_format: str) -> list[str]:
    """What Faust's logging set-up, given LOG_FORMAT's config, writes (to stderr, as the
    worker does) for a few records."""
    setup_logging(loglevel="info", logging_config=logging_config(log_format))
    log = logging.getLogger("qicore.test")
    log.info("stored %d rows of %s", 3, "crypto-prices", extra={"rows": 3, "usd": Decimal("1E-8")})
    log.debug("not at info level")
    try:
        raise ValueError("line one\nline two")
    except ValueError:
        log.exception("batch failed")
    return captured.readouterr().err.splitlines()


def test_json_is_one_object_per_line_with_the_record_fields(
    logged: pytest.CaptureFixture[str],
) -> None:
    first, second = map(json.loads, log_lines(logged, "json"))  # exactly two lines
    assert first["timestamp"].endswith("+00:00")
    assert (first["level"], first["logger"]) == ("INFO", "qicore.test")
    assert first["message"] == "stored 3 rows of crypto-prices"
    assert (first["rows"], first["usd"]) == (3, "1E-8")  # extra fields; str() of the rest
    assert second["level"] == "ERROR"
    assert second["exception"].startswith("Traceback")  # the traceback in the same line
    assert "line one\nline two" in second["exception"]


def test_text_stays_faust_s_readable_lines(logged: pytest.CaptureFixture[str]) -> None:
    assert logging_config("text") is None
    lines = log_lines(logged, "text")
    assert "stored 3 rows of crypto-prices" in lines[0]
    assert "[INFO]" in lines[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])
