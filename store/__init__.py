"""Database access: connections (and, next to them, the sink's writer)."""
