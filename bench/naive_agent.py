"""Baseline (b): a naive Faust agent, one INSERT per event (`faust -A bench.naive_agent worker`).

The same topic, decode and table as the real sink, with `async for` (acknowledged per event) and
one `INSERT ... ON CONFLICT DO NOTHING` with bound parameters per event: what a first Faust sink
usually looks like.
"""

from __future__ import annotations

import asyncpg
import faust

from bench.common import plain_app
from models.codec import decode_record
from models.dsl import quote_ident
from models.market import CryptoPriceData

app, settings = plain_app()
topic = app.topic(CryptoPriceData.topic.name, key_serializer="raw", value_serializer="raw")
COLUMNS = tuple(shape.name for shape in CryptoPriceData.shapes())
INSERT = (
    f"INSERT INTO {quote_ident(CryptoPriceData.table.name)} "  # noqa: S608
    f"({', '.join(quote_ident(c) for c in COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(COLUMNS) + 1))}) ON CONFLICT DO NOTHING"
)


@app.agent(topic)
async def insert_each(stream: faust.StreamT[bytes]) -> None:
    connection = await asyncpg.connect(settings.database_dsn)
    async for raw in stream:
        record = decode_record(CryptoPriceData, raw)
        await connection.execute(INSERT, *(getattr(record, c) for c in COLUMNS))
