"""QiCore Streams: `faust -A app worker` finds the Faust application here."""

from app.main import app, settings, topics
from app import commands  # noqa: E402,F401  (registers `faust -A app <command>`)

__all__ = ["app", "settings", "topics"]
