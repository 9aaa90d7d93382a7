"""LOG_FORMAT=json: one JSON object per log line, for log shippers (Heroku drains, Loki, ...).

Each line holds `timestamp` (RFC 3339, UTC, milliseconds), `level`, `logger`, `message` (the
formatted message), `process` (the pid), the record's own fields (`extra=` of a logging call),
and `exception` / `stack` as text when present. Newlines inside a message stay inside its JSON
string, so a traceback is one line too.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON; values JSON cannot hold are shown as `str()` of them."""

    def format(self, record: logging.LogRecord) -> str:
        shown: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_") and name not in shown:
                shown[name] = value
        if record.exc_info:
            shown["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            shown["stack"] = self.formatStack(record.stack_info)
        return json.dumps(shown, default=str, ensure_ascii=False)


def logging_config(log_format: str) -> dict[str, Any] | None:
    """Faust's `logging_config` for LOG_FORMAT: merged into the logging Faust (mode) sets up for
    the worker and every `faust -A app` command, replacing only its formatters, so the level,
    stream and handlers stay Faust's. None for "text": Faust's own readable lines."""
    if log_format != "json":
        return None
    formatter = {"()": f"{__name__}.JsonFormatter"}
    # mode's handlers use "colored" (a terminal or pipe) and "default" (a log file).
    return {"merge": True, "formatters": {"colored": formatter, "default": formatter}}
