"""Faust agents and timers; importing this package registers them on `app.main.app`."""

from agents import partitions, poller, sinks  # noqa: F401
