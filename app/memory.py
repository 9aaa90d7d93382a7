"""The worker's garbage-collector thresholds, tuned for batch work.

CPython's default (700, 10, 10) collects the youngest generation every 700 new containers. A sink
batch keeps ~30,000 of them (records, messages, tuples) alive until it is stored, so each batch
was traversed again and again and promoted, and the full collections that followed walked the
whole heap: 2.2 s of collecting per 200,000 rows (~12 % of the worker), pauses up to 89 ms. Most of
those objects die by reference counting; with these thresholds the same run spent 0.03 s
collecting (docs/performance.md). Cycles are still collected, only less often.

They apply from the moment the `app` package is imported (app/__init__.py), before the rest of
the app: importing it under the defaults ran ~90 young, 8 middle and one full collection, 0.07-0.15
s of every process's start (two with these thresholds). Every process that imports the app gets
them: workers, commands, and the tests' own process.
"""

from __future__ import annotations

import gc

GC_THRESHOLDS = (50_000, 20, 10)


def collect_less_often() -> None:
    """Apply `GC_THRESHOLDS` to this process (the app's; the benchmarks' bare baseline too)."""
    gc.set_threshold(*GC_THRESHOLDS)
