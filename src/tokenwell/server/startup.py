"""Start-up failures as one sentence each, never a traceback.

What an operator gets wrong first — a port already taken, a data directory
another server holds, a database that is not there, a file that does not
exist, a schema from a newer tokenwell — is caught where it happens and
raised as ``StartupFailed`` with the cause and the fix; ``tokenwell serve``
prints it and exits 1. An exception of any other kind is a bug and keeps its
traceback.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenwell.config import Settings
from tokenwell.errors import StartupFailed, TokenwellError

# The [[models]] keys that name files: checked before anything loads.
FILE_KEYS = ("path", "tokenizer")


def check_files(settings: Settings) -> None:
    for model in settings.models:
        for key in FILE_KEYS:
            value = model.options.get(key)
            if isinstance(value, str) and not Path(value).expanduser().is_file():
                raise StartupFailed(
                    f"model {model.name!r}: {key} = {value!r} is not a file "
                    "(a GGUF file this machine can read is needed)"
                )


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else starts."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupFailed(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupFailed(
                f"port {port} on {host} is already in use (another tokenwell, or another "
                "server): stop it, or choose another port with --port or TOKENWELL_PORT"
            ) from exc
        if exc.errno == errno.EACCES:
            raise StartupFailed(
                f"no permission to listen on port {port}: choose one above 1023 with --port"
            ) from exc
        raise StartupFailed(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


def shown_url(url: str) -> str:
    """A database URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def unreachable(url: str, exc: BaseException) -> StartupFailed:
    """The ledger's database could not be opened."""
    if isinstance(exc, TokenwellError):
        return StartupFailed(str(exc))
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return StartupFailed(
        f"cannot reach the database at {shown_url(url)}: {_first_line(cause)} "
        "(check database.url or TOKENWELL_DATABASE_URL, and that the server is running)"
    )


def migration_refused(url: str, exc: BaseException) -> StartupFailed:
    """The ledger's database was reached, but its schema could not be brought up to date."""
    from alembic.util.exc import CommandError

    where = shown_url(url)
    if isinstance(exc, CommandError):
        return StartupFailed(
            f"the database at {where} cannot be migrated: {_first_line(exc)} (its schema "
            "was written by a newer tokenwell: run that version, or use another database)"
        )
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return StartupFailed(f"the database at {where} refused the migrations: {_first_line(cause)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # SQLAlchemy appends "(Background on this error at: https://sqlalche.me/...)".
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "sqlalche.me" not in ln]
    first = lines[0] if lines else type(exc).__name__
    # psycopg repeats the host per address tried: keep the first.
    return first.rstrip(".")


def refusing_lifespan(app: ASGIApp, on_failure: Callable[[str], None]) -> ASGIApp:
    """``app`` with start-up failures reported through ``on_failure(sentence)``.

    Starlette sends ``lifespan.startup.failed`` with the whole traceback, which
    uvicorn prints; a ``TokenwellError`` is an expected failure whose message
    says everything, so the traceback is left out and the error is handed on.
    """

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        pending: list[Message] = []

        async def send_quietly(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                pending.append(message)  # sent once the error is known
                return
            await send(message)

        try:
            await app(scope, receive, send_quietly)
        except TokenwellError as exc:
            on_failure(str(exc))
            await send({"type": "lifespan.startup.failed", "message": ""})
            return
        except BaseException:
            for message in pending:
                await send(message)
            raise
        for message in pending:
            await send(message)

    return wrapped


class DropStartupNoise(logging.Filter):
    """uvicorn's own "Application startup failed. Exiting.": the sentence says more."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Application startup failed")
