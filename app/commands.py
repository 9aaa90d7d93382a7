"""Project commands, run the Faust way: `faust -A app <command>`."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import NoReturn

import click
from faust.cli import AppCommand, argument, option

from app.main import app, settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@app.command(
    argument("action", type=click.Choice(["generate", "check"])),
    option(
        "--root",
        type=click.Path(file_okay=False, path_type=Path),
        default=PROJECT_ROOT,
        help="Project root holding sql/ and schemas/ (default: this checkout).",
    ),
)
async def schema(self: AppCommand, action: str, root: Path) -> None:
    """Write the generated files (`generate`) or fail if any is stale (`check`)."""
    from generators.artifacts import check_artifacts, write_artifacts

    if action == "generate":
        for path in write_artifacts(root):
            self.say(f"{'wrote' if path.exists() else 'removed'} {path.relative_to(root)}")
        return
    stale = check_artifacts(root)
    for problem in stale:
        self.say(f"stale: {problem}")
    if stale:
        self.say("run `faust -A app schema generate` and commit the result")
        raise SystemExit(1)
    self.say("generated files are up to date")


@app.command(option("--force", is_flag=True, help="Also apply destructive changes (drop/retype)."))
async def migrate(self: AppCommand, force: bool) -> None:
    """Apply the generated DDL to DATABASE_URL, idempotently."""
    from app import checks

    try:
        report = await checks.migrate(
            settings.database_dsn, force=force, timescaledb=settings.timescaledb
        )
    except checks.CannotStart as problem:
        checks.say(str(problem))
        raise SystemExit(1) from None
    for line in report:
        self.say(line)


@app.command()
async def records(self: AppCommand) -> None:
    """List the DSL records (models/) with their topics and tables."""
    from models import RECORDS

    rows = [
        [
            record.__name__,
            f"{record.topic.name} (key {record.topic.key_field}, "
            f"{record.topic.partitions} partitions; dead letters {record.topic.dead_letter_name})",
            f"{record.table.name} (time {record.table.time_column}, "
            f"key {', '.join(record.table.primary_key)})",
            (record.__doc__ or "").strip(),
        ]
        for record in RECORDS
    ]
    self.say(self.tabulate(rows, headers=["record", "topic", "table", "help"], title="Records"))


@app.command(
    argument("action", type=click.Choice(["plan", "apply"])),
    option("--json", "as_json", is_flag=True, help="The plan as JSON (after apply, with errors)."),
    option(
        "--recreate",
        is_flag=True,
        help="Drop and create again a topic with more partitions than the DSL's: LOSES ITS "
        "RECORDS (the sinks start its new log over, docs/deployment.md).",
    ),
)
async def topics(self: AppCommand, action: str, as_json: bool, recreate: bool) -> None:
    """Compare the broker's topics with the DSL's (`plan`), or make them match (`apply`):
    create missing topics, raise partitions, change configs; never lower partitions or delete
    records unless --recreate. The live tables' changelog topics follow their source topics'
    partitions. Exits 1 if a change failed."""
    import json

    from app.topic_admin import TopicAdmin, changelog_topics, wanted_topics

    replication = settings.topic_replication_factor
    tables = [(table.name, table.partitions or 0) for table in app.tables.values()]
    async with TopicAdmin.of(app) as admin:
        changelogs = changelog_topics(
            await admin.topic_names(), settings.app_id, tables, replication
        )
        plans = await admin.plan(wanted_topics(replication) + changelogs, recreate=recreate)
        outcomes = await admin.apply(plans) if action == "apply" else []
    if as_json:
        applied = {outcome.plan.topic.name for outcome in outcomes}
        failed = {o.plan.topic.name: o.error for o in outcomes if o.error is not None}
        answer = [plan.as_json() for plan in plans]
        for entry in answer:  # after apply: what failed, null for what was done
            if entry["topic"] in applied:
                entry["error"] = failed.get(entry["topic"])
        self.say(json.dumps(answer, indent=2, ensure_ascii=False))
    elif action == "plan":
        self.say(f"Topics on {settings.broker_url} against the DSL (models/):")
        width = max(len(plan.topic.name) for plan in plans)
        for plan in plans:
            self.say(f"  {plan.topic.name:<{width}}  {plan.describe()}")
        counts = Counter(plan.action for plan in plans)
        changed = len(plans) - counts["create"] - counts["none"]
        self.say(
            f"Plan: {counts['create']} to create, {changed} to change, {counts['none']} unchanged."
        )
    else:
        for outcome in outcomes:
            self.say(outcome.describe())
        for plan in plans:
            for note in plan.notes:
                self.say(f"{plan.topic.name}: not changed: {note}")
        failures = sum(outcome.error is not None for outcome in outcomes)
        untouched = len(plans) - len({outcome.plan.topic.name for outcome in outcomes})
        self.say(
            f"Applied: {len(outcomes) - failures} done, {failures} failed, "
            f"{untouched} of {len(plans)} topics left as they are."
        )
    if any(outcome.error is not None for outcome in outcomes):
        raise SystemExit(1)


@app.command(
    option("--coins", help="CoinGecko ids, comma-separated, e.g. bitcoin,ethereum."),
    option(
        "--top", type=click.IntRange(1, 5000), help="Instead of --coins: the top N by market cap."
    ),
    option("--days", type=click.IntRange(1), help="How many days back from now."),
    option("--since", help="Instead of --days: an ISO date or time, UTC (2026-01-31)."),
    option("--until", help="With --since: the end of the range, excluded (default: now)."),
    option(
        "--ohlc",
        is_flag=True,
        help="Also the candles of /coins/{id}/ohlc in the range: one call per coin; 4-hour "
        "candles within 30 days back, 4-day ones beyond.",
    ),
)
async def backfill(
    self: AppCommand,
    coins: str | None,
    top: int | None,
    days: int | None,
    since: str | None,
    until: str | None,
    ohlc: bool,
) -> None:
    """Publish CoinGecko's price history as backfilled prices; a re-run resumes where it stopped."""
    from agents.poller import publish_to_topics
    from app import checks, topic_admin
    from app.main import broker_credentials
    from coingecko.backfill import (
        Backfill,
        BackfillError,
        BackfillRequest,
        ProgressFile,
        parse_moment,
        progress_for,
    )
    from coingecko.client import CoinGeckoClient

    if (coins is None) == (top is None) or (days is None) == (since is None) or (days and until):
        raise click.UsageError("give --coins or --top, and --days or --since [--until]")
    problem = await checks.broker_problem(settings, broker_credentials(settings))
    if problem:
        checks.say(problem)
        raise SystemExit(1)
    try:
        request = BackfillRequest(
            coins=tuple(coin.strip() for coin in (coins or "").split(",") if coin.strip()),
            top=top,
            days=days,
            since=parse_moment(since) if since else None,
            until=parse_moment(until) if until else None,
            ohlc=ohlc,
        )
        # Redpanda creates no topic itself: the worker's start-up declaration, done here too.
        await topic_admin.declare_topics(app, settings.topic_replication_factor)
        async with CoinGeckoClient(settings) as client:
            store = ProgressFile(Path(settings.data_dir))
            run = Backfill(client, settings.plan, publish_to_topics, store, progress_for())
            summary = await run.run(request)
    except BackfillError as error:
        checks.say(f"backfill: {error}")
        raise SystemExit(1) from None
    finally:
        await app.producer.stop()
    self.say(f"backfill: {summary}")
    for coin, why in summary.failed.items():
        checks.say(f"backfill: {coin} left out: {why}")
    if summary.failed:
        raise SystemExit(1)


class up(AppCommand):  # the class name is the command name: `faust -A app up`
    """Run the worker on embedded defaults: broker and PostgreSQL when their URLs are unset."""

    options = [
        option(
            "--no-worker",
            is_flag=True,
            help="Start the stand-ins and migrate only, and write the environment that uses them "
            "to DATA_DIR/stand-ins.env (for `honcho start -e`), until Ctrl-C.",
        )
    ]

    def __call__(self, *args: object, **kwargs: object) -> NoReturn:
        """Not async, unlike the other commands: it supervises processes, in the foreground."""
        from local.up import up

        raise SystemExit(up(settings, run_worker=not self.kwargs["no_worker"]))


class mcp(AppCommand):  # `faust -A app mcp`
    """Serve the MCP tools on stdin/stdout (for desktop assistants); needs only the database."""

    def __call__(self, *args: object, **kwargs: object) -> NoReturn:
        """Not async: no Faust worker (and no broker connection) runs around the server."""
        import anyio

        from mcpserver.server import serve_stdio

        anyio.run(serve_stdio, settings)
        raise SystemExit(0)
