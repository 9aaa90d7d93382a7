"""How `./dev test` spreads the suite over pytest-xdist processes (`-n 4 --dist loadgroup`).

Most slow tests wait on sockets, timers and worker start-ups rather than on the CPU, so several
run side by side on two cores. Each xdist process has its own session fixtures (an embedded
broker and PostgreSQL of its own, under its own `popen-gwN` base temp directory).

Rules for tests (the first is checked by tests/test_testkit.py):
- A test module that defines a fixture wider than a function (module, class, package or session
  scope) marks its tests `pytest.mark.xdist_group("<its name>")`, so that one process sets it up
  once. (With pytest 9.2 and pytest-xdist 3.8 the mark has no effect, pytest-xdist issue #1386:
  each process that runs one of the module's tests sets the fixture up again. That is correct,
  only slower; a session-wide fixture that collects results must not rely on seeing every test.)
- Nothing may assume it runs alone: ports from `free_port()`, files under `tmp_path`, consumer
  groups and databases with unique names (the fixtures do all of this).
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Registered by pytest-xdist too; here as well so that `-p no:xdist` runs stay quiet.
    config.addinivalue_line(
        "markers", "xdist_group(name): run these tests in one xdist process (testkit/scheduling.py)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under xdist, hand out the slow tests first: a long test started last would run alone at the
    end while the other processes idle; the many short ones fill the gaps instead. (A plain
    `pytest` run keeps the file order, which module-scoped fixtures rely on.)"""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
