"""GET /health (no key: loading or ready) and GET /metrics (Prometheus; a token when
the server sets ``metrics_token``)."""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import Response

from tokenwell.errors import AuthenticationFailed
from tokenwell.server.responses import json_response


async def health(request: Request) -> Response:
    services = request.app.state.services
    models = {}
    for engine in services.models:
        error = services.engine_errors.get(engine.model_id)
        why = engine.unavailable
        if error:
            state = "failed"
        elif engine.ready:
            state = "ready"
        else:
            state = "unavailable" if why else "loading"
        models[engine.model_id] = {
            "status": state,
            **engine.stats(),
            **({"error": error or why} if error or why else {}),
        }
    states = {m["status"] for m in models.values()}
    if states == {"ready"}:
        status = "ready"
    else:
        status = next((s for s in ("failed", "unavailable") if s in states), "loading")
    return json_response(
        {"status": status, "models": models}, status=200 if status == "ready" else 503
    )


async def metrics(request: Request) -> Response:
    services = request.app.state.services
    token = services.settings.metrics_token
    if token is not None:
        given = request.headers.get("authorization") or ""
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), token.encode()
        ):
            raise AuthenticationFailed(
                "GET /metrics needs 'Authorization: Bearer <metrics_token>' (the server's "
                "metrics_token setting).",
            )
    body = services.metrics.render()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
