"""One log line per request (``tokenwell.requests``), and one per refusal.

A settled request: its id, key, model, status, tokens, cost and timings, at
``info`` (``warning`` when the engine or an upstream failed). A request
refused before it was admitted (401, 403, 429, 503): its status, code and
route, at ``info``. No secret is ever written: a refused key is not even
shown masked (the client's message has that).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tokenwell.billing.money import cost_nanos, nanos_to_usd
from tokenwell.protocol.events import Meter

if TYPE_CHECKING:
    from starlette.requests import Request

    from tokenwell.billing.accounting import Ticket
    from tokenwell.errors import APIError

log = logging.getLogger("tokenwell.requests")

_FAILED = {"engine_error", "upstream_error"}
# Refusals worth a line at info: who was turned away, and why.
_REFUSALS = {401, 403, 429, 503}


def finished(
    ticket: Ticket,
    status: str,
    meter: Meter,
    *,
    queue_ms: float | None = None,
    ttft_ms: float | None = None,
    total_ms: float | None = None,
    error: str | None = None,
) -> int:
    """Log a settled request; its cost in nano-dollars (what the ledger bills)."""
    billed = Meter() if status == "rejected" else meter
    cost = cost_nanos(
        ticket.price, billed.prompt_tokens, billed.cached_tokens, billed.completion_tokens
    )
    fields = {
        "request_id": ticket.request_id,
        "key_id": ticket.key.id,
        "model": ticket.model,
        "status": status,
        "prompt_tokens": billed.prompt_tokens,
        "cached_tokens": billed.cached_tokens,
        "completion_tokens": billed.completion_tokens,
        "cost_usd": nanos_to_usd(cost),
        "queue_ms": _ms(queue_ms),
        "ttft_ms": _ms(ttft_ms),
        "total_ms": _ms(total_ms),
    }
    if error:
        fields["error"] = error
    level = logging.WARNING if status in _FAILED else logging.INFO
    log.log(level, "request %s", status, extra={"fields": fields, "request_id": ticket.request_id})
    return cost


def refused(request: Request, error: APIError) -> None:
    """Log a request answered with an error before it was admitted."""
    if error.status not in _REFUSALS:
        log.debug("%s %s answered %d", request.method, request.url.path, error.status)
        return
    fields: dict[str, object] = {
        "status": error.status,
        "code": error.code,
        "method": request.method,
        "path": request.url.path,
    }
    rid = error.headers.get("x-request-id")
    # A 401's message quotes the key it refused (masked): not for the log.
    if error.status != 401:
        fields["reason"] = error.message
    log.info(
        "refused %d %s",
        error.status,
        error.code or error.type,
        extra={
            "fields": fields,
            "request_id": rid,
        },
    )


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
