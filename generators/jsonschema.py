"""JSON Schema (draft 2020-12) of each record's wire form, as `models.codec` writes it.

The encoder always writes every field (optional ones as `null`), so every field is required and
nothing else is allowed. Decimals travel as strings: the schema pins their syntax, not their
scale, which only the record's own validation checks exactly.
"""

from __future__ import annotations

import inspect
from typing import Any

from models.dsl import StreamRecord
from models.types import TYPE_MAP, FieldShape

DIALECT = "https://json-schema.org/draft/2020-12/schema"
# The decimal pattern allows a sign; a non-negative field also refuses a '-' before any non-zero
# digit ("-0" stays valid, as it is for the record itself).
NEGATIVE_DECIMAL_PATTERN = r"^-[0.]*[1-9]"


def json_schema(record: type[StreamRecord]) -> dict[str, Any]:
    """The schema of `record`'s JSON messages, with its topic and table under `x-qicore`."""
    shapes = record.shapes()
    topic, table = record.topic, record.table
    return {
        "$schema": DIALECT,
        "title": record.__name__,
        "description": inspect.cleandoc(record.__doc__ or record.__name__),
        "type": "object",
        "properties": {shape.name: _field_schema(shape) for shape in shapes},
        "required": [shape.name for shape in shapes],
        "additionalProperties": False,
        "x-qicore": {
            "record": record.__name__,
            "topic": topic.name,
            "key_field": topic.key_field,
            "table": table.name,
            "time_column": table.time_column,
            "primary_key": list(table.primary_key),
        },
    }


def _field_schema(shape: FieldShape) -> dict[str, Any]:
    schema = dict(TYPE_MAP[shape.kind].json_schema)
    if shape.kind == "decimal" and shape.non_negative:
        schema["not"] = {"pattern": NEGATIVE_DECIMAL_PATTERN}
    if shape.kind == "integer" and shape.non_negative:
        schema["minimum"] = 0
    if shape.min_length is not None:
        schema["minLength"] = shape.min_length
    if shape.max_length is not None:
        schema["maxLength"] = shape.max_length
    if shape.nullable:
        schema = {"anyOf": [schema, {"type": "null"}]}
    if shape.description:
        schema["description"] = shape.description
    return schema
