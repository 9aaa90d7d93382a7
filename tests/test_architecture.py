"""The rooms' import rules (docs/architecture.md), read from the source with `ast`: a module that
imports across a wall it should not fails here, naming the file and the import.

Imports under `if TYPE_CHECKING:` are annotations only and are not counted.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Each room: the modules of other rooms it may import (a package allows all its modules).
# `app.settings` is the settings alone (no Faust): a source or a read tool may take its own.
# `common` imports nothing of ours, so every room may import it.
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "models": {"common"},
    "coingecko": {"common", "models", "app.settings"},
    "store": {"common", "models", "generators.sql"},
    "generators": {"common", "models", "store.db"},
    "app": {"common", "models", "generators", "store"},
    # The stand-ins `up` starts, and the supervisor that starts the worker beside them.
    "local": {"app", "coingecko", "common", "generators", "models"},
    "agents": {"app", "coingecko", "common", "models", "generators", "store"},
    # The candles views read the aggregates the generators declare.
    "tables": {"agents", "app", "coingecko", "common", "models", "generators.sql", "store"},
    # The read tools take their schemas from the generators; `/mcp` is a view of the worker's web
    # server, like tables.views, whose read pool it shares, and tables.stream, whose LISTEN
    # connection it follows.
    "mcpserver": {
        "app",
        "common",
        "models",
        "generators",
        "store",
        "tables.stream",
        "tables.views",
    },
    # The page at `/` and its assets: it reads the app only through the views' HTTP API.
    "dashboard": {"app.main"},
}
# The assembly: where the app meets the agents and tables it registers, and the commands
# (`faust -A app <command>`) that call into every room.
ASSEMBLY = {"app/__init__.py", "app/commands.py"}
# Rooms that run without Faust: the record, HTTP and database code is testable on its own.
FRAMEWORK = ("faust", "mode", "aiokafka")
WITHOUT_FRAMEWORK = {"common", "models", "coingecko", "store", "generators"}
# Not rooms of the application: they may import anything.
OUTSIDE = {"bench", "tests", "testkit"}


def imports(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, module) of every absolute import outside `if TYPE_CHECKING:` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module


def allowed(module: str, rules: set[str]) -> bool:
    return any(module == rule or module.startswith(rule + ".") for rule in rules)


def test_every_room_imports_only_what_it_may() -> None:
    rooms = set(ALLOWED)
    broken = []
    for room in sorted(path.name for path in ROOT.iterdir() if (path / "__init__.py").exists()):
        assert room in rooms or room in OUTSIDE, (
            f"{room}/ is a room without import rules: add it to ALLOWED and docs/architecture.md"
        )
        if room not in rooms:
            continue
        for path in sorted((ROOT / room).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            for line, module in imports(ast.parse(path.read_text(), relative)):
                top = module.split(".")[0]
                if top in rooms and top != room and relative not in ASSEMBLY:
                    if not allowed(module, ALLOWED[room]):
                        broken.append(f"{relative}:{line} imports {module}")
                if room in WITHOUT_FRAMEWORK and top in FRAMEWORK:
                    broken.append(f"{relative}:{line} imports {module} (a framework)")
    assert broken == []


def test_the_rules_see_a_forbidden_import() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import faust\n"
        "from app.main import app\n"
        "if TYPE_CHECKING:\n"
        "    from app.settings import Settings\n"
    )
    found = [module for _, module in imports(tree)]
    assert found == ["typing", "faust", "app.main"]
    assert not allowed("app.main", ALLOWED["store"])
    assert allowed("generators.sql", ALLOWED["store"])


def test_the_rooms_without_faust_load_without_it() -> None:
    """Direct imports are not the whole story: `import app.settings` runs `app/__init__.py`,
    which builds the Faust app. Every module of a room without Faust, imported in a fresh
    interpreter, must leave Faust unloaded."""
    modules = sorted(
        path.relative_to(ROOT)
        .with_suffix("")
        .as_posix()
        .replace("/", ".")
        .removesuffix(".__init__")
        for room in WITHOUT_FRAMEWORK
        for path in (ROOT / room).rglob("*.py")
    )
    loaded = printed_by(
        f"import sys\nfor m in {modules!r}: __import__(m)\n"
        "print(sorted(n for n in ('faust', 'mode', 'app.main') if n in sys.modules))"
    )
    assert loaded == "[]", f"{loaded} loaded by importing {modules}"


# What `faust -A app worker` imports only once it needs it, not before it starts: httpx when the
# poller builds its client (while the group join is held), the migrations when the partitions
# task first runs or a command migrates, the MCP SDK on the first request to /mcp.
LOADED_WHEN_NEEDED = ("httpx", "generators.migrate", "mcp")


def test_the_worker_imports_what_it_needs_later_only_when_it_needs_it() -> None:
    script = f"import sys, app\nprint([n for n in {LOADED_WHEN_NEEDED!r} if n in sys.modules])"
    loaded = printed_by(script)
    assert loaded == "[]", f"`import app` loaded {loaded}"


def printed_by(script: str) -> str:
    """What a fresh interpreter prints running `script` from the project's root: a module list
    seen before anything of this test process's imports can hide it."""
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
