"""Hypothesis strategies for DSL records: any valid value of every field shape."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

from models.dsl import StreamRecord
from models.types import FieldShape


@st.composite
def exact_decimals(draw: st.DrawFn, signed: bool) -> Decimal:
    """Any value of DECIMAL(76, 38), written plainly or with a positive exponent."""
    if draw(st.booleans()):
        scale = draw(st.integers(0, 38))
        digits = draw(st.integers(0, 10 ** (38 + scale) - 1))
        text = f"{digits}E-{scale}"
    else:
        text = f"{draw(st.integers(0, 10**17 - 1))}E+{draw(st.integers(0, 21))}"
    value = Decimal(text)
    return value.copy_negate() if signed and draw(st.booleans()) else value  # `-` would round


ZONES = st.builds(timezone, st.timedeltas(timedelta(hours=-14), timedelta(hours=14)))


def values_for(shape: FieldShape) -> st.SearchStrategy[Any]:
    base: st.SearchStrategy[Any] = {
        "decimal": exact_decimals(signed=not shape.non_negative),
        "timestamp": st.datetimes(datetime(1900, 1, 1), datetime(2200, 1, 1), timezones=ZONES),
        "text": st.text(
            st.characters(exclude_categories=("Cc", "Cs")),
            min_size=shape.min_length or 0,
            max_size=shape.max_length,
        ),
        "integer": st.integers(0, 2**63 - 1),
    }[shape.kind]
    return st.none() | base if shape.nullable else base


def valid(record_type: type[StreamRecord]) -> st.SearchStrategy[StreamRecord]:
    fields = {shape.name: values_for(shape) for shape in record_type.shapes()}
    return st.builds(record_type, **fields)
