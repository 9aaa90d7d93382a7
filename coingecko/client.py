"""An httpx client for CoinGecko's API v3 that respects its limits and never crashes its caller.

- One keep-alive `httpx.AsyncClient` with explicit timeouts; the plan's header carries the key
  (`x-cg-demo-api-key` / `x-cg-pro-api-key`; keyless sends none). The key never goes into a URL,
  so it cannot appear in httpx's request log lines, and it is redacted from every message here.
- `RateLimiter`: at most `calls_per_minute` requests in any rolling minute, errors and retries
  included (CoinGecko counts them too). A 429 pauses every request for its `Retry-After`. A
  caller may also pass a `share` (`RateLimiter.share`): its requests then take at most that part
  of the plan's calls, so one caller's queue of requests cannot crowd out the others'.
- 5xx, 408, timeouts, connection errors and non-JSON bodies (outages have served HTML) are retried
  with jittered exponential backoff, then raise `CoinGeckoUnavailable`.
- Any other 4xx (404 unknown coin, 401/403 wrong key, 400 10010/10011 wrong host) will not heal:
  it is logged once with CoinGecko's error code and message, raises `CoinGeckoRefused`, and later
  requests to the same path raise it again at once, without a call, until restart.

The limits, retries and refusals above are the client's; how a request reaches CoinGecko is its
`Transport`'s: `HttpTransport` (REST, COINGECKO_SOURCE=rest) or `coingecko.mcp.McpTransport`
(CoinGecko's MCP server, COINGECKO_SOURCE=mcp), which hands back the same `Answer` (an HTTP status
and body) so both are judged by the same rules.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Protocol

from coingecko.parse import loads_exact
from common.backoff import jittered_backoff
from common.redaction import redact

if TYPE_CHECKING:  # importing app.* at run time would build the whole Faust app
    import httpx

    from app.settings import Settings

log = logging.getLogger(__name__)

KEY_HEADERS = {"demo": "x-cg-demo-api-key", "pro": "x-cg-pro-api-key"}
MAX_RETRY_AFTER = 900.0  # seconds; a larger Retry-After is a misconfiguration, not advice
USER_AGENT = "qicore-streams (+https://github.com/qicore)"


class CoinGeckoError(Exception):
    """Base of the errors `CoinGeckoClient.get` raises (nothing else escapes it)."""


class CoinGeckoUnavailable(CoinGeckoError):
    """Retries exhausted on errors that may heal (5xx, 429, timeouts, non-JSON bodies)."""


class CoinGeckoUnusable(CoinGeckoError):
    """The source cannot serve the poller at all (an MCP server without CoinGecko's tools)."""


class CoinGeckoRefused(CoinGeckoError):
    """A 4xx that will not heal by retrying; `path` stays refused until restart."""

    def __init__(self, path: str, status: int, error_code: object, message: str) -> None:
        super().__init__(f"{path}: HTTP {status}, error_code {error_code}: {message}")
        self.path = path
        self.status = status
        self.error_code = error_code
        self.message = message


class TransportFailed(Exception):
    """No answer came back (timeout, connection lost); the message says why, without the key."""


@dataclass(frozen=True)
class Answer:
    """What a transport got back for one request: an HTTP status and the body it came with."""

    status: int
    content: bytes
    content_type: str = "application/json"
    retry_after: float | None = None  # seconds, when the server said

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


@dataclass
class CallTally:
    """What one caller's requests came to (a poller endpoint's, for /health and /metrics):
    answers by outcome (`OUTCOMES`; a path refused earlier is raised without a call and not
    counted), and the waits for a slot of the rate limit (the plan's calls per minute, or a 429's
    Retry-After pause)."""

    calls: dict[str, int] = field(default_factory=dict)
    rate_limit_waits: int = 0
    rate_limit_wait_seconds: float = 0.0

    def count(self, outcome: str) -> None:
        self.calls[outcome] = self.calls.get(outcome, 0) + 1


# What a request came to: a JSON body; a 429; a retried status (5xx, 408, 1xx-3xx); a 200 with a
# body that is not JSON; no answer (timeout, connection); a 4xx refused until restart.
OUTCOMES = ("ok", "rate_limited", "server_error", "invalid_body", "no_answer", "refused")


class Transport(Protocol):
    """One way of asking CoinGecko `path` (as in its REST API, e.g. "/coins/markets")."""

    base_url: str  # what a request's URL starts with (the poller sizes /simple/price ids by it)

    async def start(self) -> None:
        """Connect, where there is something to connect to; raise `CoinGeckoError` if unusable."""

    async def request(self, path: str, params: Mapping[str, str | int] | None) -> Answer:
        """The answer, or `TransportFailed`."""

    async def aclose(self) -> None: ...


class HttpTransport:
    """CoinGecko's REST API over one keep-alive httpx client; the key travels in the plan's
    header only."""

    def __init__(self, settings: Settings, secret: str | None) -> None:
        # Here, not at import: the worker builds its client while it joins its group, so httpx
        # (~30 ms of imports) stays out of its start-up and out of processes that never poll.
        import httpx

        self.base_url = settings.coingecko_url
        headers = {"accept": "application/json", "user-agent": USER_AGENT}
        if settings.plan in KEY_HEADERS and secret:
            headers[KEY_HEADERS[settings.plan]] = secret
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(settings.coingecko_timeout),
            limits=httpx.Limits(max_keepalive_connections=4, keepalive_expiry=60.0),
        )

    async def start(self) -> None:
        """Nothing to do: httpx connects on the first request."""

    async def request(self, path: str, params: Mapping[str, str | int] | None) -> Answer:
        import httpx  # loaded by __init__ already (see there)

        try:
            response = await self._http.get(self.base_url + path, params=params)
        except httpx.TimeoutException as error:
            raise TransportFailed(f"timed out ({type(error).__name__})") from error
        except httpx.HTTPError as error:
            raise TransportFailed(f"connection failed: {error or type(error).__name__}") from error
        content_type = response.headers.get("content-type", "no content type").split(";")[0]
        return Answer(response.status_code, response.content, content_type, _retry_after(response))

    async def aclose(self) -> None:
        await self._http.aclose()


class RateLimiter:
    """At most `calls` requests in any rolling `period` seconds, as the server counts them.

    A request holds its slot from before it is sent until its answer is in, and the window is
    measured from the answer, so two requests `calls` apart arrive at least `period` apart however
    long each spent in transit. Waiters are served in order; `pause` holds everyone.
    """

    def __init__(self, calls: int, period: float = 60.0) -> None:
        self.calls = calls
        self.period = period
        self._answered: deque[float] = deque()  # monotonic times of answers within the window
        self._in_flight = 0
        self._paused_until = 0.0
        self._lock = asyncio.Lock()  # fair: waiters go in arrival order
        self._answer = asyncio.Event()

    def share(self, fraction: float) -> RateLimiter:
        """A limiter for one caller's part of these calls: `fraction` of them, in the smallest
        whole number of calls per window (at least 1) over a window stretched to match."""
        allowed = self.calls * fraction
        calls = max(1, int(allowed))
        return RateLimiter(calls, self.period * calls / allowed)

    def pause(self, seconds: float) -> None:
        """No request starts for `seconds` (a 429's Retry-After applies to every request)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold a slot for one request; yields the seconds waited for it (0.0: none)."""
        started = time.monotonic()
        # The lock is held only by a request waiting for a slot: in line behind it is waiting too.
        waited = self._lock.locked()
        async with self._lock:
            while True:
                now = time.monotonic()
                while self._answered and self._answered[0] <= now - self.period:
                    self._answered.popleft()
                wait = self._paused_until - now
                if len(self._answered) + self._in_flight >= self.calls:
                    if not self._answered:  # every slot is in flight: wait for an answer
                        self._answer.clear()
                        waited = True
                        await self._answer.wait()
                        continue
                    wait = max(wait, self._answered[0] + self.period - now)
                if wait <= 0:
                    break
                waited = True
                await asyncio.sleep(wait)
            self._in_flight += 1
        try:
            yield time.monotonic() - started if waited else 0.0
        finally:
            self._in_flight -= 1
            self._answered.append(time.monotonic())
            self._answer.set()


class CoinGeckoClient:
    """`await client.get(path, params)` -> decoded JSON (exact numbers), or a `CoinGeckoError`."""

    def __init__(
        self,
        settings: Settings,
        *,
        limiter: RateLimiter | None = None,
        max_attempts: int = 4,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
    ) -> None:
        self.limiter = limiter or RateLimiter(settings.calls_per_minute)
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        key = settings.coingecko_api_key
        self._secret = key.get_secret_value() if key is not None else None
        self.transport = _transport_for(settings, self._secret)
        self._refused: dict[str, CoinGeckoRefused] = {}

    @property
    def base_url(self) -> str:
        return self.transport.base_url

    async def start(self) -> None:
        """Connect (MCP: list the server's tools). `CoinGeckoUnusable` if it can never work;
        `CoinGeckoUnavailable` if it cannot now (the polls will try again)."""
        try:
            await self.transport.start()
        except TransportFailed as error:
            raise CoinGeckoUnavailable(redact(str(error), self._secret)) from error

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def __aenter__(self) -> CoinGeckoClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def refused(self) -> Mapping[str, CoinGeckoRefused]:
        """Paths disabled until restart, with the refusal that disabled them."""
        return self._refused

    async def get(
        self,
        path: str,
        params: Mapping[str, str | int] | None = None,
        tally: CallTally | None = None,
        share: RateLimiter | None = None,
    ) -> Any:
        """The decoded body; each request's outcome and rate-limit wait go to `tally`. With
        `share`, each request also waits for a slot of it (the caller's part of the plan)."""
        if path in self._refused:
            raise self._refused[path]
        tally = tally if tally is not None else CallTally()
        reason = ""
        for attempt in range(1, self.max_attempts + 1):
            delay = jittered_backoff(attempt, self.backoff_base, self.backoff_cap)
            answer: Answer | None = None
            async with self._slot(share) as waited:
                if waited:
                    tally.rate_limit_waits += 1
                    tally.rate_limit_wait_seconds += waited
                try:
                    answer = await self.transport.request(path, params)
                except TransportFailed as error:
                    reason = redact(str(error), self._secret)
                    tally.count("no_answer")
            if answer is not None:
                status = answer.status
                if status == 200:
                    try:
                        body = loads_exact(answer.content)
                    except ValueError:
                        reason = f"HTTP 200 with a non-JSON body ({answer.content_type})"
                        tally.count("invalid_body")
                    else:
                        tally.count("ok")
                        return body
                elif status == 429:
                    delay = answer.retry_after or delay
                    self.limiter.pause(delay)
                    reason = f"HTTP 429 rate limited, Retry-After {delay:g}s"
                    tally.count("rate_limited")
                elif status == 408 or status >= 500 or status < 400:
                    reason = f"HTTP {status} ({answer.content_type})"
                    tally.count("server_error")
                else:
                    tally.count("refused")
                    raise self._refuse(path, answer)
            if attempt == self.max_attempts:
                break
            log.warning(
                "coingecko %s: %s; retry %d/%d in %.1fs",
                path,
                reason,
                attempt,
                self.max_attempts - 1,
                delay,
            )
            if not reason.startswith("HTTP 429"):  # a 429's pause is in the limiter already
                await asyncio.sleep(delay)
        raise CoinGeckoUnavailable(f"{path}: {reason} (gave up after {self.max_attempts} tries)")

    @asynccontextmanager
    async def _slot(self, share: RateLimiter | None) -> AsyncIterator[float]:
        """A slot of `share` (if any), then of the plan's limiter; yields both waits."""
        if share is None:
            async with self.limiter.slot() as waited:
                yield waited
            return
        async with share.slot() as own, self.limiter.slot() as waited:
            yield own + waited

    def _refuse(self, path: str, answer: Answer) -> CoinGeckoRefused:
        error_code, message = _error_details(answer)
        refused = CoinGeckoRefused(path, answer.status, error_code, redact(message, self._secret))
        self._refused[path] = refused
        log.error(
            "coingecko %s refused (will not retry until restart): HTTP %d, error_code %s: %s",
            path,
            refused.status,
            refused.error_code,
            refused.message,
        )
        return refused


def _transport_for(settings: Settings, secret: str | None) -> Transport:
    if settings.coingecko_source == "mcp":
        from coingecko.mcp import McpTransport  # the MCP SDK is loaded only when it is used

        return McpTransport(settings, secret)
    return HttpTransport(settings, secret)


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (or an HTTP date), capped; None when absent or unreadable."""
    value = response.headers.get("retry-after", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(seconds, MAX_RETRY_AFTER) if seconds > 0 else None


def _error_details(answer: Answer) -> tuple[object, str]:
    """CoinGecko's error code and message, from any of its error shapes (or the raw text).

    Shapes seen: `{"error": "coin not found"}`, `{"status": {"error_code", "error_message"}}`,
    and `{"error": {"status": {...}}}`.
    """
    try:
        body = loads_exact(answer.content)
    except ValueError:
        return None, answer.text[:200].strip() or "(empty body)"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if isinstance(body, dict) and isinstance(body.get("status"), dict):
        status = body["status"]
        return status.get("error_code"), str(status.get("error_message", ""))[:300]
    if isinstance(body, dict) and "error" in body:
        return None, str(body["error"])[:300]
    return None, str(body)[:300]
