"""PostgreSQL statements that take a whole ledger batch in one round trip.

A batch's rows travel as column arrays (``unnest``): one statement, one
executor start-up and one network round trip per batch instead of one per
row. When every row of a batch belongs to one key (the common case: the
reservation and the spend touch a single ``api_keys`` row, so no lock order
can deadlock two replicas), the key's update rides in the same statement, as
a data-modifying CTE, and the statement runs in autocommit: the whole batch
is one atomic statement, one round trip, instead of BEGIN, two statements
and COMMIT.

- ``RESERVE_AND_OPEN``: reserve the batch's worst case on the key *if* it is
  active and its budget covers it, and insert the rows only then. It inserts
  all of them or none (then the ledger takes them row by row).
- ``CLOSE_AND_SPEND``: close the rows still open (under their row locks, so
  exactly once across replicas), move what they reserved to spend on the
  key, and return the ids it closed.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

# OpenRow.values() names and their types.
_OPEN_COLUMNS = (
    ("id", "text"),
    ("key_id", "text"),
    ("model", "text"),
    ("stream", "boolean"),
    ("include_usage", "boolean"),
    ("n", "integer"),
    ("status", "text"),
    ("prompt_tokens", "integer"),
    ("reserved_nanos", "bigint"),
    ("created_at", "float8"),
    ("day", "text"),
    ("instance", "text"),
    ("user", "text"),
    ("closed_at", "float8"),
    ("error", "text"),
)
_INSERT = "INSERT INTO requests ({}) SELECT * FROM unnest({})".format(
    ", ".join(f'"{name}"' for name, _ in _OPEN_COLUMNS),
    ", ".join(f"%(c{i})s::{kind}[]" for i, (_, kind) in enumerate(_OPEN_COLUMNS)),
)

OPEN = _INSERT

RESERVE_AND_OPEN = (
    "WITH reserved AS ("
    " UPDATE api_keys SET reserved_nanos = reserved_nanos + %(k_amount)s"
    " WHERE id = %(k_id)s AND revoked_at IS NULL"
    " AND (expires_at IS NULL OR expires_at > %(k_now)s)"
    " AND (budget_nanos IS NULL OR spent_nanos + reserved_nanos + %(k_amount)s <= budget_nanos)"
    " RETURNING id) " + _INSERT + " WHERE EXISTS (SELECT 1 FROM reserved)"
)

# CloseRow.params() names → column, type; r_reserved is only read (for the spend).
_CLOSE_COLUMNS = (
    ("r_id", "id", "text"),
    ("r_status", "status", "text"),
    ("r_prompt", "prompt_tokens", "integer"),
    ("r_cached", "cached_tokens", "integer"),
    ("r_completion", "completion_tokens", "integer"),
    ("r_cost", "cost_nanos", "bigint"),
    ("r_estimated", "estimated", "boolean"),
    ("r_queue", "queue_ms", "float8"),
    ("r_ttft", "ttft_ms", "float8"),
    ("r_total", "total_ms", "float8"),
    ("r_closed", "closed_at", "float8"),
    ("r_error", "error", "text"),
    ("r_reserved", "reserved", "bigint"),
)
_CLOSED = (
    "UPDATE requests AS r SET {} FROM unnest({}) AS v({}) "
    "WHERE r.id = v.id AND r.status = 'open' RETURNING r.id, v.cost_nanos, v.reserved"
).format(
    ", ".join(f"{column} = v.{column}" for _, column, _ in _CLOSE_COLUMNS[1:-1]),
    ", ".join(f"%({param})s::{kind}[]" for param, _, kind in _CLOSE_COLUMNS),
    ", ".join(column for _, column, _ in _CLOSE_COLUMNS),
)

CLOSE = f"WITH closed AS ({_CLOSED}) SELECT id FROM closed"

CLOSE_AND_SPEND = (
    f"WITH closed AS ({_CLOSED}), spent AS ("
    " UPDATE api_keys SET spent_nanos = spent_nanos + s.cost,"
    " reserved_nanos = reserved_nanos - s.reserved"
    " FROM (SELECT sum(cost_nanos) AS cost, sum(reserved) AS reserved FROM closed) AS s"
    " WHERE api_keys.id = %(k_id)s AND s.cost IS NOT NULL) "
    "SELECT id FROM closed"
)


_OPEN_ROW = itemgetter(*(name for name, _ in _OPEN_COLUMNS))
_OPEN_PARAMS = [f"c{i}" for i in range(len(_OPEN_COLUMNS))]
_CLOSE_ROW = itemgetter(*(name for name, _, _ in _CLOSE_COLUMNS))
_CLOSE_PARAMS = [name for name, _, _ in _CLOSE_COLUMNS]


def _columns(names: list[str], values: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Rows of values → one list per column, named (transposed at C speed)."""
    columns = zip(*values, strict=True) if values else ([] for _ in names)
    return {name: list(column) for name, column in zip(names, columns, strict=True)}


def open_params(rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """``OpenRow.values()`` dicts as the column arrays of ``OPEN``/``RESERVE_AND_OPEN``."""
    params = _columns(_OPEN_PARAMS, list(map(_OPEN_ROW, rows)))
    params.update(extra)
    return params


def close_params(rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """``CloseRow.params()`` dicts as the column arrays of ``CLOSE``/``CLOSE_AND_SPEND``."""
    params = _columns(_CLOSE_PARAMS, list(map(_CLOSE_ROW, rows)))
    params.update(extra)
    return params
