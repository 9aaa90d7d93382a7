"""Field types of the DSL and the one table that maps them to SQL, JSON Schema and Avro.

Money is `Decimal` end to end: JSON carries it as a string (a JSON number is a float to most
parsers), Avro as `bytes`/`decimal`, PostgreSQL as unconstrained `numeric` (a `NUMERIC(p,s)`
column would silently round; instead validation rejects what does not fit the declared scale).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import MAX_PREC, Context, Decimal, Inexact, InvalidOperation
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, MaxLen, MinLen
from pydantic import AfterValidator, BeforeValidator, Field
from pydantic.fields import FieldInfo
from pydantic_core import TzInfo

# Every decimal in the DSL fits DECIMAL(76, 38), BigQuery's BIGNUMERIC: 38 integer digits (market
# caps reach 1e18) and 38 fractional digits (a 17-significant-digit price of 1e-20 still fits).
DECIMAL_PRECISION = 76
DECIMAL_SCALE = 38
DECIMAL_PATTERN = r"^-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$"
MAX_TEXT_LENGTH = 256
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"
BIGINT_MAX = 2**63 - 1  # PostgreSQL bigint and Avro long
# Fitting DECIMAL(76, 38) exactly is quantizing to 38 places in a 76-digit context without
# rounding (Inexact) or overflowing the precision (InvalidOperation). The Avro encoder quantizes
# with the same two.
DECIMAL_QUANTUM = Decimal(1).scaleb(-DECIMAL_SCALE)
DECIMAL_CONTEXT = Context(prec=DECIMAL_PRECISION, traps=[InvalidOperation, Inexact])
# normalize() rounds to its context's precision (28 digits by default): count digits exactly.
_UNLIMITED = Context(prec=MAX_PREC)


@dataclass(frozen=True)
class ExactDecimal:
    """Marks a Decimal field; `non_negative` forbids values below zero (prices, volumes)."""

    non_negative: bool

    def __call__(self, value: Decimal) -> Decimal:
        if not value.is_finite():
            raise ValueError("must be a finite number (NaN and infinities are not prices)")
        if self.non_negative and value < 0:
            raise ValueError("must not be negative")
        try:
            # Runs for every decimal of every message: one C call, no digit tuple.
            value.quantize(DECIMAL_QUANTUM, context=DECIMAL_CONTEXT)
        except ArithmeticError:
            raise ValueError(_misfit(value)) from None
        return value


def _misfit(value: Decimal) -> str:
    """Why a finite decimal does not fit DECIMAL(76, 38), with its digits counted exactly."""
    problem = f"does not fit DECIMAL({DECIMAL_PRECISION}, {DECIMAL_SCALE}) exactly"
    try:
        normal = value.normalize(_UNLIMITED)
    except ArithmeticError:  # an exponent beyond any context, e.g. 1E+999999999
        return problem
    exponent = normal.as_tuple().exponent
    assert isinstance(exponent, int)  # finite values have an int exponent
    fractional = max(-exponent, 0)
    integer = max(normal.adjusted() + 1, 0)
    return f"{problem} ({integer} integer and {fractional} fractional digits)"


def _no_float(value: Any) -> Any:
    """Refuse binary floats: by the time a value is a float its exact decimal is already lost.

    Runs for every decimal of every message: the wire's strings return at once, and the check is
    against a tuple, not a `float | bool` union (~0.2 µs less per call on Python 3.11)."""
    if type(value) is str:
        return value
    if isinstance(value, (float, bool)):
        raise ValueError(
            "pass a Decimal or a decimal string, not a float (JSON numbers lose precision)"
        )
    return value


def _aware_utc(value: datetime) -> datetime:
    tzinfo = value.tzinfo
    # Parsed from JSON, a time with an offset has pydantic's fixed-offset TzInfo, whose offset is
    # never None: asking it costs ~0.6 µs per timestamp of every message, so it is asked only of
    # other time zones.
    if tzinfo is None or (type(tzinfo) is not TzInfo and value.utcoffset() is None):
        raise ValueError("must be timezone-aware (naive datetimes are ambiguous)")
    return value.astimezone(UTC)


# The bound `__call__`, not the instance: pydantic calls a bound method faster than an instance's
# `__call__` slot (~0.05 µs per decimal of every message); `_exact_decimal` finds the instance.
Price = Annotated[Decimal, BeforeValidator(_no_float), AfterValidator(ExactDecimal(True).__call__)]
SignedDecimal = Annotated[
    Decimal, BeforeValidator(_no_float), AfterValidator(ExactDecimal(False).__call__)
]


def _no_number(value: Any) -> Any:
    """Epoch numbers are ambiguous (seconds or milliseconds?): the wire carries RFC 3339 text.
    The wire's strings return at once, as in `_no_float`."""
    if type(value) is str:
        return value
    if isinstance(value, (int, float)):
        raise ValueError("must be an RFC 3339 date-time string, not a number")
    return value


Timestamp = Annotated[datetime, BeforeValidator(_no_number), AfterValidator(_aware_utc)]
# No control characters: PostgreSQL text refuses NUL, and one such value would fail a whole batch.
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_LENGTH, pattern=TEXT_PATTERN)]
Count = Annotated[int, Field(ge=0, le=BIGINT_MAX)]

Kind = Literal["decimal", "timestamp", "text", "integer"]


@dataclass(frozen=True)
class FieldShape:
    """What the generators need to know of one field, read from its annotation."""

    name: str
    kind: Kind
    nullable: bool
    non_negative: bool = False
    min_length: int | None = None
    max_length: int | None = None
    description: str | None = None


@dataclass(frozen=True)
class TypeMapping:
    sql: str
    json_schema: dict[str, Any]
    avro: Any


# The one type-mapping table. Everything that turns a field into DDL or a schema reads it.
TYPE_MAP: dict[Kind, TypeMapping] = {
    "decimal": TypeMapping(
        sql="numeric",
        json_schema={
            "type": "string",
            "pattern": DECIMAL_PATTERN,
            "contentMediaType": "application/x-decimal",
            "x-precision": DECIMAL_PRECISION,
            "x-scale": DECIMAL_SCALE,
        },
        avro={
            "type": "bytes",
            "logicalType": "decimal",
            "precision": DECIMAL_PRECISION,
            "scale": DECIMAL_SCALE,
        },
    ),
    "timestamp": TypeMapping(
        sql="timestamptz",
        json_schema={"type": "string", "format": "date-time"},
        avro={"type": "long", "logicalType": "timestamp-micros"},
    ),
    "text": TypeMapping(
        sql="text", json_schema={"type": "string", "pattern": TEXT_PATTERN}, avro="string"
    ),
    "integer": TypeMapping(
        sql="bigint", json_schema={"type": "integer", "maximum": BIGINT_MAX}, avro="long"
    ),
}


class DSLError(ValueError):
    """A record declaration the generators cannot turn into safe DDL, topics or schemas."""


_KINDS: dict[type, Kind] = {Decimal: "decimal", datetime: "timestamp", str: "text", int: "integer"}


def shape_of(record: str, name: str, info: FieldInfo) -> FieldShape:
    """Read a field's kind, optionality and constraints; raise for types the DSL cannot map."""
    annotation, nullable = _strip_optional(info.annotation)
    metadata = list(info.metadata)
    if get_origin(annotation) is Annotated:
        base, *extra = get_args(annotation)
        for item in extra:
            metadata.extend(item.metadata if isinstance(item, FieldInfo) else [item])
        annotation = base
    kind = _KINDS.get(annotation) if isinstance(annotation, type) else None
    if kind is None or annotation is bool:
        raise DSLError(
            f"{record}.{name}: type {annotation!r} has no mapping; use Price, SignedDecimal, "
            "Timestamp, Text or Count from models.types"
        )
    if kind == "decimal" and not any(isinstance(m, AfterValidator) for m in metadata):
        raise DSLError(f"{record}.{name}: plain Decimal is unchecked; use Price or SignedDecimal")
    if kind == "timestamp" and not any(isinstance(m, AfterValidator) for m in metadata):
        raise DSLError(f"{record}.{name}: plain datetime allows naive values; use Timestamp")
    non_negative = any(
        (check := _exact_decimal(m)) is not None and check.non_negative for m in metadata
    ) or any(isinstance(m, Ge) and m.ge == 0 for m in metadata)
    min_length = next((m.min_length for m in metadata if isinstance(m, MinLen)), None)
    max_length = next((m.max_length for m in metadata if isinstance(m, MaxLen)), None)
    if nullable and info.default is not None:
        raise DSLError(f"{record}.{name}: an optional field must default to None")
    return FieldShape(
        name=name,
        kind=kind,
        nullable=nullable,
        non_negative=non_negative,
        min_length=min_length,
        max_length=max_length,
        description=info.description,
    )


def _exact_decimal(item: Any) -> ExactDecimal | None:
    """The ExactDecimal an annotation item applies (as its bound `__call__`), if any."""
    if isinstance(item, AfterValidator):
        check = getattr(item.func, "__self__", item.func)
        if isinstance(check, ExactDecimal):
            return check
    return None


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(args) < len(get_args(annotation)):
            return args[0], True
    return annotation, False
