"""GET /health (no key: loading or ready) and GET /metrics (Prometheus)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from tokenwell.server.responses import json_response


async def health(request: Request) -> Response:
    services = request.app.state.services
    models = {}
    for engine in services.models:
        error = services.engine_errors.get(engine.model_id)
        state = "failed" if error else ("ready" if engine.ready else "loading")
        models[engine.model_id] = {
            "status": state,
            **engine.stats(),
            **({"error": error} if error else {}),
        }
    states = {m["status"] for m in models.values()}
    status = "ready" if states == {"ready"} else ("failed" if "failed" in states else "loading")
    return json_response(
        {"status": status, "models": models}, status=200 if status == "ready" else 503
    )


async def metrics(request: Request) -> Response:
    body = request.app.state.services.metrics.render()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
