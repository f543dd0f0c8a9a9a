"""``GET /v1/usage`` reads a key's spend and its requests in one snapshot.

A close commits a request's row and the key's spend together; a usage read made
of two queries could see one without the other (a request counted without its
cost). Every request here costs the same, so at every read, while requests
close around it, the spend must be exactly the count times that cost.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import httpx

from tests.support import SCRIPTED_CONFIG, Server


def test_spend_and_count_agree_at_every_read(tmp_path: Path) -> None:
    with Server(tmp_path, SCRIPTED_CONFIG) as server:
        key = server.create_key(name="snapshot")["key"]
        auth = {"Authorization": f"Bearer {key}"}
        body = {"model": "scripted-64", "messages": [{"role": "user", "content": "same"}]}

        async def go() -> list[dict[str, object]]:
            reads: list[dict[str, object]] = []
            async with httpx.AsyncClient(base_url=server.base, headers=auth, timeout=60) as c:

                async def ask(n: int) -> None:
                    for _ in range(n):
                        r = await c.post("/v1/chat/completions", json=body)
                        assert r.status_code == 200, r.text

                async def read() -> None:
                    while not done.is_set():
                        r = await c.get("/v1/usage")
                        assert r.status_code == 200, r.text
                        reads.append(r.json())

                done = asyncio.Event()
                reader = asyncio.create_task(read())
                await asyncio.gather(*(ask(20) for _ in range(6)))
                done.set()
                await reader
                while reads[-1]["in_flight"] or reads[-1]["requests"] < 120:
                    await asyncio.sleep(0.05)  # the last closes commit just after the answers
                    reads.append((await c.get("/v1/usage")).json())
            return reads

        reads = asyncio.run(go())
    final = reads[-1]
    assert final["requests"] == 120
    unit = Decimal(str(final["spend_usd"])) / 120
    assert unit > 0
    during = [u for u in reads if 0 < int(u["requests"]) < 120]  # type: ignore[call-overload]
    assert len(during) >= 3, reads  # read while requests closed around them
    for usage in reads:
        assert Decimal(str(usage["spend_usd"])) == unit * int(usage["requests"]), usage  # type: ignore[call-overload]
