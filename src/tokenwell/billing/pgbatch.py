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

# The same, with the batch's end users' reservations (``users``: one JSON row
# per end user, {u, w, amt}; every end user of a key has the same limit,
# ``lim``): the key's row first (the end users' wait for it), then each end
# user's row, and the requests only when every one of them had room. Its
# answer: how many requests were inserted. Run in a transaction, rolled back
# unless that is all of them (then the ledger goes row by row).
_ROLLED = (
    "CASE WHEN end_user_spend.window_start < excluded.window_start THEN 0"
    " ELSE end_user_spend.spent_nanos END"
)
RESERVE_USERS_AND_OPEN = (
    f"WITH reserved AS ({_RESERVE}), users AS ("
    " INSERT INTO end_user_spend (key_id, end_user, window_start, spent_nanos, reserved_nanos)"
    " SELECT %(k_id)s, v.u, v.w, 0, v.amt FROM json_to_recordset(%(users)s::json)"
    " AS v(u varchar, w float8, amt bigint)"
    " WHERE EXISTS (SELECT 1 FROM reserved) AND v.amt <= %(lim)s"
    " ON CONFLICT (key_id, end_user) DO UPDATE SET"
    f" spent_nanos = {_ROLLED},"
    " window_start = greatest(end_user_spend.window_start, excluded.window_start),"
    " reserved_nanos = end_user_spend.reserved_nanos + excluded.reserved_nanos"
    f" WHERE {_ROLLED} + end_user_spend.reserved_nanos + excluded.reserved_nanos <= %(lim)s"
    " RETURNING 1), opened AS (" + _INSERT + " WHERE EXISTS (SELECT 1 FROM reserved)"
    " AND (SELECT count(*) FROM users) = %(n_users)s RETURNING 1) "
    "SELECT count(*) FROM opened"
)


def _type(column: str) -> str:
    return str(requests.c[column].type.compile(dialect=postgresql.dialect()))


# The close's parameters: the row's id, what it sets, and what it had reserved
# and the windows it was admitted in (only read, for the spend).
_CLOSE_PARAMS = (("r_id", "id"), *CLOSE_COLUMNS, ("r_reserved", "reserved_nanos"))
# The windows it was admitted in, and its end user's (r_user: none when its
# open reserved on no end user).
_WINDOWS = (*(f"r_{p}" for p in periods.PERIODS), "r_uw")
_CLOSED = (
    "UPDATE requests AS r SET {} FROM json_to_recordset(%(rows)s::json) AS v({}) "
    "WHERE r.id = v.r_id AND r.status = 'open' "
    "RETURNING r.id, v.r_cost, v.r_reserved, v.r_user, {}"
).format(
    ", ".join(f"{column} = v.{param}" for param, column in CLOSE_COLUMNS),
    ", ".join(
        [f"{param} {_type(column)}" for param, column in _CLOSE_PARAMS]
        + [f"{w} float8" for w in _WINDOWS]
        + ["r_user varchar"]
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
# End users' rows are updated after the key's (they wait for ``spent``): the
# order every other path takes their locks in.
CLOSE_AND_SPEND = (
    f"WITH closed AS ({_CLOSED}), spent AS ("
    " UPDATE api_keys SET spent_nanos = spent_nanos + s.cost,"
    f" reserved_nanos = reserved_nanos - s.reserved{_PERIOD_SPEND}"
    " FROM (SELECT sum(r_cost) AS cost, sum(r_reserved) AS reserved FROM closed) AS s"
    " WHERE api_keys.id = %(k_id)s AND s.cost IS NOT NULL RETURNING api_keys.id), users AS ("
    " UPDATE end_user_spend AS e SET spent_nanos = e.spent_nanos + coalesce("
    "(SELECT sum(c.r_cost) FROM closed AS c"
    " WHERE c.r_user = e.end_user AND c.r_uw = e.window_start), 0),"
    " reserved_nanos = e.reserved_nanos - coalesce("
    "(SELECT sum(c.r_reserved) FROM closed AS c WHERE c.r_user = e.end_user), 0)"
    " WHERE e.key_id = %(k_id)s AND EXISTS (SELECT 1 FROM spent)"
    " AND e.end_user IN (SELECT r_user FROM closed WHERE r_user IS NOT NULL)) "
    "SELECT id FROM closed"
)


def rows_param(rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Row dicts (``OpenRow.values()`` or ``CloseRow.params()``) as the statements' one
    JSON parameter, with any further parameters."""
    return {"rows": orjson.dumps(rows).decode(), **extra}
