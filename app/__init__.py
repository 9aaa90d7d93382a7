"""QiCore Streams: `faust -A app worker` finds the Faust application here.

Importing the package registers everything on the app: the commands (`faust -A app <command>`),
the agents (poller, sinks) and the live tables with their web views.
"""

import agents
import tables
from app import commands
from app.main import app, settings, topics

__all__ = ["agents", "app", "commands", "settings", "tables", "topics"]
