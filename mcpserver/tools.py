"""The MCP server's read tools: per-record tools derived from the DSL, and a few over all of them.

For every record in `models.RECORDS` (a new record class gets both, with their schemas, without
new tool code):

- `latest_<table>`: the newest row of each value of the topic's key field (one, a list, or all),
  optionally filtered on the other primary-key columns (defaulting as the record's fields do);
- `history_<table>`: one key's rows between two times, newest or oldest first, paged.

Then `candles_<table>` for every candle aggregate of `generators.sql.CANDLES`, `search_coins` and
`pipeline_status`. Every tool reads through `store.queries`, the layer the web views use, on a
read pool with a statement timeout; each answer's structured content follows the tool's output
schema, whose rows are the record's own JSON Schema (`generators.jsonschema`): decimals as exact
strings in plain notation, times RFC 3339. Bad arguments are tool errors with a one-line reason.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import asyncpg
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import AwareDatetime, Field, ValidationError

from generators.jsonschema import json_schema
from generators.sql import CANDLES, CandleAggregate
from models import RECORDS
from models.codec import describe_validation_error, plain_decimal, plain_json
from models.dsl import StreamRecord
from models.market import AGGREGATE_EXCHANGE, CryptoPriceData
from store import queries
from store.db import LazyPool

READ_TIMEOUT = 10.0  # seconds for one tool's database work, connecting included
READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
Interval = Literal["1m", "5m", "15m", "1h", "4h", "1d"]
Order = Literal["newest_first", "oldest_first"]
# The decimal column whose 24 h high/low `latest_<table>` adds, for the records that have one.
RANGE_COLUMNS: dict[type[StreamRecord], str] = {CryptoPriceData: "usd_price"}
RANGE_WINDOW = timedelta(hours=24)
SEARCH_LIMIT_MAX = 100
SYMBOLS_NOTE = (
    "Symbols are not unique: several coins can share one (search 'usdt' to see); "
    "use the coin_id to name a coin."
)

Limit = Annotated[
    int,
    Field(ge=1, le=queries.HISTORY_LIMIT_MAX, description="Rows per page"),
]
Since = Annotated[AwareDatetime, Field(description="Inclusive lower bound, RFC 3339 with offset")]
Until = Annotated[
    AwareDatetime | None,
    Field(description="Exclusive upper bound, RFC 3339 with offset; default: now"),
]
TIME = {"type": "string", "format": "date-time"}
DECIMAL = json_schema(CryptoPriceData)["properties"]["usd_price"]


@asynccontextmanager
async def reading(
    database: LazyPool, failure: type[Exception] = ToolError
) -> AsyncIterator[asyncpg.Pool]:
    """The read pool, with the work bounded; failures become `failure` (a tool's or a
    resource's error, which the client gets as a one-line message)."""
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            yield await database.get()
    except asyncpg.QueryCanceledError:
        raise failure("the query ran past its statement timeout; ask for less") from None
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        raise failure(f"database unavailable ({type(error).__name__})") from None
    except ValueError as error:  # store.queries refusing an argument
        raise failure(str(error)) from None


def answer(payload: dict[str, Any]) -> CallToolResult:
    """Structured content, and the same JSON as text for clients that read only text."""
    text = json.dumps(payload, separators=(",", ":"))
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=payload)


def iso(moment: datetime | None) -> str | None:
    """RFC 3339 in UTC, written as the records' own JSON writes it (`Z`)."""
    return None if moment is None else moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def make_tool(
    run: Callable[..., Awaitable[CallToolResult]],
    name: str,
    description: str,
    parameters: Sequence[inspect.Parameter],
    output_schema: dict[str, Any],
) -> Tool:
    """A tool whose input schema comes from `parameters` (types and defaults, validated by the
    SDK before `run` sees them) and whose output schema is given."""
    run.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        list(parameters), return_annotation=CallToolResult
    )
    tool = Tool.from_function(
        run, name=name, description=description, annotations=READ_ONLY, structured_output=False
    )
    tool.fn_metadata.output_schema = output_schema
    return tool


def parameter(
    name: str, annotation: Any, default: Any = inspect.Parameter.empty
) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default
    )


def field_type(record: type[StreamRecord], name: str) -> Any:
    """A record field's type with its constraints and description, for a tool argument."""
    info = record.model_fields[name]
    return Annotated[(info.annotation, *info.metadata, Field(description=info.description))]


def key_parameters(
    record: type[StreamRecord], names: Sequence[str], *, pinned: bool = False
) -> list[inspect.Parameter]:
    """Filters on primary-key columns: a field with a default keeps it; the others are optional,
    or required when `pinned` (a history is one series: its times must be unique)."""
    found = []
    for name in names:
        info = record.model_fields[name]
        if not info.is_required():
            found.append(parameter(name, field_type(record, name), info.default))
        elif pinned:
            found.append(parameter(name, field_type(record, name)))
        else:
            found.append(parameter(name, field_type(record, name) | None, None))
    return found


def row_schema(record: type[StreamRecord]) -> dict[str, Any]:
    schema = json_schema(record)
    del schema["$schema"]
    return schema


def output_schema(properties: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": dict(properties),
        "required": list(properties),
        "additionalProperties": False,
    }


def rows_schema(record: type[StreamRecord]) -> dict[str, Any]:
    return {"type": "array", "items": row_schema(record)}


def other_keys(record: type[StreamRecord]) -> list[str]:
    """The primary-key columns besides the time column and the topic's key field."""
    skip = {record.table.time_column, record.topic.key_field}
    return [name for name in record.table.primary_key if name not in skip]


async def known(db: asyncpg.Pool, record: type[StreamRecord], key: str, value: object) -> None:
    """Refuse a key value the table has never stored (a typo, an injection attempt)."""
    if await queries.latest(db, record, {key: value}) is None:
        raise ToolError(f"unknown {key} {value!r}: no {record.table.name} row has it")


def latest_tool(record: type[StreamRecord], database: LazyPool) -> Tool:
    key = record.topic.key_field
    table = record.table.name
    range_column = RANGE_COLUMNS.get(record)

    async def run(**arguments: Any) -> CallToolResult:
        among: list[Any] | None = arguments.pop(key)
        filters = {name: value for name, value in arguments.items() if value is not None}
        async with reading(database) as db:
            rows = await queries.latest_per_group(db, record, key, filters, among=among)
            missing = sorted(set(among or ()) - {getattr(row, key) for row in rows})
            if missing:
                raise ToolError(f"unknown {key}: {', '.join(map(repr, missing))}")
            payload: dict[str, Any] = {"count": len(rows), "rows": list(map(plain_json, rows))}
            if range_column is not None:
                until = datetime.now(UTC)
                since = until - RANGE_WINDOW
                found = await queries.value_ranges(
                    db,
                    record,
                    range_column,
                    key,
                    filters,
                    since,
                    until,
                    among=[getattr(row, key) for row in rows],
                )
                payload["range_24h"] = {
                    "column": range_column,
                    "since": iso(since),
                    "until": iso(until),
                    "ranges": {
                        str(group): {
                            "high": plain_decimal(bounds["high"]),
                            "low": plain_decimal(bounds["low"]),
                            "samples": bounds["samples"],
                        }
                        for group, bounds in found.items()
                    },
                }
        return answer(payload)

    properties: dict[str, Any] = {"count": {"type": "integer"}, "rows": rows_schema(record)}
    description = (
        f"The newest {table} row of each {key} (one or more {key} values, or all), "
        f"from {record.__name__}: {inspect.cleandoc(record.__doc__ or '')}"
    )
    if range_column is not None:
        bounds = output_schema({"high": DECIMAL, "low": DECIMAL, "samples": {"type": "integer"}})
        properties["range_24h"] = output_schema(
            {
                "column": {"type": "string"},
                "since": TIME,
                "until": TIME,
                "ranges": {"type": "object", "additionalProperties": bounds},
            }
        )
        description += f" With each {key}'s {range_column} high and low over the last 24 h."
    # Built at run time from the record, so typed Any for mypy.
    keys: Any = Annotated[
        (
            list[field_type(record, key)] | None,  # type: ignore[misc]
            Field(min_length=1, max_length=queries.LATEST_LIMIT_MAX, description="default: all"),
        )
    ]
    parameters = [parameter(key, keys, None), *key_parameters(record, other_keys(record))]
    return make_tool(run, f"latest_{table}", description, parameters, output_schema(properties))


def history_tool(record: type[StreamRecord], database: LazyPool) -> Tool:
    key = record.topic.key_field
    table = record.table.name

    async def run(**arguments: Any) -> CallToolResult:
        since, until = arguments.pop("since"), arguments.pop("until") or datetime.now(UTC)
        order, limit = arguments.pop("order"), arguments.pop("limit")
        filters = {name: value for name, value in arguments.items() if value is not None}
        oldest_first = order == "oldest_first"
        async with reading(database) as db:
            rows = await queries.history(
                db,
                record,
                filters,
                limit=limit,
                since=since,
                until=until,
                oldest_first=oldest_first,
            )
            if not rows:
                await known(db, record, key, filters[key])
        next_page = None
        if len(rows) == limit:
            last = getattr(rows[-1], record.table.time_column)
            if oldest_first:  # PostgreSQL times are whole microseconds: the next one is exact
                next_page = {"since": iso(last + timedelta.resolution), "until": iso(until)}
            else:
                next_page = {"since": iso(since), "until": iso(last)}
        return answer(
            {"count": len(rows), "rows": list(map(plain_json, rows)), "next_page": next_page}
        )

    page = output_schema({"since": TIME, "until": TIME})
    properties = {
        "count": {"type": "integer"},
        "rows": rows_schema(record),
        "next_page": {
            "anyOf": [page, {"type": "null"}],
            "description": "since/until for the next page; null on the last page",
        },
    }
    description = (
        f"One {key}'s {table} rows with {record.table.time_column} in [since, until), newest or "
        f"oldest first, at most `limit` per page (call again with `next_page`)."
    )
    parameters = [
        parameter(key, field_type(record, key)),
        *key_parameters(record, other_keys(record), pinned=True),
        parameter("since", Since),
        parameter("until", Until, None),
        parameter("order", Order, "newest_first"),
        parameter("limit", Limit, queries.HISTORY_LIMIT_DEFAULT),
    ]
    return make_tool(run, f"history_{table}", description, parameters, output_schema(properties))


def candles_tool(candle: CandleAggregate, database: LazyPool) -> Tool:
    record = candle.source
    first = candle.group_by[0]

    async def run(**arguments: Any) -> CallToolResult:
        since, until = arguments.pop("since"), arguments.pop("until") or datetime.now(UTC)
        interval = arguments.pop("interval")
        filters = {name: value for name, value in arguments.items() if value is not None}
        async with reading(database) as db:
            found = await queries.candles(
                db, candle, filters, queries.CANDLE_INTERVALS[interval], since, until
            )
            if not found:
                await known(db, record, first, filters[first])
        shown = [
            {
                "start": iso(c["bucket"]),
                **{part: plain_decimal(c[part]) for part in ("open", "high", "low", "close")},
                "snapshots": c["snapshots"],
            }
            for c in found
        ]
        return answer({"interval": interval, "count": len(shown), "candles": shown})

    bar = output_schema(
        {
            "start": TIME,
            **dict.fromkeys(("open", "high", "low", "close"), DECIMAL),
            "snapshots": {"type": "integer", "description": "price rows in the candle"},
        }
    )
    properties = {
        "interval": {"type": "string"},
        "count": {"type": "integer"},
        "candles": {"type": "array", "items": bar},
    }
    description = (
        f"OHLC candles of {record.table.name}.{candle.price} at 1m/5m/15m/1h/4h/1d, built in the "
        f"database from the {candle.name} aggregate, oldest first: every whole candle that "
        f"overlaps [since, until) (at most {queries.CANDLES_MAX}). Candles without rows are left "
        "out. For CoinGecko's own OHLC candles, see history_crypto_ohlcv."
    )
    parameters = [
        parameter(first, field_type(record, first)),
        *key_parameters(record, candle.group_by[1:], pinned=True),
        parameter("interval", Interval),
        parameter("since", Since),
        parameter("until", Until, None),
    ]
    name = f"candles_{record.table.name}"
    return make_tool(run, name, description, parameters, output_schema(properties))


def search_tool(database: LazyPool) -> Tool:
    async def run(query: str, limit: int) -> CallToolResult:
        needle = query.casefold()
        async with reading(database) as db:
            rows = await queries.latest_per_group(
                db, CryptoPriceData, "coin_id", {"exchange_id": AGGREGATE_EXCHANGE}
            )
        coins = [
            {"coin_id": row.coin_id, "symbol": row.symbol, "name": row.name}
            for row in rows
            if any(needle in value.casefold() for value in (row.coin_id, row.symbol, row.name))
        ][:limit]
        return answer({"count": len(coins), "coins": coins, "note": SYMBOLS_NOTE})

    text = {"type": "string"}
    coin = output_schema({"coin_id": text, "symbol": text, "name": text})
    properties = {
        "count": {"type": "integer"},
        "coins": {"type": "array", "items": coin},
        "note": text,
    }
    description = (
        "The tracked coins (those with stored prices) whose id, symbol or name contains `query`, "
        f"case-insensitively, ordered by id. {SYMBOLS_NOTE}"
    )
    parameters = [
        parameter("query", Annotated[str, Field(min_length=1, max_length=100)]),
        parameter("limit", Annotated[int, Field(ge=1, le=SEARCH_LIMIT_MAX)], 20),
    ]
    return make_tool(run, "search_coins", description, parameters, output_schema(properties))


def status_tool(database: LazyPool, consumer_group: str) -> Tool:
    async def run() -> CallToolResult:
        try:
            async with reading(database) as db:
                reachable = await queries.ping(db, READ_TIMEOUT)
                fresh = await queries.freshness(db, RECORDS, consumer_group) if reachable else None
        except ToolError:
            reachable, fresh = False, None
        now = datetime.now(UTC)
        tables = None
        if fresh is not None:
            tables = {
                table: {
                    "newest": iso(times["newest"]),
                    "stored_at": iso(times["stored_at"]),
                    "stored_age_seconds": (
                        round((now - times["stored_at"]).total_seconds(), 3)
                        if times["stored_at"]
                        else None
                    ),
                }
                for table, times in fresh.items()
            }
        return answer(
            {
                "consumer_group": consumer_group,
                "database": {"reachable": reachable},
                "tables": tables,
            }
        )

    maybe_time = {"anyOf": [TIME, {"type": "null"}]}
    freshness = output_schema(
        {
            "newest": maybe_time,
            "stored_at": maybe_time,
            "stored_age_seconds": {"type": ["number", "null"]},
        }
    )
    properties = {
        "consumer_group": {"type": "string"},
        "database": output_schema({"reachable": {"type": "boolean"}}),
        "tables": {
            "anyOf": [{"type": "object", "additionalProperties": freshness}, {"type": "null"}]
        },
    }
    description = (
        "The pipeline's state as the database shows it (what /health knows that any process can "
        "tell): whether the database answers, and per table its newest row's time and when the "
        "sinks last stored a batch. The broker's and poller's live state is only on a worker's "
        "/health."
    )
    return make_tool(run, "pipeline_status", description, [], output_schema(properties))


Publish = Callable[[StreamRecord], Awaitable[None]]
# How long the write tool waits for the broker's acknowledgement (Faust's own producer would
# wait up to its 1,200 s request timeout, and the client with it).
PUBLISH_SECONDS = 15.0


def publish_tool(record: type[StreamRecord], name: str, publish: Publish) -> Tool:
    """A write tool: its arguments are the record's fields (validated by the record class, as
    the sink's decoder validates them) and it publishes the record to its topic, where the sink
    stores it like any other. It never writes to the database itself."""

    async def run(**fields: Any) -> CallToolResult:
        try:
            published = record.model_validate(fields)
        except ValidationError as error:
            raise ToolError(describe_validation_error(error)) from None
        try:
            async with asyncio.timeout(PUBLISH_SECONDS):
                await publish(published)
        except Exception as error:  # the broker's answer, or none in time: the record may not be in
            reason = "no answer" if isinstance(error, TimeoutError) else type(error).__name__
            raise ToolError(
                f"the broker did not confirm the record ({reason} within {PUBLISH_SECONDS:g} s); "
                "it may or may not be stored: repeating it is safe (stored once per key and time)"
            ) from None
        return answer({"topic": record.topic.name, "record": plain_json(published)})

    parameters = [
        parameter(field, field_type(record, field), info.default)
        if not info.is_required()
        else parameter(field, field_type(record, field))
        for field, info in record.model_fields.items()
    ]
    description = (
        f"Publish one {record.__name__} to the {record.topic.name} topic; the sink stores it in "
        f"{record.table.name} (a repeat of the same key and time is stored once). Decimals as "
        "strings, times RFC 3339 with an offset."
    )
    properties = {"topic": {"type": "string"}, "record": row_schema(record)}
    tool = make_tool(run, name, description, parameters, output_schema(properties))
    tool.annotations = ToolAnnotations(
        read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=False
    )
    return tool


def read_tools(database: LazyPool, consumer_group: str) -> list[Tool]:
    """Every read tool: two per record, one per candle aggregate, search and status."""
    return [
        *(build(record, database) for record in RECORDS for build in (latest_tool, history_tool)),
        *(candles_tool(candle, database) for candle in CANDLES),
        search_tool(database),
        status_tool(database, consumer_group),
    ]
