"""The interpreter's settings for a long-running server: GIL hand-off and garbage collection.

A server allocates and frees objects for every token it streams, so
CPython's default collector runs often and, once start-up has filled the
heap (SQLAlchemy, pydantic, the engines' modules), each full collection
walks all of it: measured here at 64 streams, garbage collection cost ~30 µs
of the event loop per request with metering on, half of what metering
itself costs (bench/RESULTS.md). Two standard remedies:

- a larger threshold for the youngest generation, so a collection runs when
  live objects have really grown, not every 700 allocations of requests
  that come and go (``gc_threshold``);
- ``gc.freeze()`` once the server has started: what start-up built lives as
  long as the process, and is left out of every later collection.
"""

from __future__ import annotations

import gc
import sys

from tokenwell.config import Settings


def tune(settings: Settings) -> None:
    """Before start-up: the GIL's switch interval and the collector's threshold."""
    # The event loop shares the GIL with the engine's decode thread and the
    # ledger's commit thread; each needs it back promptly after C calls that
    # release it, and CPython's default hand-off is 5 ms.
    sys.setswitchinterval(settings.gil_switch_ms / 1000)
    if settings.gc_threshold:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(settings.gc_threshold, older, oldest)


def started(settings: Settings) -> None:
    """Once the server is up: leave what start-up built out of later collections."""
    if settings.gc_freeze:
        gc.collect()
        gc.freeze()
