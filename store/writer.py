"""Batch writes of DSL records into their tables: one transaction per batch, idempotent on the key.

COPY has no ON CONFLICT, and a plain multi-row INSERT costs a parse and a round trip per chunk, so
a batch is COPYed (binary, asyncpg's `copy_records_to_table`) into a temporary staging table and
moved with one `INSERT ... SELECT ... ON CONFLICT (primary key) DO NOTHING`, in the same
transaction: a replayed batch (at-least-once delivery) adds nothing, and a failed one adds nothing
either. Values travel as bound COPY data, never as SQL text; identifiers come from the DSL, checked
and quoted.

Decimals travel as their exact decimal text (`str(Decimal)`, exponent form included) into `text`
staging columns and become `numeric` in the `INSERT ... SELECT`: PostgreSQL's numeric input keeps
every digit and the scale, as the binary codec does, and asyncpg's binary numeric encoding
(`Decimal.as_tuple` and a digit conversion per value) cost the client more than the text and the
cast cost both sides together (docs/performance.md, section 7).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import asyncpg

from models.dsl import StreamRecord, check_sql_identifier, quote_ident
from models.types import TYPE_MAP, FieldShape

# Not the former "_staging" (`LIKE` the target, numeric decimals): behind a transaction-mode
# pooler a server session outlives the client, and a worker of either version must never find
# the other's staging table under its name (a Decimal COPYed into a text column fails the batch).
STAGING_SUFFIX = "_staged"
# Every transaction that stores rows tells listeners (the MCP servers' live feeds) which keys it
# stored, with pg_notify in the same transaction: PostgreSQL delivers it at commit, exactly
# when the rows become durable, and never for a rolled-back batch.
STORED_CHANNEL = "qicore_stored"
NOTIFY_PAYLOAD_BYTES = 7000  # PostgreSQL's limit is 8000; a larger batch sends several
# A record's values as COPY takes them, in the table's column order (`RecordWriter.row`).
Row = tuple[Any, ...]


@dataclass(frozen=True)
class WriteResult:
    """What one batch did: rows added, rows the table already had, repeats inside the batch."""

    inserted: int
    already_present: int
    repeated_in_batch: int

    @property
    def duplicates(self) -> int:
        return self.already_present + self.repeated_in_batch


class RecordWriter:
    """Writes batches of one record type into its table; the SQL is built once, from the DSL."""

    def __init__(self, record: type[StreamRecord]) -> None:
        self.record = record
        spec = record.table
        shapes = record.shapes()
        self.columns = tuple(shape.name for shape in shapes)
        # One generated function per record type: building rows is per record, the hottest loop
        # of a write.
        self.row: Callable[[StreamRecord], Row] = _row_function(shapes)
        self._key_of = itemgetter(*(self.columns.index(column) for column in spec.primary_key))
        self._topic_key_of = itemgetter(self.columns.index(record.topic.key_field))
        # A session-level temp table, created once per connection and emptied at every commit:
        # unlike `ON COMMIT DROP` it does not create and drop catalog rows for every batch.
        # Creating it (IF NOT EXISTS) inside each batch's transaction keeps that working behind a
        # transaction-mode pooler, where consecutive transactions may use different sessions.
        # Its columns are the record's, decimals as `text`; no constraints: the target checks.
        self.staging = check_sql_identifier(
            spec.name + STAGING_SUFFIX, f"{record.__name__}: staging"
        )
        target, staging = quote_ident(spec.name), quote_ident(self.staging)
        staged = ", ".join(f"{quote_ident(shape.name)} {_staged_type(shape)}" for shape in shapes)
        columns = ", ".join(quote_ident(column) for column in self.columns)
        moved = ", ".join(
            f"{quote_ident(shape.name)}::{TYPE_MAP[shape.kind].sql}"
            if shape.kind == "decimal"
            else quote_ident(shape.name)
            for shape in shapes
        )
        key = ", ".join(quote_ident(column) for column in spec.primary_key)
        self._create_staging = (
            f"CREATE TEMP TABLE IF NOT EXISTS {staging} ({staged}) ON COMMIT DELETE ROWS"
        )
        self._move = (
            f"INSERT INTO {target} ({columns}) SELECT {moved} FROM {staging} "  # noqa: S608
            f"ON CONFLICT ({key}) DO NOTHING"
        )

    def unique(self, rows: Sequence[Row]) -> tuple[list[Row], int]:
        """The first row of each primary key only, and how many repeats went. Keys compare as
        COPY sends them (no record type has a decimal key column; one would compare as text).

        A replayed snapshot is the same fact, so keeping the first is as good as any; removing
        repeats here also makes the inserted/duplicate counts exact.
        """
        seen: set[Hashable] = set()
        kept: list[Row] = []
        key_of = self._key_of
        for row in rows:
            key = key_of(row)
            if key not in seen:
                seen.add(key)
                kept.append(row)
        return kept, len(rows) - len(kept)

    async def write(self, pool: asyncpg.Pool, records: Sequence[StreamRecord]) -> WriteResult:
        """Store a batch in its own transaction; on any error nothing of it is stored."""
        async with pool.acquire() as connection, connection.transaction():
            return await self.insert(connection, records)

    async def insert(
        self, connection: asyncpg.Connection, records: Sequence[StreamRecord]
    ) -> WriteResult:
        """Store a batch inside the caller's transaction."""
        return await self.insert_rows(connection, [self.row(record) for record in records])

    async def insert_rows(self, connection: asyncpg.Connection, rows: Sequence[Row]) -> WriteResult:
        """Store `row()`s inside the caller's transaction. The sink builds each row as it decodes
        the record, while the record is still in the CPU's caches: a second pass over a batch of
        records after the fetch and the write had evicted them cost ~2-3x its in-cache time
        (docs/performance.md, section 7)."""
        rows, repeated = self.unique(rows)
        if not rows:
            return WriteResult(0, 0, repeated)
        await connection.execute(self._create_staging)
        await connection.copy_records_to_table(self.staging, records=rows, columns=self.columns)
        status = await connection.execute(self._move)
        inserted = int(status.rsplit(" ", 1)[1])  # "INSERT 0 <rows>"
        if inserted:
            for notice in self.notices(rows):
                await connection.execute("SELECT pg_notify($1, $2)", STORED_CHANNEL, notice)
        return WriteResult(inserted, len(rows) - inserted, repeated)

    def notices(self, rows: Sequence[tuple[Any, ...]]) -> list[str]:
        """`{"table": ..., "keys": [...]}` payloads naming the batch's topic keys (e.g. coin
        ids), each under NOTIFY_PAYLOAD_BYTES; sized as they grow, each key serialised once."""
        keys = sorted({str(self._topic_key_of(row)) for row in rows})
        empty = len(self._notice([]))  # ASCII JSON: characters are bytes
        notices: list[str] = []
        chunk: list[str] = []
        size = empty
        for key in keys:
            item = len(json.dumps(key)) + (1 if chunk else 0)  # and its comma
            if chunk and size + item > NOTIFY_PAYLOAD_BYTES:
                notices.append(self._notice(chunk))
                chunk, size, item = [], empty, item - 1
            chunk.append(key)
            size += item
        return [*notices, self._notice(chunk)]

    def _notice(self, keys: list[str]) -> str:
        return json.dumps({"table": self.record.table.name, "keys": keys}, separators=(",", ":"))


def _staged_type(shape: FieldShape) -> str:
    return "text" if shape.kind == "decimal" else TYPE_MAP[shape.kind].sql


def _row_function(shapes: Sequence[FieldShape]) -> Callable[[StreamRecord], Row]:
    """A function from a record to its row as COPY takes it: the columns' values in order, read
    from the record's `__dict__` (where pydantic keeps its fields) with one C-level getter, each
    decimal as `str(decimal)` (None stays None, for the target's NOT NULL to refuse), the exact
    text that PostgreSQL's numeric input reads back.

    Generated, like `collections.namedtuple`'s methods, because it runs for every row: one call
    that unpacks and rebuilds the tuple adds ~1.1 µs to a 14-column row of 7 decimals, where
    converting column by column (transposing the batch and back) added ~2, and a converter call
    per value ~3.4; reading the fields through `__dict__` costs ~0.6 µs less than `attrgetter`.
    Its source is made of positions only (`v0`, `v1`, ...), never of DSL names.
    """
    values = [f"v{position}" for position in range(len(shapes))]
    converted = [
        f"None if {value} is None else str({value})" if shape.kind == "decimal" else value
        for value, shape in zip(values, shapes, strict=True)
    ]
    read = "read(record.__dict__)" if len(shapes) > 1 else "(read(record.__dict__),)"
    source = "\n".join(
        [
            "def row(record):",
            f"    ({', '.join(values)},) = {read}",
            f"    return ({', '.join(converted)},)",
        ]
    )
    namespace: dict[str, Any] = {"read": itemgetter(*(shape.name for shape in shapes))}
    exec(source, namespace)  # positions only: no outside text reaches the source
    function: Callable[[StreamRecord], Row] = namespace["row"]
    return function
