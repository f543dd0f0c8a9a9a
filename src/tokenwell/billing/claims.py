"""Idempotency claims written by the ledger's writer, in its batches.

A keyed request's claim (``billing.idempotency``) is no transaction of its
own: it rides on the request's write-ahead open (``OpenRow.claim``). In the
open's transaction, before any reservation, one statement claims every key
of the batch that is free (or whose record expired) and returns the request
ids that got theirs; an open whose key is held by another request writes no
row and reserves nothing (``Admission(False, "claimed")``), and a claimed
open the budget refuses gives its claim back in the same transaction. So the
claim and the ledger row are one write-ahead step: exactly one request per
key is admitted, on any replica, and no admitted request lacks its claim.

The end of a claim — the stored result (``state = 'done'``) or its release —
is a ``ClaimEnd`` queued like a close: group-committed with the closes
(``Ledger.end_claim``), instead of a transaction that competed with the
ledger writer for SQLite's one write lock.

Stored bodies are compressed (``pack``/``unpack``, zstd): a streamed response's
SSE text is ~18 KB for 64 chunks, and repeats itself.
"""

from __future__ import annotations

import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson
import zstandard
from sqlalchemy import Connection

_COLUMNS = (
    "key_id",
    "idempotency_key",
    "fingerprint",
    "request_id",
    "stream",
    "instance",
    "created_at",
    "expires_at",
)
# Claim what is free or expired, atomically per key: an expired record is
# taken over (its result forgotten); a live one is left alone and not returned.
_TAKE_OVER = (
    "ON CONFLICT (key_id, idempotency_key) DO UPDATE SET fingerprint = excluded.fingerprint, "
    "request_id = excluded.request_id, stream = excluded.stream, state = 'running', "
    "instance = excluded.instance, status_code = NULL, content_type = NULL, body = NULL, "
    "created_at = excluded.created_at, expires_at = excluded.expires_at "
    "WHERE idempotency_keys.expires_at <= excluded.created_at "
    "RETURNING request_id"
)
_INSERT = f"INSERT INTO idempotency_keys ({', '.join(_COLUMNS)}, state) "
SQLITE_CLAIM = (
    _INSERT
    + "SELECT "
    + ", ".join(f"value ->> {i}" for i in range(len(_COLUMNS)))
    + ", 'running' FROM json_each(?) WHERE true "  # WHERE: SQLite's upsert-after-SELECT rule
    + _TAKE_OVER
)
POSTGRESQL_CLAIM = (
    _INSERT
    + "SELECT "
    + ", ".join(f"v.{c}" for c in _COLUMNS)
    + ", 'running' FROM json_to_recordset(%(rows)s::json) AS v(key_id text, "
    "idempotency_key text, fingerprint text, request_id text, stream boolean, instance text, "
    "created_at float8, expires_at float8) " + _TAKE_OVER
)
_WHERE = "WHERE key_id = {0} AND idempotency_key = {0} AND request_id = {0}"
_FINISH = (
    "UPDATE idempotency_keys SET state = 'done', status_code = {0}, content_type = {0}, "
    "body = {0} " + _WHERE
)
_RELEASE = "DELETE FROM idempotency_keys " + _WHERE


@dataclass(slots=True)
class Claim:
    """What an open claims: its ``Idempotency-Key`` for ``ttl`` seconds."""

    idempotency_key: str
    fingerprint: str
    stream: bool
    ttl: float
    created_at: float = field(default_factory=time.time)


@dataclass(slots=True)
class ClaimEnd:
    """A claim's end, queued on the ledger like a close: its result stored
    (``status_code`` set; ``body`` None when too large to keep), or released."""

    key_id: str
    idempotency_key: str
    request_id: str
    status_code: int | None = None
    content_type: str | None = None
    body: bytes | None = None

    @property
    def release(self) -> bool:
        return self.status_code is None


class KeyClaimed(Exception):
    """The open's key is held by another request: nothing was written or reserved."""


def claim_values(key_id: str, request_id: str, instance: str, claim: Claim) -> list[Any]:
    return [
        key_id,
        claim.idempotency_key,
        claim.fingerprint,
        request_id,
        claim.stream,
        instance,
        claim.created_at,
        claim.created_at + claim.ttl,
    ]


def take(conn: Connection, dialect: str, rows: list[list[Any]]) -> set[str]:
    """Claim the keys of ``rows`` (``claim_values``, one per key); the request ids
    that got theirs."""
    if not rows:
        return set()
    if dialect == "postgresql":
        rows_json = orjson.dumps([dict(zip(_COLUMNS, r, strict=True)) for r in rows]).decode()
        found = conn.exec_driver_sql(POSTGRESQL_CLAIM, {"rows": rows_json})
    else:
        found = conn.exec_driver_sql(SQLITE_CLAIM, (orjson.dumps(rows),))
    return {row[0] for row in found}


def give_back(conn: Connection, dialect: str, ends: list[ClaimEnd]) -> None:
    """Store the results of ``ends``, and delete the claims released."""
    mark = "%s" if dialect == "postgresql" else "?"
    finished = [
        (e.status_code, e.content_type, e.body, e.key_id, e.idempotency_key, e.request_id)
        for e in ends
        if not e.release
    ]
    released = [(e.key_id, e.idempotency_key, e.request_id) for e in ends if e.release]
    if finished:
        conn.exec_driver_sql(_FINISH.format(mark), finished)
    if released:
        conn.exec_driver_sql(_RELEASE.format(mark), released)


# Stored bodies: b"\0s" + a zstd frame (level 1). Rows written before hold
# b"\0d" + raw deflate, b"\0z" + a zlib stream, or the body as it was (all read
# back alike).
_ZSTD = b"\0s"
_DEFLATE = b"\0d"
_ZLIB = b"\0z"
_compressors = threading.local()


def pack(body: bytes | None) -> bytes | None:
    """zstd level 1, each thread reusing one compressor: the size of deflate's
    on SSE text (~1/35 of a 64-token stream's 18 KB) in under half its
    instructions (75k vs 167k; deflate spends 65k of them setting up its
    window for every body), no checksum (the row is the database's to keep
    whole)."""
    if body is None:
        return None
    compressor = getattr(_compressors, "zstd", None)
    if compressor is None:
        compressor = _compressors.zstd = zstandard.ZstdCompressor(level=1)
    return _ZSTD + compressor.compress(body)


def unpack(body: bytes | None) -> bytes | None:
    if body is not None:
        marker = body[:2]
        if marker == _ZSTD:
            return zstandard.ZstdDecompressor().decompress(body[2:])
        if marker == _DEFLATE:
            return zlib.decompress(body[2:], -zlib.MAX_WBITS)
        if marker == _ZLIB:
            return zlib.decompress(body[2:])
    return body
