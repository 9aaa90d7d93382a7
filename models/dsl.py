"""The record DSL: typed records that declare their topic and table in one place.

A record class is the single source of truth. Its fields (with the annotated types in
`models.types`) and its `topic`/`table` specs are all that the generators in `generators/`, the
topic declarations in `app/` and the sink in `agents/` read. Specs are checked when the class is
defined, so a bad identifier fails at import with a message naming the record and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from models.types import DSLError, FieldShape, shape_of

# PostgreSQL's reserved key words (SQL Key Words appendix, "reserved" and "reserved (can be
# function or type)"). A column named like one of these only works quoted, which every user's
# ad-hoc query would trip over, so the DSL refuses them outright.
SQL_RESERVED = frozenset(
    """
    all analyse analyze and any array as asc asymmetric authorization binary both case cast check
    collate collation column concurrently constraint create cross current_catalog current_date
    current_role current_schema current_time current_timestamp current_user default deferrable
    desc distinct do else end except false fetch for foreign freeze from full grant group having
    ilike in initially inner intersect into is isnull join lateral leading left like limit
    localtime localtimestamp natural not notnull null offset on only or order outer overlaps
    placing primary references returning right select session_user similar some symmetric
    system_user table tablesample then to trailing true union unique user using variadic verbose
    when where window with
    """.split()
)
# System columns every PostgreSQL table already has.
SQL_SYSTEM_COLUMNS = frozenset({"tableoid", "xmin", "cmin", "xmax", "cmax", "ctid"})
_SQL_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")
_TOPIC_NAME = re.compile(r"^[a-zA-Z0-9._-]+$")
PG_MAX_IDENTIFIER_BYTES = 63


def check_sql_identifier(name: str, what: str) -> str:
    """Return `name` if it is a plain, unreserved, lower-case SQL identifier; raise otherwise."""
    if len(name.encode()) > PG_MAX_IDENTIFIER_BYTES:
        raise DSLError(
            f"{what} {name!r} is {len(name.encode())} bytes; PostgreSQL truncates identifiers "
            f"longer than {PG_MAX_IDENTIFIER_BYTES} bytes"
        )
    if not _SQL_IDENTIFIER.match(name):
        raise DSLError(
            f"{what} {name!r} must be snake_case: a lower-case letter or underscore, then "
            "lower-case letters, digits or underscores (no quotes, spaces or capitals)"
        )
    if name in SQL_RESERVED:
        raise DSLError(f"{what} {name!r} is a reserved SQL key word; choose another name")
    if name in SQL_SYSTEM_COLUMNS:
        raise DSLError(f"{what} {name!r} clashes with a PostgreSQL system column")
    return name


def quote_ident(name: str) -> str:
    """Quote an identifier that `check_sql_identifier` accepted (the quotes are belt and braces)."""
    return '"' + name + '"'


CleanupPolicy = Literal["delete", "compact", "compact,delete"]


@dataclass(frozen=True)
class TopicSpec:
    """Where a record type travels: its Kafka/Redpanda topic and how that topic is configured."""

    name: str
    key_field: str
    partitions: int
    retention: timedelta | None  # None keeps messages forever
    cleanup_policy: CleanupPolicy = "delete"
    replication_factor: int = 3  # for the operator's file; the app uses TOPIC_REPLICATION_FACTOR

    @property
    def retention_ms(self) -> int:
        return -1 if self.retention is None else int(self.retention.total_seconds() * 1000)

    @property
    def dead_letter_name(self) -> str:
        return f"{self.name}.dlq"


@dataclass(frozen=True)
class TableSpec:
    """Where a record type rests: its hypertable, keys and TimescaleDB policies."""

    name: str
    time_column: str
    primary_key: tuple[str, ...]
    chunk_interval: timedelta
    segment_by: tuple[str, ...] = ()
    compress_after: timedelta | None = None
    retain_for: timedelta | None = None
    # Extra secondary indexes (column tuples). The hypertable's own (time DESC) index and the
    # primary key's index already exist: declare only access paths those do not serve.
    indexes: tuple[tuple[str, ...], ...] = field(default_factory=tuple)


class StreamRecord(BaseModel):
    """Base of every DSL record. Subclasses set `topic` and `table`; fields are the columns."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: ClassVar[TopicSpec]
    table: ClassVar[TableSpec]

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: object) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "topic" in cls.__dict__ or "table" in cls.__dict__:
            validate_record(cls)

    @classmethod
    def shapes(cls) -> list[FieldShape]:
        """Field shapes in declaration order: what every generator maps from."""
        return [shape_of(cls.__name__, name, info) for name, info in cls.model_fields.items()]

    def key(self) -> bytes:
        """The message key: the topic's key field, so one coin's updates stay in order."""
        return str(getattr(self, self.topic.key_field)).encode()

    def event_time(self) -> datetime:
        """The record's own time (its table's time column): what dedupe and "newest" compare."""
        moment = getattr(self, self.table.time_column)
        assert isinstance(moment, datetime)  # validate_record checks it is a timestamp
        return moment


def validate_record(cls: type[StreamRecord]) -> None:
    """Check a record's declaration; raise `DSLError` naming the record and the problem."""
    where = cls.__name__
    for attr in ("topic", "table"):
        if attr not in cls.__dict__:
            raise DSLError(f"{where} must declare both `topic` and `table`")
    table, topic = cls.table, cls.topic
    check_sql_identifier(table.name, f"{where}: table name")
    columns: list[str] = []
    for name, info in cls.model_fields.items():
        if info.alias is not None or info.validation_alias is not None:
            raise DSLError(f"{where}.{name}: aliases are not allowed (wire name = column name)")
        columns.append(check_sql_identifier(name, f"{where}: field"))
        shape_of(where, name, info)  # raises for unmappable types
    generated = {f"{table.name}_pkey"} | {index_name(table.name, cols) for cols in table.indexes}
    if len(generated) != 1 + len(table.indexes):
        raise DSLError(f"{where}: two indexes would get the same name")
    for generated_name in generated:
        check_sql_identifier(generated_name, f"{where}: generated index name")

    def known(cols: tuple[str, ...], what: str) -> None:
        for col in cols:
            if col not in columns:
                raise DSLError(f"{where}: {what} names {col!r}, which is not a field")

    known((table.time_column,), "time_column")
    known(table.primary_key, "primary_key")
    known(table.segment_by, "segment_by")
    for cols in table.indexes:
        known(cols, "an index")
    if table.time_column not in table.primary_key:
        raise DSLError(
            f"{where}: primary key {table.primary_key} must contain the time column "
            f"{table.time_column!r} (TimescaleDB requires it of every unique index)"
        )
    if len(set(table.primary_key)) != len(table.primary_key):
        raise DSLError(f"{where}: primary key repeats a column")
    by_name = {shape.name: shape for shape in cls.shapes()}
    if by_name[table.time_column].kind != "timestamp":
        raise DSLError(f"{where}: time column {table.time_column!r} must be a timestamp")
    for col in table.primary_key:
        if by_name[col].nullable:
            raise DSLError(f"{where}: primary-key field {col!r} cannot be optional")
    if not _TOPIC_NAME.match(topic.name) or len(topic.name) > 249 or topic.name in {".", ".."}:
        raise DSLError(f"{where}: topic name {topic.name!r} is not a valid Kafka topic name")
    known((topic.key_field,), "topic key_field")
    if topic.partitions < 1 or topic.replication_factor < 1:
        raise DSLError(f"{where}: partitions and replication_factor must be at least 1")


def index_name(table: str, columns: tuple[str, ...]) -> str:
    return f"{table}_{'_'.join(columns)}_idx"


def check_registry(records: tuple[type[StreamRecord], ...]) -> None:
    """Records must not share a table or topic name: that is a clash the DDL would hide."""
    for attr in ("table", "topic"):
        seen: dict[str, str] = {}
        for record in records:
            name = getattr(record, attr).name
            if name in seen:
                raise DSLError(f"{record.__name__} and {seen[name]} both use {attr} {name!r}")
            seen[name] = record.__name__
