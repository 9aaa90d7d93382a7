"""Historical backfill: CoinGecko's market charts of past days, published as backfilled prices.

`Backfill.run(request)` resolves the coins (one /coins/markets call per 250: their symbols and
names) and the range, splits the range into chunks of at most `CHUNK` (CoinGecko answers a range
of 2-90 days hourly and a longer one only daily, so 90-day chunks get the finest history every
plan can ask for), and for each coin and chunk GETs `/coins/{id}/market_chart/range`, parses the
points exactly (`parse_market_chart`: `source` is `coingecko-backfill`) and publishes them. The
sinks store them idempotently (primary key coin, exchange, time), so a re-run stores nothing
twice.

An interrupted run continues where it stopped: after the broker has acknowledged a chunk's
records, the chunk is recorded as done in a progress file under DATA_DIR (`ProgressFile`, written
atomically). A file, not a table, because the backfill is a producer only: it needs CoinGecko and
the broker, never the database, which stays the sinks' alone. A run that finishes removes its
file; a run that loses it (a new Heroku dyno) starts over and stores nothing twice.

The client brings the plan's rate limit. Keyless and Demo keys reach back `HISTORY_DAYS[plan]`
days (CoinGecko's 401 with error_code 10012 beyond): a range older than that is refused before
any call, and the 10012 answer, should CoinGecko's clock disagree, gets the same one-line message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO
from urllib.parse import quote

from coingecko.client import CoinGeckoClient, CoinGeckoError, CoinGeckoRefused
from coingecko.parse import BACKFILL_SOURCE, Parsed, parse_market_chart, parse_ohlc
from coingecko.poller import MAX_PER_PAGE, Publish

if TYPE_CHECKING:  # importing app.* at run time would build the whole Faust app
    from app.settings import CoinGeckoPlan

log = logging.getLogger(__name__)

CHUNK = timedelta(days=90)  # the longest range CoinGecko answers hourly
# How far back a plan may ask; one day of it is kept as margin, since a long run's last first
# chunk is sent minutes after the check.
HISTORY_DAYS: dict[str, int] = {"keyless": 365, "demo": 365}
HISTORY_MARGIN = timedelta(days=1)
OHLC_DAYS = (1, 7, 14, 30, 90, 180, 365)  # the `days` /coins/{id}/ohlc takes
HISTORY_LIMIT_CODE = 10012
LOG_EVERY_SECONDS = 10.0  # progress lines when not on a terminal


class BackfillError(Exception):
    """The backfill cannot go on; the message is one line for the user."""


@dataclass(frozen=True)
class BackfillRequest:
    """What the user asked for; equal requests are the same job (an unfinished one resumes)."""

    coins: tuple[str, ...] = ()  # CoinGecko ids; empty: the top `top` by market cap
    top: int | None = None
    days: int | None = None  # or since/until
    since: datetime | None = None
    until: datetime | None = None
    ohlc: bool = False  # also the candles of /coins/{id}/ohlc, one call per coin

    def key(self) -> str:
        asked = asdict(self)
        asked["coins"] = sorted(self.coins)
        text = json.dumps(asked, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def window(self, now: datetime) -> tuple[datetime, datetime]:
        """[since, until), with --days counted back from `now`, and `until` at most `now`, in
        whole seconds: CoinGecko's `from` and `to` are, and a 90-day chunk must not ask for a
        second more (CoinGecko would answer it daily instead of hourly)."""
        now = now.replace(microsecond=0)
        until = min(self.until or now, now).replace(microsecond=0)
        since = now - timedelta(days=self.days) if self.days is not None else self.since
        since = since and since.replace(microsecond=0)
        if since is None or since >= until:
            raise BackfillError(f"nothing to backfill: the range {since} to {until} is empty")
        return since, until


def parse_moment(text: str) -> datetime:
    """An ISO date or time from the command line (`2026-01-31`, `2026-01-31T12:00`); UTC unless
    it names its offset."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BackfillError(f"{text!r} is not an ISO date or time (e.g. 2026-01-31)") from None
    return moment.replace(tzinfo=UTC) if moment.utcoffset() is None else moment.astimezone(UTC)


@dataclass(frozen=True)
class Coin:
    id: str
    symbol: str
    name: str


@dataclass
class Job:
    """A resolved request and how far it got: per coin, how many chunks are published."""

    key: str
    since: datetime
    until: datetime
    coins: list[Coin]
    done: dict[str, int] = field(default_factory=dict)  # steps: the chunks, then the candles
    ohlc: bool = False

    def chunks(self) -> list[tuple[datetime, datetime]]:
        return plan_chunks(self.since, self.until)

    def steps(self) -> int:
        """Per coin: one call per chunk, and one for the candles if asked for."""
        return len(self.chunks()) + self.ohlc

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "coins": [asdict(coin) for coin in self.coins],
            "done": self.done,
            "ohlc": self.ohlc,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        return cls(
            key=data["key"],
            since=datetime.fromisoformat(data["since"]),
            until=datetime.fromisoformat(data["until"]),
            coins=[Coin(**coin) for coin in data["coins"]],
            done={str(coin): int(count) for coin, count in data["done"].items()},
            ohlc=bool(data.get("ohlc", False)),
        )


def plan_chunks(
    since: datetime, until: datetime, size: timedelta = CHUNK
) -> list[tuple[datetime, datetime]]:
    """[since, until) as consecutive half-open chunks of at most `size`, oldest first."""
    count = math.ceil((until - since) / size)
    return [(since + i * size, min(since + (i + 1) * size, until)) for i in range(count)]


class ProgressFile:
    """One JSON file per job under `directory`, replaced atomically (write, fsync, rename), so
    a crash leaves the old or the new progress, never half of it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, key: str) -> Path:
        return self.directory / f"backfill-{key}.json"

    def load(self, key: str) -> Job | None:
        try:
            return Job.from_json(json.loads(self.path(key).read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as error:
            log.warning(
                "backfill: unreadable progress %s (%s); starting over", self.path(key), error
            )
            return None

    def save(self, job: Job) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.path(job.key)
        temporary = target.with_suffix(".tmp")
        with temporary.open("w") as file:
            json.dump(job.to_json(), file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def finish(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)


class Progress(Protocol):
    """How a run shows its progress: one `advance` per chunk published."""

    def start(self, total: int, done: int) -> None: ...

    def advance(self, records: int) -> None: ...

    def close(self) -> None: ...


class BarProgress:
    """A tqdm bar (rate and ETA in chunks, records so far) for a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.records = 0
        self._bar: Any = None

    def start(self, total: int, done: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=done, unit="chunk", desc="backfill", file=self.stream)

    def advance(self, records: int) -> None:
        self.records += records
        self._bar.set_postfix(records=self.records, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class LogProgress:
    """A line at most every `every` seconds, and one at the end, where no one sees a bar (a CI
    log, a Heroku one-off dyno's output)."""

    def __init__(self, stream: TextIO, every: float = LOG_EVERY_SECONDS) -> None:
        self.stream = stream
        self.every = every
        self.records = 0
        self.total = self.done = self._first = 0
        self._shown = -1  # `done` when the last line was printed
        self._started = self._logged = 0.0

    def start(self, total: int, done: int) -> None:
        self.total, self.done, self._first = total, done, done
        self._started = self._logged = time.monotonic()

    def advance(self, records: int) -> None:
        self.records += records
        self.done += 1
        if time.monotonic() - self._logged >= self.every:
            self._line()

    def close(self) -> None:
        if self._shown != self.done:
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        self._logged, self._shown = now, self.done
        rate = (self.done - self._first) / max(now - self._started, 1e-9)
        left = self.total - self.done
        eta = f"{left / rate:.0f}s" if rate > 0 else "unknown"
        at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        print(
            f"{at} backfill: {self.done}/{self.total} chunks, {self.records} records, "
            f"{rate * 60:.1f} chunks/min, ETA {eta}",
            file=self.stream,
            flush=True,
        )


def progress_for(stream: TextIO = sys.stderr) -> Progress:
    """A bar where `stream` is a terminal, lines otherwise."""
    return BarProgress(stream) if stream.isatty() else LogProgress(stream)


@dataclass
class Summary:
    chunks: int = 0  # published by this run
    records: int = 0
    skipped: int = 0  # points that did not become records (null price)
    resumed_from: int = 0  # chunks an earlier run had published
    failed: dict[str, str] = field(default_factory=dict)  # coin -> why it was left out

    def __str__(self) -> str:
        told = f"published {_many(self.records, 'record')} in {_many(self.chunks, 'chunk')}"
        if self.resumed_from:
            told += f" (continued after {self.resumed_from} done before)"
        if self.skipped:
            told += f"; {_many(self.skipped, 'point')} without a price skipped"
        return told


def _many(count: int, thing: str) -> str:
    return f"{count} {thing}{'' if count == 1 else 's'}"


def history_limit_message(plan: str, since: datetime, now: datetime) -> str:
    days = HISTORY_DAYS.get(plan, HISTORY_DAYS["keyless"])  # a paid plan told 10012: the same
    back = (now - since) / timedelta(days=1)
    return (
        f"CoinGecko's {plan} plan serves market charts of the past {days} days only "
        f"(error_code {HISTORY_LIMIT_CODE}); this range starts {back:.0f} days back: ask for at "
        f"most {(timedelta(days=days) - HISTORY_MARGIN).days} days, or use a paid plan "
        "(COINGECKO_PLAN=pro with its key)"
    )


class Backfill:
    """The whole command, given its collaborators: a client (rate limit, retries), `publish`
    (returns once the broker has the records) and a progress file."""

    def __init__(
        self,
        client: CoinGeckoClient,
        plan: CoinGeckoPlan,
        publish: Publish,
        store: ProgressFile,
        progress: Progress | None = None,
    ) -> None:
        self.client = client
        self.plan = plan
        self.publish = publish
        self.store = store
        self.progress = progress or LogProgress(sys.stderr)

    async def run(self, request: BackfillRequest, now: datetime | None = None) -> Summary:
        now = now or datetime.now(UTC)
        summary = Summary()
        job = self.store.load(request.key())
        if job is None:
            since, until = request.window(now)
            self._check_history(since, now)
            job = Job(request.key(), since, until, await self._coins(request), ohlc=request.ohlc)
            self.store.save(job)
        else:
            log.info("backfill: continuing the unfinished run from %s", self.store.path(job.key))
        chunks, steps = job.chunks(), job.steps()
        summary.resumed_from = sum(min(job.done.get(c.id, 0), steps) for c in job.coins)
        self.progress.start(len(job.coins) * steps, summary.resumed_from)
        try:
            for coin in job.coins:
                for index in range(job.done.get(coin.id, 0), steps):
                    try:
                        if index < len(chunks):
                            parsed = await self._chart(coin, chunks[index])
                        else:
                            parsed = await self._candles(job, coin, now)
                        await self._publish(job, coin, index, parsed, summary)
                    except CoinGeckoRefused as refused:
                        if refused.error_code == HISTORY_LIMIT_CODE:
                            raise BackfillError(
                                history_limit_message(self.plan, job.since, now)
                            ) from None
                        summary.failed[coin.id] = str(refused)
                        break
                    except CoinGeckoError as error:
                        raise BackfillError(
                            f"{error}; the progress is kept: run the same command again to continue"
                        ) from None
        finally:
            self.progress.close()
        if not summary.failed:
            self.store.finish(job.key)
        return summary

    async def _chart(self, coin: Coin, chunk: tuple[datetime, datetime]) -> Parsed[Any]:
        start, end = chunk
        params: dict[str, str | int] = {
            "vs_currency": "usd",
            "from": int(start.timestamp()),
            "to": int(end.timestamp()),  # inclusive: the parser keeps [start, end)
        }
        body = await self.client.get(f"/coins/{quote(coin.id, safe='')}/market_chart/range", params)
        return parse_market_chart(body, coin.id, coin.symbol, coin.name, start, end)

    async def _candles(self, job: Job, coin: Coin, now: datetime) -> Parsed[Any]:
        """The candles of /coins/{id}/ohlc within the range and closed by now. Every plan has
        this endpoint, with `days` counted back from now (the widths follow it: 4 hours up to 30
        days, 4 days beyond); /ohlc/range, with hourly candles, is for paid plans only."""
        days = next((d for d in OHLC_DAYS if now - timedelta(days=d) <= job.since), OHLC_DAYS[-1])
        params: dict[str, str | int] = {"vs_currency": "usd", "days": days}
        body = await self.client.get(f"/coins/{quote(coin.id, safe='')}/ohlc", params)
        parsed = parse_ohlc(body, coin.id, coin.symbol, days)
        parsed.records = [
            record.model_copy(update={"source": BACKFILL_SOURCE})
            for record in parsed.records
            if job.since <= record.timestamp < job.until and record.timestamp <= now
        ]
        return parsed

    async def _publish(
        self, job: Job, coin: Coin, index: int, parsed: Parsed[Any], summary: Summary
    ) -> None:
        for problem in parsed.problems:
            log.debug("coingecko data: %s", problem)
        if parsed.records:
            await self.publish(parsed.records)
        job.done[coin.id] = index + 1
        self.store.save(job)  # only now: the broker has every record of the step
        summary.chunks += 1
        summary.records += len(parsed.records)
        summary.skipped += parsed.skipped
        self.progress.advance(len(parsed.records))

    def _check_history(self, since: datetime, now: datetime) -> None:
        days = HISTORY_DAYS.get(self.plan)
        if days is not None and since < now - timedelta(days=days) + HISTORY_MARGIN:
            raise BackfillError(history_limit_message(self.plan, since, now))

    async def _coins(self, request: BackfillRequest) -> list[Coin]:
        """The coins' symbols and names (records need them; market charts lack them), in the
        order asked, or the top N by market cap."""
        found: dict[str, Coin] = {}
        for params in _market_pages(request):
            try:
                rows = await self.client.get("/coins/markets", params)
            except CoinGeckoError as error:
                raise BackfillError(f"cannot list the coins: {error}") from None
            for row in rows if isinstance(rows, list) else []:
                if isinstance(row, dict) and all(
                    isinstance(row.get(name), str) and row[name]
                    for name in ("id", "symbol", "name")
                ):
                    found.setdefault(row["id"], Coin(row["id"], row["symbol"], row["name"]))
        if not request.coins:
            return list(found.values())[: request.top]
        unknown = [coin for coin in request.coins if coin not in found]
        if unknown:
            log.warning("backfill: CoinGecko does not list %s; left out", ", ".join(unknown))
        coins = [found[coin] for coin in request.coins if coin in found]
        if not coins:
            raise BackfillError(f"none of the coins is known to CoinGecko: {', '.join(unknown)}")
        return coins


def _market_pages(request: BackfillRequest) -> Iterator[dict[str, str | int]]:
    common: dict[str, str | int] = {"vs_currency": "usd", "order": "market_cap_desc"}
    coins: Sequence[str] = request.coins
    for start in range(0, len(coins), MAX_PER_PAGE):
        batch = coins[start : start + MAX_PER_PAGE]
        yield {**common, "ids": ",".join(batch), "per_page": MAX_PER_PAGE, "page": 1}
    if not coins:
        top = request.top or 1
        per_page = min(MAX_PER_PAGE, top)
        for page in range(1, math.ceil(top / per_page) + 1):
            yield {**common, "per_page": per_page, "page": page}
