"""The admin API, for the master key: keys and the usage report."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from tokenwell.billing import alerts, audit
from tokenwell.billing.keys import parse_key_fields, parse_rotation, parse_when
from tokenwell.billing.usage import as_csv, parse_day, parse_group_by, request_rows
from tokenwell.billing.usage import usage_report as report
from tokenwell.errors import InvalidRequest, NotFound, PermissionDenied
from tokenwell.protocol.requests import decode_json
from tokenwell.server.app_state import services_of

if TYPE_CHECKING:
    from tokenwell.server.app import Services
from tokenwell.server.body import read_body
from tokenwell.server.responses import json_response


async def _admin(request: Request) -> Services:
    services = services_of(request)
    key = await services.accounting.authenticate(request.headers.get("authorization"))
    if not key.is_master:
        raise PermissionDenied("The admin API needs the master key.", code="admin_only")
    return services


def _actor(request: Request) -> str:
    """Who the audit trail names: the master key, and where the call came from."""
    client = request.client
    return f"admin-api master key from {client.host if client else 'unknown'}"


async def rotate_key(request: Request) -> Response:
    services = await _admin(request)
    body = await read_body(request, 64 * 1024)
    rotation = parse_rotation(decode_json(body) if body.strip() else {})
    secret, record = await services.keys.rotate(
        request.path_params["key_id"], rotation.grace_seconds, _actor(request)
    )
    return json_response({**record.public(), "key": secret})


async def audit_trail(request: Request) -> Response:
    services = await _admin(request)
    q = request.query_params
    action = q.get("action")
    if action is not None and action not in audit.ACTIONS:
        raise InvalidRequest(
            f"Invalid 'action': {action!r}. Supported values are: {', '.join(audit.ACTIONS)}.",
            param="action",
            code="invalid_value",
        )
    rows = await audit.entries(
        services.db, key_id=q.get("key_id"), action=action, limit=_limit(q.get("limit", "100"))
    )
    return json_response({"object": "list", "data": rows})


async def alert_outbox(request: Request) -> Response:
    services = await _admin(request)
    rows = await alerts.outbox(services.db, limit=_limit(request.query_params.get("limit", "100")))
    return json_response({"object": "list", "data": rows})


def _limit(limit: str) -> int:
    # isascii: str.isdigit() accepts "²", which int() refuses.
    if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= 1000:
        raise InvalidRequest(
            f"Invalid 'limit': expected an integer from 1 to 1000, got {limit!r}.",
            param="limit",
            code="invalid_value",
        )
    return int(limit)


async def create_key(request: Request) -> Response:
    services = await _admin(request)
    data = decode_json(await read_body(request, 64 * 1024))
    fields, given = parse_key_fields(data, creating=True)
    secret, record = await services.keys.create(fields, given, _actor(request))
    return json_response({**record.public(), "key": secret}, status=201)


async def list_keys(request: Request) -> Response:
    services = await _admin(request)
    records = await services.keys.list()
    return json_response({"object": "list", "data": [r.public() for r in records]})


async def get_key(request: Request) -> Response:
    services = await _admin(request)
    record = await services.keys.get(request.path_params["key_id"])
    return json_response(record.public())


async def update_key(request: Request) -> Response:
    services = await _admin(request)
    data = decode_json(await read_body(request, 64 * 1024))
    fields, given = parse_key_fields(data, creating=False)
    record = await services.keys.update(
        request.path_params["key_id"], fields, given, _actor(request)
    )
    return json_response(record.public())


async def revoke_key(request: Request) -> Response:
    services = await _admin(request)
    record = await services.keys.revoke(request.path_params["key_id"], _actor(request))
    return json_response(record.public())


async def usage_report(request: Request) -> Response:
    services = await _admin(request)
    q = request.query_params
    group_by = parse_group_by(q.get("group_by"))
    fmt = q.get("format", "json")
    if fmt not in ("json", "csv"):
        raise InvalidRequest(
            f"Invalid 'format': {fmt!r}. Supported values are: json, csv.",
            param="format",
            code="invalid_value",
        )
    rows = await report(
        services.db,
        group_by,
        since=parse_day(q.get("since"), "since"),
        until=parse_day(q.get("until"), "until"),
        key_id=q.get("key_id"),
        model=q.get("model"),
        user=q.get("user"),
    )
    if fmt == "csv":
        return Response(as_csv(rows, group_by), media_type="text/csv; charset=utf-8")
    return json_response({"object": "list", "data": rows})


async def list_requests(request: Request) -> Response:
    services = await _admin(request)
    q = request.query_params
    rows = await request_rows(
        services.db,
        key_id=q.get("key_id"),
        status=q.get("status"),
        limit=_limit(q.get("limit", "100")),
        model=q.get("model"),
        since=_when(q.get("since"), "since"),
        until=_when(q.get("until"), "until"),
    )
    return json_response({"object": "list", "data": rows})


def _when(value: str | None, param: str) -> float | None:
    try:
        return parse_when(value) if value else None
    except ValueError as exc:
        raise InvalidRequest(
            f"Invalid '{param}': {exc}.", param=param, code="invalid_value"
        ) from exc


async def get_request(request: Request) -> Response:
    services = await _admin(request)
    request_id = request.path_params["request_id"]
    rows = await request_rows(services.db, request_id=request_id, limit=1)
    if not rows:
        raise NotFound(f"No request with id {request_id!r}.", param="id", code="request_not_found")
    return json_response(rows[0])
