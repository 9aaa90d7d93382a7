"""Typed settings read from the environment (Heroku style: one variable per setting).

`load_settings()` turns any invalid value into one line naming the variable and the problem and
exits, so a typo stops start-up instead of surfacing as a stack trace minutes later. Secrets are
`SecretStr`: they never print, in logs, errors or web views.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.redaction import HIDDEN, redact_url
from generators.sql import TimescaleMode
from models import RECORDS

CoinGeckoPlan = Literal["keyless", "demo", "pro"]
CoinGeckoSource = Literal["rest", "mcp"]
COINGECKO_MCP = "https://mcp.api.coingecko.com/mcp"  # CoinGecko's remote MCP server
PUBLIC_API = "https://api.coingecko.com/api/v3"
PRO_API = "https://pro-api.coingecko.com/api/v3"
# Conservative defaults under CoinGecko's published limits (errors count against them too).
DEFAULT_CALLS_PER_MINUTE: dict[CoinGeckoPlan, int] = {"keyless": 5, "demo": 30, "pro": 250}
OFFLINE = "offline"  # COINGECKO_BASE_URL value: `faust -A app up` serves the bundled fake
DEFAULT_BROKER_URL = "kafka://127.0.0.1:9092"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BrokerSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SASL_PROTOCOLS = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})
TLS_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
# asyncpg reads these from DATABASE_URL's query string (libpq's names and values).
SSL_MODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})
SSL_FILE_PARAMS = ("sslrootcert", "sslcert", "sslkey", "sslcrl")
RECORD_TOPICS = tuple(record.topic.name for record in RECORDS)
NO_TOPICS = "none"  # SINK_TOPICS value: this process sinks nothing (an empty value means all)
MCP_TOKEN_MIN_LENGTH = 16


def is_loopback(host: str) -> bool:
    """Whether a bind address is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve beyond loopback
        return False


class Settings(BaseSettings):
    # An empty variable (`heroku config:set X=`) means "use the default", as if it were unset.
    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", frozen=True, env_ignore_empty=True
    )

    app_id: str = Field("qicore-streams", min_length=1)
    broker_url: str = DEFAULT_BROKER_URL
    broker_session_timeout: float = Field(10.0, gt=0, description="seconds")
    broker_heartbeat_interval: float = Field(
        3.0, gt=0, description="seconds", validate_default=True
    )
    # How long a fetch may wait for data. Kafka and Redpanda answer as soon as data arrives; a
    # broker that holds the fetch (Tansu) adds up to this to every record's latency.
    broker_fetch_max_wait_ms: int = Field(50, ge=1, le=10_000)
    # Redpanda Cloud: SASL_SSL with SCRAM-SHA-256. Credentials are checked against the protocol
    # (validate_default), so a password that would be silently ignored stops start-up instead.
    broker_security_protocol: BrokerSecurityProtocol = "PLAINTEXT"
    broker_sasl_mechanism: SaslMechanism = "SCRAM-SHA-256"
    broker_sasl_username: str | None = Field(None, validate_default=True)
    broker_sasl_password: SecretStr | None = Field(None, validate_default=True)
    broker_ssl_cafile: str | None = None  # default: the system's trusted CAs
    topic_replication_factor: int = Field(1, ge=1)
    database_url: SecretStr = SecretStr(DEFAULT_DATABASE_URL)
    database_pool_size: int = Field(4, ge=1, le=100)
    # Which schema `migrate` creates: "auto" uses TimescaleDB where the server can run it and
    # plain PostgreSQL otherwise (saying so), "on" requires it, "off" never uses it.
    timescaledb: TimescaleMode = "auto"

    coingecko_base_url: str | None = None  # default follows the plan; "offline" = bundled fake
    coingecko_api_key: SecretStr | None = None
    # Default: "demo" with a key, else "keyless".
    coingecko_plan: CoinGeckoPlan | None = Field(None, validate_default=True)
    coingecko_calls_per_minute: int | None = Field(None, ge=1)
    coingecko_timeout: float = Field(10.0, gt=0, description="seconds per request")
    coins: Annotated[tuple[str, ...], NoDecode] = ()
    top_n: int = Field(100, ge=1, le=5000)
    price_poll_seconds: float = Field(60.0, ge=1)
    global_poll_seconds: float = Field(600.0, ge=1)
    ohlc_poll_seconds: float = Field(900.0, ge=1)
    ohlc_days: Literal[1, 7, 14, 30, 90, 180, 365] = 1
    # btc_price/eth_price (/simple/price) on every N-th price poll; 0 = never (they stay null);
    # unset = as often as the plan's calls allow (coingecko.poller.quotes_every).
    btc_eth_prices_every: int | None = Field(None, ge=0)
    # Where CoinGecko is read (coingecko/mcp.py): its REST API, or its MCP server at
    # COINGECKO_MCP_URL ("offline" = the bundled fake), or started by COINGECKO_MCP_COMMAND (stdio).
    coingecko_source: CoinGeckoSource = "rest"
    coingecko_mcp_url: str = COINGECKO_MCP
    coingecko_mcp_command: str | None = None

    # What this process runs (docs/deployment.md): the record topics it sinks (unset = all,
    # "none" = none) and whether it polls CoinGecko. Each such scope is a consumer group of its
    # own (`consumer_group`); WEB_ENABLED says whether it serves the views and /mcp.
    sink_topics: Annotated[tuple[str, ...], NoDecode] = RECORD_TOPICS
    poller_enabled: bool = True

    sink_batch_size: int = Field(5000, ge=1, le=100_000)
    # How long stored batches are collected before the live tables get them (agents/sink.py).
    live_table_update_seconds: float = Field(1.0, ge=0, le=60)
    # How often each sink confirms that its partitions are still the logs its stored offsets
    # came from (store/offsets.py): a topic re-created under a running worker is found this late.
    sink_log_check_seconds: float = Field(30.0, gt=0, le=3600)

    # How long a read view's answer is reused for the same request (tables/answers.py); 0 = never.
    view_cache_seconds: float = Field(1.0, ge=0, le=60)

    port: int | None = Field(None, ge=1, le=65535, description="set by Heroku; binds 0.0.0.0")
    web_host: str = "127.0.0.1"
    web_port: int = Field(6066, ge=1, le=65535)
    web_enabled: bool = True
    # GET /stream/prices (tables/stream.py): clients at once per process (beyond: 503), and the
    # prices one client may have waiting before it is dropped for falling behind.
    stream_max_clients: int = Field(100, ge=1, le=10_000)
    stream_queue_size: int = Field(1000, ge=1, le=100_000)
    # The names `faust worker -l` accepts (it rejects "warning"), so LOG_LEVEL can be passed on.
    log_level: Literal["debug", "info", "warn", "error", "crit"] = "info"
    # "json": one JSON object per line for log shippers (common/logs.py); "text": Faust's lines.
    log_format: Literal["text", "json"] = "text"
    data_dir: str = ".data"
    # The MCP server at /mcp on the web server (mcpserver/web.py). Its bearer token is required
    # whenever the web server listens beyond loopback; allowed hosts are the Host header values
    # its DNS-rebinding protection accepts besides loopback ones (e.g. myapp.herokuapp.com).
    mcp_http_enabled: bool = True
    mcp_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    mcp_token: SecretStr | None = Field(None, validate_default=True)
    # The one write tool (store_price): off unless set; on /mcp only with MCP_TOKEN, since it
    # publishes to the price topic (on stdio it needs BROKER_URL too).
    mcp_write_enabled: bool = Field(False, validate_default=True)

    @field_validator("mcp_token")
    @classmethod
    def _check_mcp_token(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MCP_TOKEN_MIN_LENGTH:
            raise ValueError(f"must be at least {MCP_TOKEN_MIN_LENGTH} characters")
        served = info.data.get("web_enabled") and info.data.get("mcp_http_enabled")
        host = "0.0.0.0" if info.data.get("port") is not None else info.data.get("web_host")
        if value is None and served and host is not None and not is_loopback(host):
            raise ValueError(
                f"is required: the web server listens on {host}, beyond loopback, and serves MCP "
                "at /mcp (set MCP_TOKEN, or MCP_HTTP_ENABLED=false)"
            )
        return value

    @field_validator("mcp_write_enabled")
    @classmethod
    def _check_mcp_write(cls, value: bool, info: ValidationInfo) -> bool:
        # An invalid token is missing from info.data (and reported); a valid unset one is None.
        served = info.data.get("web_enabled") and info.data.get("mcp_http_enabled")
        if value and served and "mcp_token" in info.data and info.data["mcp_token"] is None:
            raise ValueError(
                "needs MCP_TOKEN: the write tool is served on /mcp only with a token "
                "(or MCP_HTTP_ENABLED=false for stdio alone)"
            )
        return value

    @field_validator("coins", "mcp_allowed_hosts", "sink_topics", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("coins")
    @classmethod
    def _check_coins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for coin in value:
            if not coin.replace("-", "").replace("_", "").replace(".", "").isalnum():
                raise ValueError(f"{coin!r} is not a CoinGecko coin id")
        return value

    @field_validator("sink_topics")
    @classmethod
    def _check_sink_topics(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if value == (NO_TOPICS,):
            return ()
        unknown = [topic for topic in value if topic not in RECORD_TOPICS]
        if unknown or not value:
            named = f"unknown topic {', '.join(map(repr, unknown))}" if unknown else "no topic"
            raise ValueError(
                f"{named}: the record topics are {', '.join(RECORD_TOPICS)} "
                f"(or {NO_TOPICS!r} for no sink)"
            )
        return tuple(topic for topic in RECORD_TOPICS if topic in value)  # the DSL's order, once

    @field_validator("broker_url")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        for url in value.split(";"):
            parts = urlsplit(url)
            if parts.scheme not in {"kafka", "aiokafka"} or not parts.hostname:
                raise ValueError("must look like kafka://host:port (several joined by ';')")
            if parts.username is not None or parts.password is not None:  # Faust prints the URL
                raise ValueError(
                    "must not hold credentials: use BROKER_SASL_USERNAME and BROKER_SASL_PASSWORD"
                )
        return value

    @field_validator("broker_security_protocol", "broker_sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("timescaledb", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("coingecko_base_url")
    @classmethod
    def _check_coingecko(cls, value: str | None) -> str | None:
        if value not in (None, OFFLINE):
            parts = urlsplit(value)
            if parts.scheme not in {"http", "https"} or not parts.hostname:
                raise ValueError(f"must be an http(s) URL (or {OFFLINE!r} under `faust -A app up`)")
        return value

    @field_validator("coingecko_mcp_url")
    @classmethod
    def _check_coingecko_mcp(cls, value: str) -> str:
        parts = urlsplit(value)
        if value != OFFLINE and (parts.scheme not in {"http", "https"} or not parts.hostname):
            raise ValueError(f"must be an http(s) URL (Streamable HTTP) or {OFFLINE!r}")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database(cls, value: SecretStr) -> SecretStr:
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in {"postgres", "postgresql"}:
            raise ValueError("must look like postgresql://user:password@host:port/dbname")
        query = parse_qs(parts.query)
        # Every redaction hides the password of the user:password@ part only.
        if "password" in query or "sslpassword" in query:
            raise ValueError("put the password in user:password@host, not in the query string")
        for mode in query.get("sslmode", []):
            if mode not in SSL_MODES:
                raise ValueError(f"sslmode {mode!r} is not one of {', '.join(sorted(SSL_MODES))}")
        for name in SSL_FILE_PARAMS:
            for path in query.get(name, []):
                if not Path(path).is_file():
                    raise ValueError(f"{name} {path!r} is not a readable file")
        return value

    # Checks that involve two fields are field validators on the later one (`info.data` holds the
    # earlier, valid fields), so the error names a variable.
    @field_validator("broker_heartbeat_interval")
    @classmethod
    def _check_heartbeat(cls, value: float, info: ValidationInfo) -> float:
        session_timeout = info.data.get("broker_session_timeout")
        if session_timeout is not None and value >= session_timeout:
            raise ValueError(
                f"{value:g} s must be shorter than BROKER_SESSION_TIMEOUT ({session_timeout:g} s)"
            )
        return value

    @field_validator("broker_sasl_username", "broker_sasl_password")
    @classmethod
    def _check_sasl(cls, value: object, info: ValidationInfo) -> object:
        protocol = info.data.get("broker_security_protocol")
        if protocol is None:  # itself invalid, and reported
            return value
        if protocol in SASL_PROTOCOLS and value is None:
            raise ValueError(f"BROKER_SECURITY_PROTOCOL={protocol} needs it")
        if protocol not in SASL_PROTOCOLS and value is not None:
            raise ValueError(
                f"is set but BROKER_SECURITY_PROTOCOL={protocol} does not use it "
                "(SASL_SSL or SASL_PLAINTEXT do)"
            )
        return value

    @field_validator("broker_ssl_cafile")
    @classmethod
    def _check_cafile(cls, value: str | None, info: ValidationInfo) -> str | None:
        protocol = info.data.get("broker_security_protocol")
        if value is not None and protocol is not None and protocol not in TLS_PROTOCOLS:
            raise ValueError(
                f"is set but BROKER_SECURITY_PROTOCOL={protocol} does not use TLS "
                "(SSL or SASL_SSL do)"
            )
        if value is not None and not Path(value).is_file():
            raise ValueError(f"{value!r} is not a readable file")
        return value

    @field_validator("coingecko_plan")
    @classmethod
    def _check_plan(cls, value: CoinGeckoPlan | None, info: ValidationInfo) -> CoinGeckoPlan | None:
        if value in ("demo", "pro") and info.data.get("coingecko_api_key") is None:
            raise ValueError(f"the {value} plan needs COINGECKO_API_KEY")
        return value

    @property
    def consumer_group(self) -> str:
        """The Faust app id, and so the Kafka consumer group, of this process's scope: APP_ID for
        the full scope (every sink and the poller, today's `worker`), else APP_ID plus the scope,
        e.g. `qicore-streams.crypto-prices`, `qicore-streams.poller`. Processes of one group
        subscribe alike, so its leader is a process that polls (docs/deployment.md says why)."""
        if self.sink_topics == RECORD_TOPICS and self.poller_enabled:
            return self.app_id
        scope = (["poller"] if self.poller_enabled else []) + list(self.sink_topics)
        return ".".join([self.app_id, *(scope or [NO_TOPICS])])

    @property
    def plan(self) -> CoinGeckoPlan:
        if self.coingecko_plan is not None:
            return self.coingecko_plan
        return "demo" if self.coingecko_api_key is not None else "keyless"

    @property
    def coingecko_url(self) -> str:
        if self.coingecko_base_url:
            return self.coingecko_base_url.rstrip("/")
        return PRO_API if self.plan == "pro" else PUBLIC_API

    @property
    def coingecko_mcp_offline(self) -> bool:
        """COINGECKO_MCP_URL=offline: the worker starts the bundled fake MCP server itself."""
        return self.coingecko_mcp_url == OFFLINE

    @property
    def calls_per_minute(self) -> int:
        return self.coingecko_calls_per_minute or DEFAULT_CALLS_PER_MINUTE[self.plan]

    @property
    def database_dsn(self) -> str:
        return self.database_url.get_secret_value()

    @property
    def web_bind(self) -> str:
        return "0.0.0.0" if self.port is not None else self.web_host  # Heroku routes to $PORT

    @property
    def web_listen_port(self) -> int:
        return self.port if self.port is not None else self.web_port

    def public_view(self) -> dict[str, object]:
        """Settings safe to show: secrets replaced, the database password hidden."""
        secrets = {"database_url", "coingecko_api_key", "broker_sasl_password", "mcp_token"}
        shown = self.model_dump(exclude=secrets)
        shown["database_url"] = redact_url(self.database_dsn)
        shown["coingecko_api_key"] = HIDDEN if self.coingecko_api_key else None
        shown["broker_sasl_password"] = HIDDEN if self.broker_sasl_password else None
        shown["mcp_token"] = HIDDEN if self.mcp_token else None
        return shown


def load_settings() -> Settings:
    """Read the environment; on a bad value print one line per problem and exit with status 2."""
    try:
        return Settings()
    except ValidationError as error:
        for problem in error.errors():
            variable = "_".join(str(p) for p in problem["loc"][:1]).upper() or "settings"
            message = problem["msg"].removeprefix("Value error, ")
            print(f"qicore: invalid setting {variable}: {message}", file=sys.stderr)
        raise SystemExit(2) from None
