"""The worker's web server answers every error as JSON, and refuses oversized requests quietly.

Faust's views answer their own errors as `{"error": "..."}`; the aiohttp server under them
answered the rest (an unknown path, a wrong method, a view that crashed) in plain text, and an
over-long request line or header with a 400 and an ERROR traceback in the log, so any client could
flood the log with one long URL. `web_application_options()` gives Faust's aiohttp application:

- a middleware that answers every HTTP error as `{"error": "..."}` (keeping headers such as a
  405's `Allow`), and a request target over `MAX_URL_BYTES` with 414 or a header line over
  `MAX_HEADER_BYTES` with 431;
- parser limits (`PARSER_LIMIT_BYTES`) above those, so requests up to them get the JSON answer;
  beyond them aiohttp's parser itself answers 400 in plain text, and its log line is one WARNING
  without a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http import HttpProcessingError
from aiohttp.log import server_logger

log = logging.getLogger(__name__)

MAX_URL_BYTES = 8 * 1024
MAX_HEADER_BYTES = 8 * 1024  # one header line: name and value
PARSER_LIMIT_BYTES = 64 * 1024  # aiohttp's own limit per line; its default is 8190
BODY_HEADERS = frozenset({"content-type", "content-length"})  # the JSON body sets its own
COMPACT = functools.partial(json.dumps, separators=(",", ":"))  # as Faust's views write JSON
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, reason: str, headers: Any = None) -> web.Response:
    """The same shape as Faust's `View.error`."""
    return web.json_response({"error": reason}, status=status, headers=headers, dumps=COMPACT)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    if len(request.raw_path) > MAX_URL_BYTES:
        return json_error(414, f"request URL longer than {MAX_URL_BYTES} bytes")
    if any(len(name) + len(value) > MAX_HEADER_BYTES for name, value in request.raw_headers):
        return json_error(431, f"a request header is longer than {MAX_HEADER_BYTES} bytes")
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:  # a redirect is not an error
            raise
        kept = {k: v for k, v in error.headers.items() if k.lower() not in BODY_HEADERS}
        return json_error(error.status, _reason(request, error), kept)
    except Exception:  # a bug in a view: logged once, answered like every other error
        log.exception("web: %s %s failed", request.method, request.path[:200])
        return json_error(500, "internal server error")


def _reason(request: web.Request, error: web.HTTPException) -> str:
    if isinstance(error, web.HTTPNotFound):
        return f"no such path: {request.path[:200]}"
    if isinstance(error, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(error.allowed_methods))
        return f"method {request.method[:20]} not allowed here (allowed: {allowed})"
    return error.reason


class ParseErrorLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger, but a request it could not parse (too long, malformed) is one
    WARNING line: a client's mistake, not the server's, and never a traceback."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            what = str(msg) % args if args else str(msg)
            reason = " ".join(str(exc_info.message).split())[:200]
            self.warning("web: %s: HTTP %s, %s", what, exc_info.code, reason)
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


def web_application_options() -> dict[str, Any]:
    """Faust's `web_application_options`: keyword arguments of aiohttp's `Application`."""
    return {
        "middlewares": [json_errors],
        "handler_args": {
            "max_line_size": PARSER_LIMIT_BYTES,
            "max_field_size": PARSER_LIMIT_BYTES,
            "logger": ParseErrorLog(server_logger, {}),
        },
    }
