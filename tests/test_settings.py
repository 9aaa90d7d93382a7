"""Settings: a bad value stops start-up with one line naming the variable; secrets never show."""

from __future__ import annotations

import subprocess
import sys

import certifi
import pytest

from app.settings import Settings, load_settings
from common.redaction import redact_url
from local.up import _banner

API_KEY = "sekrit-123"
DB_PASSWORD = "pg-sekrit-456"
DSN = f"postgresql://qi:{DB_PASSWORD}@db.example:5432/qi"

INVALID = [
    ({"COINS": "bitcoin,not a coin id"}, "COINS", "'not a coin id' is not a CoinGecko coin id"),
    ({"PORT": "70000"}, "PORT", "Input should be less than or equal to 65535"),
    ({"BROKER_URL": "http://x"}, "BROKER_URL", "must look like kafka://host:port"),
    ({"DATABASE_URL": f"mysql://qi:{DB_PASSWORD}@h/qi"}, "DATABASE_URL", "must look like"),
    ({"COINGECKO_PLAN": "pro"}, "COINGECKO_PLAN", "the pro plan needs COINGECKO_API_KEY"),
    # An empty variable counts as unset, so an empty key is no key.
    ({"COINGECKO_PLAN": "demo", "COINGECKO_API_KEY": ""}, "COINGECKO_PLAN", "needs"),
    ({"COINGECKO_SOURCE": "graphql"}, "COINGECKO_SOURCE", "Input should be 'rest' or 'mcp'"),
    (
        {"COINGECKO_MCP_URL": "ws://h/mcp"},
        "COINGECKO_MCP_URL",
        "must be an http(s) URL (Streamable HTTP) or 'offline'",
    ),
    (
        {"BROKER_HEARTBEAT_INTERVAL": "10"},
        "BROKER_HEARTBEAT_INTERVAL",
        "10 s must be shorter than BROKER_SESSION_TIMEOUT (10 s)",
    ),
    # The default heartbeat (3 s) is checked against a shorter session timeout too.
    ({"BROKER_SESSION_TIMEOUT": "2"}, "BROKER_HEARTBEAT_INTERVAL", "shorter than"),
    ({"LOG_LEVEL": "warning"}, "LOG_LEVEL", "Input should be 'debug', 'info', 'warn', 'error' or"),
    ({"WEB_ENABLED": "maybe"}, "WEB_ENABLED", "valid boolean"),
    ({"LOG_FORMAT": "yaml"}, "LOG_FORMAT", "Input should be 'text' or 'json'"),
    ({"VIEW_CACHE_SECONDS": "-1"}, "VIEW_CACHE_SECONDS", "greater than or equal to 0"),
    # Broker TLS/SASL and database TLS.
    ({"BROKER_SECURITY_PROTOCOL": "TLS"}, "BROKER_SECURITY_PROTOCOL", "'SASL_SSL'"),
    (
        {"BROKER_SECURITY_PROTOCOL": "SASL_SSL", "BROKER_SASL_PASSWORD": "x"},
        "BROKER_SASL_USERNAME",
        "BROKER_SECURITY_PROTOCOL=SASL_SSL needs it",
    ),
    (
        {"BROKER_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "BROKER_SASL_USERNAME": "u"},
        "BROKER_SASL_PASSWORD",
        "BROKER_SECURITY_PROTOCOL=SASL_PLAINTEXT needs it",
    ),
    (
        {"BROKER_SASL_USERNAME": "u"},
        "BROKER_SASL_USERNAME",
        "is set but BROKER_SECURITY_PROTOCOL=PLAINTEXT does not use it",
    ),
    (
        {
            "BROKER_SECURITY_PROTOCOL": "SASL_SSL",
            "BROKER_SASL_USERNAME": "u",
            "BROKER_SASL_PASSWORD": "p",
            "BROKER_SASL_MECHANISM": "GSSAPI",
        },
        "BROKER_SASL_MECHANISM",
        "'SCRAM-SHA-256'",
    ),
    (
        {"BROKER_SSL_CAFILE": certifi.where()},
        "BROKER_SSL_CAFILE",
        "is set but BROKER_SECURITY_PROTOCOL=PLAINTEXT does not use TLS",
    ),
    (
        {"BROKER_SECURITY_PROTOCOL": "SSL", "BROKER_SSL_CAFILE": "/no/such/ca.pem"},
        "BROKER_SSL_CAFILE",
        "'/no/such/ca.pem' is not a readable file",
    ),
    (
        {"DATABASE_URL": "postgresql://u@h/d?sslmode=verify-full&sslrootcert=/no/ca.pem"},
        "DATABASE_URL",
        "sslrootcert '/no/ca.pem' is not a readable file",
    ),
    (
        {"SINK_TOPICS": "crypto-prices,crypto-price"},
        "SINK_TOPICS",
        "unknown topic 'crypto-price': the record topics are crypto-prices, crypto-ohlcv, "
        "market-analytics (or 'none' for no sink)",
    ),
    ({"SINK_TOPICS": "none,crypto-prices"}, "SINK_TOPICS", "unknown topic 'none'"),
    ({"SINK_TOPICS": " , "}, "SINK_TOPICS", "no topic: the record topics are"),
    ({"POLLER_ENABLED": "sometimes"}, "POLLER_ENABLED", "valid boolean"),
]


@pytest.mark.parametrize(("variables", "variable", "problem"), INVALID)
def test_an_invalid_setting_stops_with_one_line_naming_it(
    environ: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variables: dict[str, str],
    variable: str,
    problem: str,
) -> None:
    for name, value in variables.items():
        environ.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        load_settings()
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"qicore: invalid setting {variable}: ")
    assert problem in lines[0]
    assert DB_PASSWORD not in lines[0]


def test_each_invalid_setting_gets_its_own_line(
    environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environ.setenv("PORT", "0")
    environ.setenv("TOP_N", "many")
    with pytest.raises(SystemExit):
        load_settings()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1] for line in lines] == [
        " invalid setting TOP_N",
        " invalid setting PORT",
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-c", "import app"],
        [sys.executable, "-m", "faust", "-A", "app", "worker"],
    ],
    ids=["import", "faust-worker"],
)
def test_start_up_stops_with_status_2_and_no_traceback(
    bare_env: dict[str, str], command: list[str]
) -> None:
    env = {**bare_env, "PORT": "70000", "DATABASE_URL": f"mysql://qi:{DB_PASSWORD}@h/qi"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "qicore: invalid setting DATABASE_URL: "
        "must look like postgresql://user:password@host:port/dbname",
        "qicore: invalid setting PORT: Input should be less than or equal to 65535",
    ]


def test_empty_variables_mean_the_defaults(environ: pytest.MonkeyPatch) -> None:
    for name in ("PORT", "COINS", "COINGECKO_API_KEY", "BROKER_URL"):
        environ.setenv(name, "")
    settings = Settings()
    assert settings.port is None
    assert settings.coins == ()
    assert settings.plan == "keyless"
    assert settings.broker_url == Settings.model_fields["broker_url"].default


@pytest.mark.parametrize(
    ("variables", "topics", "group"),
    [
        ({}, ("crypto-prices", "crypto-ohlcv", "market-analytics"), "qi"),  # today's `worker`
        (
            {"SINK_TOPICS": "market-analytics,crypto-ohlcv"},
            None,
            "qi.poller.crypto-ohlcv.market-analytics",
        ),
        ({"SINK_TOPICS": "crypto-prices", "POLLER_ENABLED": "false"}, None, "qi.crypto-prices"),
        ({"SINK_TOPICS": "none"}, (), "qi.poller"),
        ({"SINK_TOPICS": "none", "POLLER_ENABLED": "false"}, (), "qi.none"),
        # The full list in another order is the full scope: the same group as the default.
        ({"SINK_TOPICS": "market-analytics,crypto-prices,crypto-ohlcv"}, None, "qi"),
    ],
)
def test_each_scope_is_a_consumer_group_of_its_own(
    environ: pytest.MonkeyPatch,
    variables: dict[str, str],
    topics: tuple[str, ...] | None,
    group: str,
) -> None:
    environ.setenv("APP_ID", "qi")
    for name, value in variables.items():
        environ.setenv(name, value)
    settings = Settings()
    if topics is not None:
        assert settings.sink_topics == topics
    assert settings.consumer_group == group


def test_secrets_never_show(environ: pytest.MonkeyPatch) -> None:
    environ.setenv("COINGECKO_API_KEY", API_KEY)
    environ.setenv("DATABASE_URL", DSN)
    settings = Settings()
    views = [
        repr(settings),
        str(settings),
        repr(settings.public_view()),
        settings.model_dump_json(),
    ]
    for view in views:
        assert API_KEY not in view
        assert DB_PASSWORD not in view
    assert settings.public_view()["database_url"] == "postgresql://qi:***@db.example:5432/qi"
    assert settings.public_view()["coingecko_api_key"] == "***"
    # ...while the program itself still gets them.
    assert settings.database_dsn == DSN
    assert settings.plan == "demo"


def test_up_banner_hides_the_database_password(
    environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environ.setenv("DATABASE_URL", DSN)
    environ.setenv("PORT", "5000")
    environ.setenv("MCP_TOKEN", "a-token-of-sixteen-characters")
    settings = Settings()
    _banner(settings, "kafka://127.0.0.1:9092", settings.database_dsn, {"BROKER_URL": "x"})
    out = capsys.readouterr().out
    assert DB_PASSWORD not in out
    assert "qicore: database  postgresql://qi:***@db.example:5432/qi\n" in out
    assert "qicore: broker    kafka://127.0.0.1:9092 (embedded)\n" in out
    assert "qicore: web       http://127.0.0.1:5000/\n" in out


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://qi:pw@h:5432/db", "postgresql://qi:***@h:5432/db"),
        ("postgresql://qi:p%40ss@h/db?sslmode=require", "postgresql://qi:***@h/db?sslmode=require"),
        ("postgresql://qi@h/db", "postgresql://qi@h/db"),
        (
            "postgresql://postgres:@/postgres?host=/tmp/pg",
            "postgresql://postgres:@/postgres?host=/tmp/pg",
        ),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.slow
def test_the_worker_consumer_uses_broker_fetch_max_wait_ms(bare_env: dict[str, str]) -> None:
    """Faust hard-codes 1500 ms; a broker that holds fetches would add that to every record."""
    script = (
        "import asyncio\n"
        "async def main():\n"
        "    from app import app\n"
        "    consumer = app.consumer._thread._create_worker_consumer(app.transport)\n"
        "    print(consumer._fetch_max_wait_ms)\n"
        "asyncio.run(main())\n"
    )
    env = {**bare_env, "BROKER_FETCH_MAX_WAIT_MS": "77"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["77"]
