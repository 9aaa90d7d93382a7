"""The wire format of record topics: UTF-8 JSON, decimals as strings, timestamps as RFC 3339.

Decoding never raises anything but `RecordRejected`, whose `reason` is what a dead-letter record
carries, so a consumer can dead-letter any bad message without guessing at exception types.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, TypeVar, cast

from pydantic import ValidationError

from models.dsl import StreamRecord

R = TypeVar("R", bound=StreamRecord)
MAX_MESSAGE_BYTES = 64 * 1024  # a record is well under 1 KiB; anything this large is junk


class RecordRejected(ValueError):
    """A message that is not a valid record of the expected type."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode_record(record: StreamRecord) -> bytes:
    return record.__pydantic_serializer__.to_json(record)


def plain_decimal(value: Decimal) -> str:
    """Plain notation ('2500000000000', '0.00000001'; not '2.5E+12', '1E-8'): exact, and the same
    whichever source (the wire's JSON or PostgreSQL's text) the value came from."""
    return format(value, "f")


def plain_json(record: StreamRecord) -> dict[str, Any]:
    """The record's JSON form (RFC 3339 times, decimal strings), decimals in plain notation."""
    shown = record.model_dump(mode="json")
    for shape in record.shapes():
        value = getattr(record, shape.name)
        if shape.kind == "decimal" and value is not None:
            shown[shape.name] = plain_decimal(value)
    return shown


def decode_record(record_type: type[R], raw: bytes | None) -> R:
    if raw is None:
        raise RecordRejected("empty message (null value)")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise RecordRejected(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        # What `model_validate_json` calls, without its per-call argument checks (~0.5 µs of
        # every message; the counterpart of `encode_record`'s serializer).
        return cast(R, record_type.__pydantic_validator__.validate_json(raw))
    except ValidationError as error:
        raise RecordRejected(describe_validation_error(error)) from None


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, naming the field, without echoing the (possibly huge) input."""
    problems = []
    for item in error.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in item["loc"]) or "message"
        problems.append(f"{where}: {item['msg']}")
    return "; ".join(problems)
