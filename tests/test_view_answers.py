"""The views' shared answers as clients get them (in-process, over a real PostgreSQL): gzipped
only for clients that accept it, the same JSON either way, and errors never reused."""

from __future__ import annotations

import gzip
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest

from tables.views import accepts_gzip
from testkit.databases import write_records
from testkit.records import price

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


async def test_gzip_only_when_accepted_and_the_same_json(
    web: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await write_records(pool, [price("bitcoin", "0.00000001", T0), price("tiny", "1E-8", T0)])
    plain = await web.get("/prices", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert plain.headers["content-type"] == "application/json; charset=utf-8"
    async with web.stream("GET", "/prices", headers={"Accept-Encoding": "gzip, br"}) as zipped:
        assert zipped.headers["content-encoding"] == "gzip"
        assert zipped.headers["vary"] == "Accept-Encoding"
        wire = b"".join([chunk async for chunk in zipped.aiter_raw()])
    assert len(wire) < len(plain.content)
    assert gzip.decompress(wire) == plain.content
    assert plain.json()["prices"]["tiny"]["usd_price"] == "0.00000001"  # plain notation


async def test_an_unknown_coin_is_not_reused_once_it_has_a_price(
    web: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    assert (await web.get("/prices/dogecoin")).status_code == 404
    await write_records(pool, [price("dogecoin", "0.1", T0)])
    assert (await web.get("/prices/dogecoin")).json()["price"]["usd_price"] == "0.1"


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        ("gzip", True),
        ("deflate, GZIP;q=0.5", True),
        ("gzip;q=0", False),
        ("gzip; q=0.0", False),
        ("identity", False),
        ("x-gzip-like", False),
        ("", False),
    ],
)
def test_accepts_gzip(header: str, accepted: bool) -> None:
    assert accepts_gzip(header) is accepted
