"""The app in this process, on a fake clock: what a test of calendar budgets needs."""

from __future__ import annotations

import asyncio
import contextlib
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from tests.support import KEY_SECRET, MASTER, SCRIPTED_CONFIG
from tokenwell.config import Settings
from tokenwell.server.app import Services, create_app


class Clock:
    """What the server's accounting takes for now (``Accounting.clock``)."""

    def __init__(self, when: str) -> None:
        self.now = 0.0
        self.set(when)

    def set(self, when: str) -> None:
        self.now = datetime.fromisoformat(when).timestamp()

    def __call__(self) -> float:
        return self.now


@dataclass
class App:
    services: Services
    http: httpx.AsyncClient
    clock: Clock

    async def create_key(self, **fields: Any) -> dict[str, Any]:
        fields.setdefault("name", "test")
        r = await self.http.post("/admin/keys", json=fields, headers=_auth(MASTER))
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    async def chat(self, key: str, **body: Any) -> httpx.Response:
        body.setdefault("model", "scripted-64")
        body.setdefault("messages", [{"role": "user", "content": "go"}])
        return await self.http.post("/v1/chat/completions", json=body, headers=_auth(key))

    async def usage(self, key: str, **params: str) -> dict[str, Any]:
        """``GET /v1/usage`` once every request has settled (a close commits just
        after its response)."""
        for _ in range(500):
            r = await self.http.get("/v1/usage", params=params, headers=_auth(key))
            assert r.status_code == 200, r.text
            if r.json()["in_flight"] == 0 and r.json()["reserved_usd"] == "0.0":
                break
            await asyncio.sleep(0.01)
        return r.json()  # type: ignore[no-any-return]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextlib.asynccontextmanager
async def running(tmp_path: Path, db_url: str, when: str, **settings: Any) -> AsyncIterator[App]:
    config = tomllib.loads(SCRIPTED_CONFIG)
    config.update(
        data_dir=str(tmp_path / "data"),
        master_key=MASTER,
        key_secret=KEY_SECRET,
        database={"url": db_url},
        **settings,
    )
    app = create_app(Settings.model_validate(config))
    clock = Clock(when)
    async with app.router.lifespan_context(app):
        services: Services = app.state.services
        services.accounting.clock = clock
        while not all(engine.ready for engine in services.models):
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tokenwell") as http:
            yield App(services, http, clock)
