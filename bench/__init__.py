"""Benchmarks (not tests): each module is a script, `.venv/bin/python -m bench.<name>`.

Every script starts its own embedded broker and embedded PostgreSQL in a temporary directory,
measures its baselines in the same run, and prints a table. `docs/performance.md` has the
commands, the machine and the results.
"""
