"""The dashboard's login: a signed, expiring session cookie, CSRF tokens, slowed failures.

Signing in takes the master key. The session is a cookie
``tw_session = <expiry>.<nonce>.<hmac>``, HttpOnly, SameSite=Strict, for
``/dashboard`` only, signed with a secret derived from the server's
``key_secret`` (so every replica accepts it, and changing the secret ends
every session). Forms that change something carry ``csrf``, an HMAC of the
session's nonce, and must come from this origin. A wrong master key is
answered after a pause that doubles with each failure from the same address
(up to ``MAX_DELAY``): guessing is slow, and a right key is never slowed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

COOKIE = "tw_session"
PATH = "/dashboard"
LIFETIME = 8 * 3600
BASE_DELAY = 1.0
MAX_DELAY = 16.0


@dataclass(frozen=True)
class Session:
    nonce: str
    expires: int


class Sessions:
    def __init__(self, key_secret: str) -> None:
        self._key = hmac.new(
            key_secret.encode(), b"tokenwell dashboard sessions", "sha256"
        ).digest()
        self._failures: dict[str, int] = {}

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def issue(self, response: Response, request: Request) -> None:
        expires = int(time.time()) + LIFETIME
        payload = f"{expires}.{secrets.token_urlsafe(16)}"
        response.set_cookie(
            COOKIE,
            f"{payload}.{self._sign(payload)}",
            max_age=LIFETIME,
            path=PATH,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    @staticmethod
    def end(response: Response) -> None:
        response.delete_cookie(COOKIE, path=PATH, httponly=True, samesite="strict")

    def current(self, request: Request) -> Session | None:
        cookie = request.cookies.get(COOKIE, "")
        payload, _, signature = cookie.rpartition(".")
        if not payload or not _same(signature, self._sign(payload)):
            return None
        expires, _, nonce = payload.partition(".")
        if not expires.isdigit() or int(expires) <= time.time():
            return None
        return Session(nonce, int(expires))

    def csrf(self, session: Session) -> str:
        return self._sign("csrf:" + session.nonce)

    def csrf_ok(self, session: Session, request: Request, token: str | None) -> bool:
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
            return False
        return token is not None and _same(token, self.csrf(session))

    async def failed(self, client: str) -> None:
        """A wrong master key from ``client``: wait before answering, longer each time."""
        count = self._failures.get(client, 0)
        self._failures[client] = count + 1
        if len(self._failures) > 10_000:  # bounded: forget the oldest addresses
            for stale in list(self._failures)[:5_000]:
                del self._failures[stale]
        await asyncio.sleep(min(BASE_DELAY * 2**count, MAX_DELAY))

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


def _same(given: str, expected: str) -> bool:
    """Constant-time, and any text a client sends (compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())
