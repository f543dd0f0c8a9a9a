"""PostgreSQL statements that take a whole ledger batch in one round trip.

A batch's rows travel as one JSON parameter (``json_populate_recordset`` /
``json_to_recordset``): one statement, one executor start-up and one network
round trip per batch instead of one per row. JSON rather than one array per
column because the driver builds arrays in Python, at ~20 µs of the ledger
thread per row, where ``orjson`` writes the batch in ~9 (measured here).
When every row of a batch belongs to one key (the common case: the
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

from typing import Any

import orjson
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect

from tokenwell.billing import periods
from tokenwell.billing.budgets import RESERVE
from tokenwell.billing.db import CLOSE_COLUMNS, OPEN_COLUMNS, requests

_OPEN_COLUMNS = ", ".join(f'"{name}"' for name in OPEN_COLUMNS)
_INSERT = (
    f"INSERT INTO requests ({_OPEN_COLUMNS}) SELECT {_OPEN_COLUMNS} "
    "FROM json_populate_recordset(NULL::requests, %(rows)s::json)"
)

OPEN = _INSERT

# The ledger's own reservation (billing.budgets), as psycopg writes it.
_RESERVE = str(RESERVE.returning(RESERVE.table.c.id).compile(dialect=psycopg_dialect()))
RESERVE_AND_OPEN = (
    f"WITH reserved AS ({_RESERVE}) " + _INSERT + " WHERE EXISTS (SELECT 1 FROM reserved)"
)


def _type(column: str) -> str:
    return str(requests.c[column].type.compile(dialect=postgresql.dialect()))


# The close's parameters: the row's id, what it sets, and what it had reserved
# and the windows it was admitted in (only read, for the spend).
_CLOSE_PARAMS = (("r_id", "id"), *CLOSE_COLUMNS, ("r_reserved", "reserved_nanos"))
_WINDOWS = tuple(f"r_{p}" for p in periods.PERIODS)
_CLOSED = (
    "UPDATE requests AS r SET {} FROM json_to_recordset(%(rows)s::json) AS v({}) "
    "WHERE r.id = v.r_id AND r.status = 'open' RETURNING r.id, v.r_cost, v.r_reserved, {}"
).format(
    ", ".join(f"{column} = v.{param}" for param, column in CLOSE_COLUMNS),
    ", ".join(
        [f"{param} {_type(column)}" for param, column in _CLOSE_PARAMS]
        + [f"{w} float8" for w in _WINDOWS]
    ),
    ", ".join(f"v.{w}" for w in _WINDOWS),
)

CLOSE = f"WITH closed AS ({_CLOSED}) SELECT id FROM closed"

# A period's spend grows by the cost of the rows admitted in its current
# window (as billing.budgets.SPEND).
_PERIOD_SPEND = "".join(
    f", {p}_spent_nanos = {p}_spent_nanos + coalesce("
    f"(SELECT sum(c.r_cost) FROM closed AS c WHERE c.r_{p} = api_keys.{p}_start), 0)"
    for p in periods.PERIODS
)
CLOSE_AND_SPEND = (
    f"WITH closed AS ({_CLOSED}), spent AS ("
    " UPDATE api_keys SET spent_nanos = spent_nanos + s.cost,"
    f" reserved_nanos = reserved_nanos - s.reserved{_PERIOD_SPEND}"
    " FROM (SELECT sum(r_cost) AS cost, sum(r_reserved) AS reserved FROM closed) AS s"
    " WHERE api_keys.id = %(k_id)s AND s.cost IS NOT NULL) "
    "SELECT id FROM closed"
)


def rows_param(rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Row dicts (``OpenRow.values()`` or ``CloseRow.params()``) as the statements' one
    JSON parameter, with any further parameters."""
    return {"rows": orjson.dumps(rows).decode(), **extra}
