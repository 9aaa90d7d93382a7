"""QiCore Streams: `faust -A app worker` finds the Faust application here.

The app is assembled here: importing the package registers the commands (`faust -A app
<command>`), the agents (poller, sinks), the live tables with their web views, the MCP server's
`/mcp` and the dashboard at `/`; a worker makes the live tables observers of the sinks that feed
them when it starts.
"""

# First: the rest of the app is imported under the worker's collector thresholds (app/memory.py).
from app.memory import collect_less_often

collect_less_often()

import agents  # noqa: E402
import dashboard.web  # noqa: E402
import mcpserver.web  # noqa: E402
import tables  # noqa: E402
from app import commands  # noqa: E402
from app.main import app, settings, topics  # noqa: E402


@app.on_worker_init.connect
def _observe_sinks(sender: object, /, *args: object, signal: object, **kwargs: object) -> None:
    """The live tables follow what the sinks store, not the topics (tables/live.py). Done when
    the worker starts, not at import: `tables` may be imported first, while this package is
    still importing it."""
    for topic, observer in tables.live.OBSERVERS.items():
        if topic in agents.sinks.SINKS:  # sunk here (SINK_TOPICS)
            agents.sinks.SINKS[topic].observers.append(observer)


__all__ = ["agents", "app", "commands", "dashboard", "mcpserver", "settings", "tables", "topics"]
