"""The candles' refresh policy converges: a second `migrate` on TimescaleDB leaves it alone.

TimescaleDB cannot be installed on this machine, so the two information views and the two policy
functions the generated statement uses are stood in for by a table and functions of the same
names and columns, as TimescaleDB 2.19 and 2.20 fill them (2.20 names the continuous aggregate in
`jobs`, where 2.19 named its materialization hypertable: timescale/timescaledb#7976). The
statement under test is the generated one, run by the real embedded PostgreSQL.
"""

from __future__ import annotations

import json

import asyncpg
import pytest

from generators import sql

CANDLES = sql.CANDLES[0]
MATERIALIZED = "_materialized_hypertable_3"
STAND_INS = f"""
CREATE SCHEMA timescaledb_information;
CREATE SCHEMA _timescaledb_internal;
CREATE TABLE _timescaledb_internal.{MATERIALIZED} ();
CREATE VIEW {CANDLES.name} AS SELECT 1 AS one;
CREATE TABLE timescaledb_information.continuous_aggregates AS
    SELECT 'public'::name AS view_schema, '{CANDLES.name}'::name AS view_name,
        '_timescaledb_internal'::name AS materialization_hypertable_schema,
        '{MATERIALIZED}'::name AS materialization_hypertable_name;
CREATE TABLE timescaledb_information.jobs (
    proc_name name, hypertable_schema name, hypertable_name name, config jsonb,
    schedule_interval interval);
CREATE TABLE policy_calls (call text);
CREATE FUNCTION remove_continuous_aggregate_policy(aggregate regclass, if_exists boolean)
    RETURNS void LANGUAGE sql AS $$ INSERT INTO policy_calls VALUES ('remove') $$;
CREATE FUNCTION add_continuous_aggregate_policy(
    aggregate regclass, start_offset interval, end_offset interval, schedule_interval interval)
    RETURNS integer LANGUAGE sql AS $$ INSERT INTO policy_calls VALUES ('add') RETURNING 1 $$;
"""  # noqa: S608 (the test's own names)


def _refresh_policy() -> str:
    (statement,) = [
        s
        for s in sql.schema_statements("timescaledb")
        if "policy_refresh_continuous_aggregate" in s
    ]
    return statement


@pytest.mark.parametrize(
    ("schema", "name"),
    [("_timescaledb_internal", MATERIALIZED), ("public", CANDLES.name)],
    ids=["timescaledb-2.19", "timescaledb-2.20"],
)
async def test_an_unchanged_refresh_policy_is_left_alone(
    database_dsn: str, schema: str, name: str
) -> None:
    connection = await asyncpg.connect(database_dsn)
    try:
        await connection.execute(STAND_INS)
        config = {
            "start_offset": str(CANDLES.refresh_start),
            "end_offset": str(CANDLES.refresh_end),
            "mat_hypertable_id": 3,
        }
        await connection.execute(
            "INSERT INTO timescaledb_information.jobs VALUES"
            " ('policy_refresh_continuous_aggregate', $1, $2, $3::jsonb, $4)",
            schema,
            name,
            json.dumps(config),
            CANDLES.refresh_every,
        )
        await connection.execute(_refresh_policy())
        assert await connection.fetch("SELECT call FROM policy_calls") == []

        # A changed window is replaced, under either name.
        await connection.execute(
            "UPDATE timescaledb_information.jobs SET config = config || $1::jsonb",
            json.dumps({"end_offset": "00:05:00"}),
        )
        await connection.execute(_refresh_policy())
        calls = [row["call"] for row in await connection.fetch("SELECT call FROM policy_calls")]
        assert calls == ["remove", "add"]
    finally:
        await connection.close()
