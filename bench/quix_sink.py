"""The peer contender: Quix Streams' own `PostgreSQLSink`, as its documentation sets it up.

Run by `bench.sink_throughput` as a subprocess with the interpreter of its own venv
(`bench/quix-requirements.txt`, pinned; Quix is no dependency of the project), so it imports
nothing of the project. Default settings but three that the comparison needs: offsets from the
earliest (the topic is pre-filled), the table's primary key with ON CONFLICT DO NOTHING (the
same idempotence the worker has), and the worker's session timeout (the embedded broker holds
every JoinGroup for about half of it: librdkafka's 45 s default would measure the broker).
Values are JSON-decoded by Quix and stored as Quix maps them (decimal strings as text). Runs
until stopped.
"""

from __future__ import annotations

import os
import tempfile

from psycopg2.extensions import parse_dsn
from quixstreams import Application
from quixstreams.sinks.community.postgresql import PostgreSQLSink

TOPIC = "crypto-prices"
TABLE = "quix_prices"
PRIMARY_KEY = ["coin_id", "exchange_id", "last_updated"]


def main() -> None:
    dsn = parse_dsn(os.environ["DATABASE_URL"])  # the embedded server's is a socket directory
    session_ms = int(float(os.environ["BROKER_SESSION_TIMEOUT"]) * 1000)
    heartbeat_ms = int(float(os.environ["BROKER_HEARTBEAT_INTERVAL"]) * 1000)
    app = Application(
        broker_address=os.environ["BENCH_BOOTSTRAP"],
        consumer_group=os.environ["APP_ID"],
        auto_offset_reset="earliest",
        state_dir=tempfile.mkdtemp(prefix="quix-state-"),
        consumer_extra_config={
            "session.timeout.ms": session_ms,
            "heartbeat.interval.ms": heartbeat_ms,
        },
    )
    sink = PostgreSQLSink(
        host=dsn.get("host", "127.0.0.1"),
        port=int(dsn.get("port", 5432)),
        dbname=dsn["dbname"],
        user=dsn.get("user", ""),
        password=dsn.get("password", ""),
        table_name=TABLE,
        primary_key_columns=PRIMARY_KEY,
        on_conflict_do_nothing=True,
    )
    app.dataframe(app.topic(TOPIC, value_deserializer="json")).sink(sink)
    app.run()


if __name__ == "__main__":
    main()
