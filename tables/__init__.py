"""Live Faust tables and the web views over them; importing this package registers both."""

from tables import live, stream, views

__all__ = ["live", "stream", "views"]
