"""GET /v1/models and /v1/models/{id}: what is served, as a key may see it."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tokenwell.engines.base import Engine
from tokenwell.server.responses import json_response


def _model(engine: Engine) -> dict[str, Any]:
    card = engine.card()
    model: dict[str, Any] = {
        "id": card.id,
        "object": "model",
        "created": card.created,
        "owned_by": card.owned_by,
    }
    if engine.config.aliases:
        model["aliases"] = list(engine.config.aliases)
    if card.meta:  # as llama-server's `meta`: the engine, context length, task
        model["meta"] = card.meta
    return model


async def list_models(request: Request) -> Response:
    services = request.app.state.services
    key = await services.accounting.authenticate(request.headers.get("authorization"))
    data = [_model(e) for e in services.models if key.allows(e.model_id)]
    return json_response({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    services = request.app.state.services
    key = await services.accounting.authenticate(request.headers.get("authorization"))
    engine = services.models.get(request.path_params["model"])
    services.accounting.authorize(key, engine.model_id)
    return json_response(_model(engine))
