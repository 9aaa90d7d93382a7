"""Bad input never crashes anything and is never silently dropped.

- Decoders: generated junk (any bytes, any JSON, valid records with one field spoiled, NaN and
  huge exponents, deep nesting) only ever becomes a record or a `RecordRejected` with a reason.
- CoinGecko parsers: rows shaped like CoinGecko's with any type in any field; every row is
  either a record or a counted, described skip.
- End to end, one worker for the module: junk of kinds `test_sink` does not send, on every record
  topic, is dead-lettered with its origin in headers and counted in /health, while the good
  records around it are stored; malicious requests to the web views get a 4xx and change nothing.
- CoinGecko faults the poller must ride out, saying what happened.
- `schema generate --root` writes nowhere but the generated files under that root.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from coingecko.fake_server import FakeCoinGecko, body, rate_limited, slow
from coingecko.fake_server import truncated_json as truncated
from coingecko.parse import Parsed, loads_exact, parse_global, parse_markets, parse_ohlc
from generators.artifacts import artifacts
from local.embedded import EmbeddedBroker
from models import RECORDS, CryptoMarketAnalytics, CryptoOHLCVData, CryptoPriceData, StreamRecord
from models.codec import MAX_MESSAGE_BYTES, RecordRejected, decode_record, encode_record
from models.dsl import quote_ident
from testkit.databases import count_rows, create_database, drop_database
from testkit.pollers import BrokerTopics, make_poller
from testkit.strategies import valid
from testkit.workers import Family, Kafka, Worker, eventually

# The module-scoped `pipeline` worker: one xdist process runs every test that uses it.
pytestmark = pytest.mark.xdist_group("test_bad_input")

NOW = datetime(2024, 5, 1, 12, tzinfo=UTC)
# Strings that have broken decimal and date parsers: NaN spellings, exponents beyond any decimal
# context, signed zeros, naive and out-of-range times, control characters.
NASTY_STRINGS = st.sampled_from(
    [
        "NaN",
        "-NaN",
        "sNaN",
        "Infinity",
        "-Infinity",
        "inf",
        "1e999999999",
        "-1e999999999",
        "1e-999999999",
        "1e999999999999999999999",
        "0E-999999999",
        "-0",
        "1E+38",
        "1E-39",
        "",
        " 1",
        "1_000",
        "0x10",
        "\x00",
        "2024-05-01T00:00:00",
        "99999-01-01T00:00:00Z",
        "2024-02-30T00:00:00Z",
        "1" * 5000,
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**100), max_value=10**100)
    | st.floats(allow_nan=True, allow_infinity=True)  # json.dumps writes NaN/Infinity literals
    | st.text(max_size=20)
    | NASTY_STRINGS
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
RECORD_TYPES = st.sampled_from(RECORDS)
FUZZ = hypothesis_settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def decode_or_reject(record_type: type[StreamRecord], raw: bytes | None) -> StreamRecord | None:
    """The decoder's contract: a record that survives a round trip, or a reason; nothing else."""
    try:
        record = decode_record(record_type, raw)
    except RecordRejected as rejected:
        assert rejected.reason.strip(), "a rejection must say why"
        return None
    assert decode_record(record_type, encode_record(record)) == record
    return record


# --- decoders -------------------------------------------------------------------------------


@FUZZ
@given(RECORD_TYPES, st.binary(max_size=512))
def test_any_bytes_decode_or_are_rejected(record_type: type[StreamRecord], raw: bytes) -> None:
    decode_or_reject(record_type, raw)


@FUZZ
@given(RECORD_TYPES, JUNK)
def test_any_json_document_decodes_or_is_rejected(
    record_type: type[StreamRecord], document: Any
) -> None:
    decode_or_reject(record_type, json.dumps(document).encode())


@FUZZ
@given(st.data())
def test_a_valid_record_with_one_field_spoiled(data: st.DataObject) -> None:
    record = data.draw(st.one_of([valid(record_type) for record_type in RECORDS]))
    record_type = type(record)
    document = json.loads(encode_record(record))
    field = data.draw(st.sampled_from([*record_type.model_fields, "unknown_extra_field"]))
    document[field] = data.draw(JUNK)
    decoded = decode_or_reject(record_type, json.dumps(document).encode())
    if field == "unknown_extra_field":
        assert decoded is None  # records forbid fields they do not declare


def decimal_fields(record_type: type[StreamRecord]) -> list[str]:
    return [shape.name for shape in record_type.shapes() if shape.kind == "decimal"]


@pytest.mark.parametrize(
    "value",
    ["NaN", "Infinity", "-Infinity", "1e999999999", "-1e999999999", "1e-999999999", "1e9999999999"],
)
@pytest.mark.parametrize("record_type", RECORDS, ids=lambda r: r.__name__)
def test_non_finite_and_huge_exponent_decimals_are_rejected_by_name(
    record_type: type[StreamRecord], value: str
) -> None:
    record = sample(record_type)
    for field in decimal_fields(record_type):
        document = {**json.loads(encode_record(record)), field: value}
        with pytest.raises(RecordRejected) as rejected:
            decode_record(record_type, json.dumps(document).encode())
        assert rejected.value.reason.startswith(f"{field}: ")


def sample(record_type: type[StreamRecord]) -> StreamRecord:
    """One fixed valid record per type (hypothesis' `example()` is not for use in tests)."""
    base: dict[str, Any] = {
        CryptoPriceData: {"coin_id": "b", "symbol": "b", "name": "B", "usd_price": "1"},
        CryptoOHLCVData: {
            "coin_id": "b",
            "symbol": "b",
            "open": "1",
            "high": "1",
            "low": "1",
            "close": "1",
            "timeframe": "30m",
        },
        CryptoMarketAnalytics: {},
    }[record_type]
    return record_type.model_validate({**base, record_type.table.time_column: NOW})


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[" * (MAX_MESSAGE_BYTES - 1), "recursion limit"),
        (b'{"a":' * 10_000, "recursion limit"),
        (b'{"coin_id": "\xff\xfe"}', "Invalid JSON"),  # not UTF-8
        (b'{"coin_id": "\\udc80"}', "Invalid JSON"),  # a lone surrogate
        (b"\xef\xbb\xbf{}", "Invalid JSON"),  # a byte-order mark
        (b"", "Invalid JSON"),
        (b"null", "message: Input should be an object"),
    ],
)
def test_hostile_documents_are_rejected(raw: bytes, reason: str) -> None:
    for record_type in RECORDS:
        with pytest.raises(RecordRejected, match=reason):
            decode_record(record_type, raw)


def test_a_valid_record_padded_past_the_limit_is_rejected_unparsed() -> None:
    raw = encode_record(sample(CryptoPriceData))
    padded = raw[:-1] + b" " * MAX_MESSAGE_BYTES + b"}"
    with pytest.raises(RecordRejected, match=f"exceeds {MAX_MESSAGE_BYTES}"):
        decode_record(CryptoPriceData, padded)


# --- CoinGecko parsers ----------------------------------------------------------------------

EXACT_NUMBERS = st.decimals(allow_nan=False, allow_infinity=False) | st.integers(-(10**30), 10**30)
NUMBER_OR_JUNK = EXACT_NUMBERS | st.none() | JUNK
ISO_TIMES = st.sampled_from(
    ["2025-03-14T10:15:07.311Z", "2025-03-14T10:15:07+02:00", "2025-03-14T10:15:07", "1900-01-01Z"]
)
MARKET_ROW = st.fixed_dictionaries(
    {},
    optional={
        "id": st.sampled_from(["bitcoin", "ethereum", ""]) | JUNK,
        "symbol": st.sampled_from(["btc", "eth"]) | JUNK,
        "name": st.sampled_from(["Bitcoin", "Ether"]) | JUNK,
        "current_price": NUMBER_OR_JUNK,
        "market_cap": NUMBER_OR_JUNK,
        "total_volume": NUMBER_OR_JUNK,
        "price_change_percentage_24h": NUMBER_OR_JUNK,
        "price_change_percentage_7d_in_currency": NUMBER_OR_JUNK,
        "last_updated": ISO_TIMES | JUNK,
        "renamed_field": JUNK,
    },
)
SECONDS = st.integers(1_230_000_000, 7_000_000_000) | NUMBER_OR_JUNK
GLOBAL_DATA = st.fixed_dictionaries(
    {},
    optional={
        "updated_at": SECONDS,
        "total_market_cap": st.fixed_dictionaries({}, optional={"usd": NUMBER_OR_JUNK}) | JUNK,
        "total_volume": st.fixed_dictionaries({}, optional={"usd": NUMBER_OR_JUNK}) | JUNK,
        "market_cap_percentage": st.fixed_dictionaries(
            {}, optional={"btc": NUMBER_OR_JUNK, "eth": NUMBER_OR_JUNK}
        )
        | JUNK,
        "active_cryptocurrencies": NUMBER_OR_JUNK,
        "markets": NUMBER_OR_JUNK,
        "market_cap_change_percentage_24h_usd": NUMBER_OR_JUNK,
    },
)
CANDLE = (
    st.tuples(
        st.integers(1_230_000_000_000, 7_000_000_000_000) | NUMBER_OR_JUNK,
        *[NUMBER_OR_JUNK] * 4,
    ).map(list)
    | st.lists(EXACT_NUMBERS, max_size=7)
    | JUNK
)


def skip_reports(problems: list[str]) -> int:
    return sum(problem.endswith("; skipped") for problem in problems)


@FUZZ
@given(st.lists(MARKET_ROW | JUNK, max_size=6))
def test_every_market_row_is_a_record_or_a_reported_skip(rows: list[Any]) -> None:
    parsed = parse_markets(rows)
    assert len(parsed.records) + parsed.skipped == len(rows)
    assert skip_reports(parsed.problems) == parsed.skipped
    for record in parsed.records:  # a record carries its row's exact values
        assert any(
            isinstance(row, dict)
            and row.get("id") == record.coin_id
            and isinstance(row.get("current_price"), int | Decimal)
            and Decimal(row["current_price"]) == record.usd_price
            for row in rows
        )


@FUZZ
@given(GLOBAL_DATA | JUNK)
def test_global_data_is_a_record_or_a_reported_skip(data: Any) -> None:
    parsed = parse_global({"data": data})
    if isinstance(data, dict):
        assert len(parsed.records) + parsed.skipped == 1
        assert skip_reports(parsed.problems) == parsed.skipped
    else:
        assert parsed.records == [] and parsed.problems


@FUZZ
@given(st.lists(CANDLE, max_size=6))
def test_every_candle_is_a_record_or_a_reported_skip(candles: list[Any]) -> None:
    parsed = parse_ohlc(candles, "bitcoin", "btc", 1)
    assert len(parsed.records) + parsed.skipped == len(candles)
    assert skip_reports(parsed.problems) == parsed.skipped


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        # Exponents a decimal context cannot hold, in every kind of field.
        (
            '[{"id": "b", "symbol": "b", "name": "b", "current_price": 1e999999999,'
            ' "last_updated": "2025-03-14T10:15:07Z"}]',
            "usd_price",
        ),
        ('{"data": {"updated_at": 1e999999999}}', "updated_at"),
        ('{"data": {"updated_at": 1700000000, "markets": 1e999999999}}', "markets"),
        ("[[1e999999999, 1, 1, 1, 1]]", "time"),
        ("[[1700000000000, 1, 1e999999999, 1, 1]]", "high"),
    ],
)
def test_huge_exponents_are_reported_not_raised(text: str, problem: str) -> None:
    parse: dict[str, Callable[[Any], Parsed[Any]]] = {
        "[{": parse_markets,
        '{"': parse_global,
        "[[": lambda b: parse_ohlc(b, "b", "b", 1),
    }
    parsed = parse[text[:2]](loads_exact(text))
    assert parsed.records == [] and parsed.skipped == 1
    assert problem in parsed.problems[0]


# --- CoinGecko faults: the poller rides them out and says what happened ----------------------


def fixture_text(name: str) -> str:
    return (resources.files("coingecko") / "fixtures" / name).read_text()


async def test_a_burst_of_429s_fails_one_cycle_and_the_next_recovers(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    poller = make_poller(fake_coingecko, topics)  # two attempts per call
    fake_coingecko.fail("/global", *[rate_limited(retry_after=1)] * 3)
    await poller.poll_global()
    status = poller.status.endpoints["global"]
    assert status.failures == 1 and "HTTP 429 rate limited" in (status.last_error or "")
    assert topics.published == 0
    await poller.poll_global()  # the third 429, then success
    assert status.last_success is not None and topics.published == 1
    assert fake_coingecko.count("/global") == 4
    assert any("coingecko poll failed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("faults", "said"),
    [
        ([slow(1.0), slow(1.0)], "timed out"),
        ([truncated(), truncated()], "non-JSON body"),
        ([body("<html>oops</html>", status=200)] * 2, "non-JSON body"),
        ([body("", status=200)] * 2, "non-JSON body"),
        ([body("{}", status=500)] * 2, "HTTP 500"),
        ([body("{}")], "expected a list of coins, got an object"),
        ([body("[]")], None),  # nothing to publish is not a failure
        ([body('{"status": {"error_code": 503}}')], "expected a list of coins"),
    ],
)
async def test_price_poll_faults_are_recorded_and_the_next_cycle_recovers(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics, faults: list[Any], said: str | None
) -> None:
    poller = make_poller(fake_coingecko, topics, coingecko_timeout=0.3)
    fake_coingecko.fail("/coins/markets", *faults)
    await poller.poll_prices()
    status = poller.status.endpoints["prices"]
    assert topics.published == 0
    if said is None:
        assert status.failures == 0
    else:
        assert status.failures == 1 and said in (status.last_error or ""), status.last_error
        assert poller.status.as_json()["endpoints"]["prices"]["last_error"] == status.last_error
    await poller.poll_prices()
    assert status.last_success is not None and topics.published == 6


async def test_a_renamed_price_field_skips_rows_and_says_which_field(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    drifted = fixture_text("coins_markets.json").replace('"current_price"', '"price_usd"')
    fake_coingecko.fail("/coins/markets", body(drifted))
    poller = make_poller(fake_coingecko, topics)
    await poller.poll_prices()
    status = poller.status.endpoints["prices"]
    rows = len(loads_exact(drifted))
    assert (status.skipped, topics.published) == (rows, 0)
    assert status.failures == 1 and "current_price is null or missing" in (status.last_error or "")
    logged = [r.getMessage() for r in caplog.records]
    assert any("coingecko data:" in line and "current_price" in line for line in logged)


async def test_a_missing_optional_field_is_stored_as_null_and_reported_once(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    rows = json.loads(fixture_text("coins_markets.json"))
    for row in rows:
        row.pop("market_cap", None)
    fake_coingecko.fail("/coins/markets", body(json.dumps(rows)), body(json.dumps(rows)))
    poller = make_poller(fake_coingecko, topics)
    await poller.poll_prices()
    fake_coingecko.advance(60)
    await poller.poll_prices()
    records = [record for _, record in await topics.read(CryptoPriceData)]
    assert records and all(record.market_cap is None for record in records)
    drift = [r.getMessage() for r in caplog.records if "'market_cap' absent" in r.getMessage()]
    assert len(drift) == 1  # logged once, not per row or per cycle


async def test_global_drift_and_empty_bodies(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics
) -> None:
    data = json.loads(fixture_text("global.json"))
    data["data"]["update_time"] = data["data"].pop("updated_at")  # renamed: no timestamp
    fake_coingecko.fail("/global", body(json.dumps(data)), body('{"data": {}}'), body("[]"))
    poller = make_poller(fake_coingecko, topics)
    status = poller.status.endpoints["global"]
    for said in ("updated_at is missing", "updated_at is missing", "expected {'data'"):
        await poller.poll_global()
        assert said in (status.last_error or ""), status.last_error
    assert (status.failures, topics.published) == (3, 0)
    await poller.poll_global()
    assert topics.published == 1


async def test_ohlc_junk_bodies_skip_candles_not_the_poll(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics
) -> None:
    poller = make_poller(fake_coingecko, topics, coins="bitcoin")
    await poller.poll_prices()
    fake_coingecko.fail(
        "/coins/bitcoin/ohlc", body('{"prices": []}'), body('[[1, "a"], null, [1e9999]]')
    )
    await poller.poll_ohlc()
    status = poller.status.endpoints["ohlc"]
    assert "expected a list of candles" in (status.last_error or "")
    await poller.poll_ohlc()
    assert status.skipped == 3 and status.failures == 2
    await poller.poll_ohlc()
    assert status.last_success is not None
    assert len(await topics.read(CryptoOHLCVData)) > 0


# --- end to end: one worker for the module ---------------------------------------------------


@pytest.fixture(scope="module")
async def pipeline(
    postgres_server: str, bare_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Kafka, Worker, str]]:
    """A worker on a broker and a migrated database of this module's own."""
    tmp = tmp_path_factory.mktemp("bad-input")
    dsn = await create_database(postgres_server, "bad", migrated=True)
    app_id = f"bad-input-{uuid.uuid4().hex[:8]}"
    with EmbeddedBroker(log_path=tmp / "broker.log") as broker:
        kafka = Kafka(f"127.0.0.1:{broker.port}", app_id)
        await kafka.start()
        worker = Worker(bare_env, broker, dsn, app_id, tmp)
        try:

            async def serving() -> bool | None:
                try:
                    return (await worker.health()).body["database"]["reachable"] or None
                except httpx.HTTPError:
                    return None

            await eventually(serving, worker, "the web server")
            yield kafka, worker, dsn
        finally:
            worker.kill()
            await kafka.stop()
            await drop_database(postgres_server, dsn)


def spoil(record: StreamRecord, **changes: Any) -> bytes:
    return json.dumps({**json.loads(encode_record(record)), **changes}).encode()


def junk_for(record: StreamRecord) -> list[tuple[str, bytes]]:
    """(what, value) of kinds `test_sink` does not already send, for any record type."""
    time_column = record.table.time_column
    decimal = decimal_fields(type(record))[0]
    return [
        ("oversize", encode_record(record)[:-1] + b" " * MAX_MESSAGE_BYTES + b"}"),
        ("not UTF-8", b'{"coin_id": "\xff\xfe\xfd"}'),
        ("a JSON array", b"[1, 2, 3]"),
        ("a float", spoil(record, **{decimal: 1.5})),
        ("a huge exponent", spoil(record, **{decimal: "1e999999999"})),
        ("missing time", spoil(record, **{time_column: None})),
        ("deep nesting", b"[" * 50_000),
    ]


@pytest.mark.slow
async def test_junk_on_every_topic_is_dead_lettered_and_counted(
    pipeline: tuple[Kafka, Worker, str],
) -> None:
    kafka, worker, dsn = pipeline
    good = [sample(record_type) for record_type in RECORDS]
    items: list[tuple[str, bytes | None, bytes | None, StreamRecord | None]] = []
    for record in good:
        for _, value in junk_for(record):
            items.append((record.topic.name, record.key(), value, None))
        items.append((record.topic.name, record.key(), encode_record(record), record))
    sent = await kafka.send(items)

    async def all_dead_lettered() -> dict[str, Any] | None:
        try:
            sinks = (await worker.health()).body["sink"]
        except httpx.HTTPError:
            return None
        done = all(
            sinks[r.topic.name]["dead_letters"] == len(junk_for(r))
            and sinks[r.topic.name]["rows_written"] == 1
            for r in good
        )
        return sinks if done else None

    await eventually(all_dead_lettered, worker, "every junk message dead-lettered")
    for record in good:
        topic = record.topic.name
        rejected = [m for m in sent if m.topic == topic and m.record is None]
        dead = await kafka.read_all(record.topic.dead_letter_name)
        assert [value for *_, value, _ in dead] == [m.value for m in rejected]
        for (_, _, key, _, headers), original in zip(dead, rejected, strict=True):
            assert key == original.key
            assert headers["x-original-topic"] == topic.encode()
            assert headers["x-original-partition"] == str(original.partition).encode()
            assert headers["x-original-offset"] == str(original.offset).encode()
            assert headers["x-error"].strip()
        reasons = [headers["x-error"].decode() for *_, headers in dead]
        expected = {
            "oversize": "exceeds",
            "not UTF-8": "Invalid JSON",
            "a JSON array": "Input should be an object",
            "a float": "not a float",
            "a huge exponent": "does not fit",
            "missing time": record.table.time_column,
            "deep nesting": "recursion limit",
        }
        for (what, _), reason in zip(junk_for(record), reasons, strict=True):
            assert expected[what] in reason, (what, reason)
        assert await count_rows(dsn, type(record)) == 1
    worker.assert_alive()
    # The live tables are handed the same junk (as dead-lettered, undecoded) and count it.
    assert (await worker.health()).body["tables"]["undecodable"][CryptoPriceData.topic.name] > 0

    # /metrics counts the same, and the lag of the partitions the junk went to comes down to 0
    # (the producer sent them in batches: the embedded broker's ListOffsets alone lags there).
    async def scraped() -> dict[str, Family] | None:
        metrics = await worker.metrics()
        lag = metrics["qicore_consumer_lag_messages"].samples
        topics = {m.topic for m in sent}
        lagging = {dict(key[1:])["topic"] for key in lag}
        done = lagging >= topics and set(lag.values()) == {0}
        return metrics if done else None

    metrics = await eventually(scraped, worker, "no lag")
    for record in good:
        labels = {"topic": record.topic.name, "table": record.table.name}
        letters = metrics["qicore_sink_dead_letters"].value(
            "qicore_sink_dead_letters_total", **labels
        )
        assert letters == len(junk_for(record))
        written = metrics["qicore_sink_rows_written"]
        assert written.value("qicore_sink_rows_written_total", **labels) == 1


@pytest.mark.slow
def test_the_web_server_binds_to_loopback_by_default(pipeline: tuple[Kafka, Worker, str]) -> None:
    _, worker, _ = pipeline
    port = int(worker.env["WEB_PORT"])
    listening = {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(worker.popen.pid).net_connections("inet")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening == {("127.0.0.1", port)}


async def fingerprint(dsn: str) -> dict[str, str]:
    """Per table, a hash of every row: any insert, update or delete changes it."""
    connection = await asyncpg.connect(dsn)
    try:
        shown = {}
        for record in RECORDS:
            table = quote_ident(record.table.name)
            rows = "string_agg(t::text, ',' ORDER BY t::text)"
            shown[record.table.name] = await connection.fetchval(
                f"SELECT md5(coalesce({rows}, '')) FROM {table} t"  # noqa: S608
            )
        shown["tables"] = await connection.fetchval(
            "SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class"
            " WHERE relnamespace = 'public'::regnamespace"
        )
        return shown
    finally:
        await connection.close()


INJECTION = "bitcoin'; DROP TABLE crypto_prices; --"
MALICIOUS = [
    ("GET", f"/prices/{INJECTION}", {}),
    ("GET", "/prices/bitcoin%00", {}),
    ("GET", "/prices/bitcoin%27%20OR%20%271%27%3D%271", {}),
    ("GET", "/prices/%2e%2e%2f%2e%2e%2fetc%2fpasswd/history", {}),
    ("GET", "/prices/b/history", {"limit": "1000000000000000000000"}),
    ("GET", "/prices/b/history", {"limit": "1e3"}),
    ("GET", "/prices/b/history", {"limit": "١٢"}),  # Arabic-Indic digits: int() would take them
    ("GET", "/prices/b/history", {"limit": " 5"}),
    ("GET", "/prices/b/history", {"since": "2024-01-01T00:00:00+00:00'; DELETE FROM x;--"}),
    ("GET", "/prices/b/history", {"since": "9" * 5000}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "params"), MALICIOUS)
async def test_malicious_requests_get_4xx_and_change_nothing(
    pipeline: tuple[Kafka, Worker, str], method: str, path: str, params: dict[str, str]
) -> None:
    _, worker, dsn = pipeline
    before = await fingerprint(dsn)
    url = f"http://127.0.0.1:{worker.env['WEB_PORT']}"
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        response = await client.request(method, path, params=params)
    assert 400 <= response.status_code < 500, (path, response.status_code, response.text[:200])
    assert await fingerprint(dsn) == before
    worker.assert_alive()


@pytest.mark.slow
async def test_repeated_and_huge_query_strings_are_refused(
    pipeline: tuple[Kafka, Worker, str],
) -> None:
    _, worker, dsn = pipeline
    before = await fingerprint(dsn)
    url = f"http://127.0.0.1:{worker.env['WEB_PORT']}"
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        # The first `limit` counts; a second cannot smuggle a bigger one past validation.
        response = await client.get("/prices/b/history?limit=0&limit=5")
        assert response.status_code == 400
        huge = await client.get("/prices", params={"x": "a" * 60_000})  # httpx's most is 64 KiB
        assert 400 <= huge.status_code < 500
        many = await client.get("/prices?" + "&".join(f"k{i}=v" for i in range(5_000)))
        assert 400 <= many.status_code < 500, many.status_code
    assert await fingerprint(dsn) == before
    worker.assert_alive()


# --- commands ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_schema_generate_writes_only_generated_files_under_its_root(tmp_path: Path) -> None:
    """`--root` with `..` in it resolves like any path; nothing is written beside or above it,
    and a hand-written file in the generated directories is left alone."""
    outside = tmp_path / "outside"
    root = outside / "project"
    (root / "sql").mkdir(parents=True)
    (root / "sql" / "notes.sql").write_text("-- mine\n")
    (outside / "keep.txt").write_text("untouched\n")
    crooked = root / "sql" / ".." / "sql" / ".."
    result = subprocess.run(
        [sys.executable, "-m", "faust", "-A", "app", "schema", "generate", "--root", str(crooked)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    written = {p.relative_to(outside) for p in outside.rglob("*") if p.is_file()}
    generated = {Path("project") / relative for relative in artifacts()}
    assert written == generated | {Path("keep.txt"), Path("project/sql/notes.sql")}
    assert (root / "sql" / "notes.sql").read_text() == "-- mine\n"
    digest = hashlib.sha256((outside / "keep.txt").read_bytes()).hexdigest()
    assert digest == hashlib.sha256(b"untouched\n").hexdigest()


@pytest.mark.slow
def test_schema_check_writes_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "faust", "-A", "app", "schema", "check", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "missing" in result.stdout
    assert list(tmp_path.iterdir()) == []
