"""Avro schemas (`.avsc`) of the records, and an exact binary encoding that uses them.

Avro's `decimal` stores an unscaled integer at the schema's fixed scale. avro 1.12's writer takes
the unscaled digits straight from the Decimal's tuple and ignores its exponent (it only refuses
exponents below -scale), so `6.31917E-7` would be read back as 6.31917E-33 and 1E+15 as 1E-38.
Every decimal is therefore quantized to `DECIMAL_SCALE` first, exactly (rounding raises).
"""

from __future__ import annotations

import inspect
import io
import json
from decimal import Decimal
from functools import cache
from typing import Any, TypeVar, cast

import avro.io
import avro.schema

from models.dsl import StreamRecord
from models.types import DECIMAL_CONTEXT, DECIMAL_QUANTUM, TYPE_MAP, FieldShape

NAMESPACE = "qicore.models"
R = TypeVar("R", bound=StreamRecord)


def avro_schema(record: type[StreamRecord]) -> dict[str, Any]:
    """The Avro record schema of `record`: optional fields are `["null", T]` defaulting to null."""
    return {
        "type": "record",
        "name": record.__name__,
        "namespace": NAMESPACE,
        "doc": inspect.cleandoc(record.__doc__ or record.__name__),
        "fields": [_field(shape) for shape in record.shapes()],
    }


def _field(shape: FieldShape) -> dict[str, Any]:
    avro_type = TYPE_MAP[shape.kind].avro
    field: dict[str, Any] = {"name": shape.name}
    if shape.description:
        field["doc"] = shape.description
    if shape.nullable:
        field["type"] = ["null", avro_type]
        field["default"] = None
    else:
        field["type"] = avro_type
    return field


@cache
def parsed_schema(record: type[StreamRecord]) -> avro.schema.RecordSchema:
    return cast(avro.schema.RecordSchema, avro.schema.parse(json.dumps(avro_schema(record))))


def encode_avro(record: StreamRecord) -> bytes:
    """The record as a schemaless Avro binary datum (the writer's schema is `avro_schema`)."""
    datum = {name: _to_avro(value) for name, value in record}
    buffer = io.BytesIO()
    avro.io.DatumWriter(parsed_schema(type(record))).write(datum, avro.io.BinaryEncoder(buffer))
    return buffer.getvalue()


def decode_avro(record_type: type[R], data: bytes) -> R:
    """Read one datum written by `encode_avro`; trailing bytes mean a wrong schema and raise."""
    buffer = io.BytesIO(data)
    reader = avro.io.DatumReader(parsed_schema(record_type))
    datum = cast(dict[str, object], reader.read(avro.io.BinaryDecoder(buffer)))
    if buffer.tell() != len(data):
        raise ValueError(
            f"{len(data) - buffer.tell()} bytes left over after a {record_type.__name__} datum"
        )
    return record_type.model_validate({name: _from_avro(value) for name, value in datum.items()})


def _to_avro(value: object) -> object:
    if isinstance(value, Decimal):
        scaled = value.quantize(DECIMAL_QUANTUM, context=DECIMAL_CONTEXT)
        # avro 1.12 writes a negative zero as -2E-38; a zero's sign carries nothing anyway.
        return scaled.copy_abs() if scaled.is_zero() else scaled
    return value


def _from_avro(value: object) -> object:
    """Drop the trailing zeros of the fixed scale, so 6.31917E-7 reads back as it was written."""
    if isinstance(value, Decimal):
        normal = value.normalize(DECIMAL_CONTEXT)
        exponent = normal.as_tuple().exponent
        assert isinstance(exponent, int)  # decoded decimals are finite
        return normal.quantize(Decimal(1), context=DECIMAL_CONTEXT) if exponent > 0 else normal
    return value
