"""SQLite statements that take a whole ledger batch as one JSON parameter.

The ``sqlite3`` module lets go of the GIL around every step of a statement,
and ``executemany`` steps once per row: a batch of 50 rows meant 50 hand-offs
of the GIL between the ledger thread and the event loop, each of which may
wait for the loop's switch interval while it is busy. One statement over
``json_each(?)`` is one step for the whole batch.

Needs SQLite 3.38 (JSON built in; ``UPDATE … FROM`` and ``RETURNING`` came
in 3.33 and 3.35); ``AVAILABLE`` says whether this one has it, and the
ledger falls back to ``executemany`` when it does not.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson

AVAILABLE = sqlite3.sqlite_version_info >= (3, 38, 0)

_OPEN_COLUMNS = (
    "id",
    "key_id",
    "model",
    "stream",
    "include_usage",
    "n",
    "status",
    "prompt_tokens",
    "reserved_nanos",
    "created_at",
    "day",
    "instance",
    "user",
    "closed_at",
    "error",
)

OPEN = "INSERT INTO requests ({}) SELECT {} FROM json_each(?)".format(
    ", ".join(f'"{name}"' for name in _OPEN_COLUMNS),
    ", ".join(f"json_extract(value, '$.{name}')" for name in _OPEN_COLUMNS),
)

# CloseRow.params() names → the column each sets.
_CLOSE_COLUMNS = (
    ("r_status", "status"),
    ("r_prompt", "prompt_tokens"),
    ("r_cached", "cached_tokens"),
    ("r_completion", "completion_tokens"),
    ("r_cost", "cost_nanos"),
    ("r_estimated", "estimated"),
    ("r_queue", "queue_ms"),
    ("r_ttft", "ttft_ms"),
    ("r_total", "total_ms"),
    ("r_closed", "closed_at"),
    ("r_error", "error"),
)

# Only rows still open match; RETURNING says which this statement closed.
CLOSE = (
    "UPDATE requests SET {} FROM (SELECT json_extract(value, '$.r_id') AS r_id, {} "
    "FROM json_each(?)) AS v WHERE requests.id = v.r_id AND requests.status = 'open' "
    "RETURNING requests.id"
).format(
    ", ".join(f"{column} = v.{name}" for name, column in _CLOSE_COLUMNS),
    ", ".join(f"json_extract(value, '$.{name}') AS {name}" for name, _ in _CLOSE_COLUMNS),
)


def rows_param(rows: list[dict[str, Any]]) -> tuple[str]:
    """Row dicts as the statements' one parameter."""
    return (orjson.dumps(rows).decode(),)
