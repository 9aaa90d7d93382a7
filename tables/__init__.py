"""Live Faust tables and the web views over them; importing this package registers both."""

from tables import live, views

__all__ = ["live", "views"]
