"""``create_app(settings)``: the ASGI app. Nothing happens at import time.

The lifespan owns everything with a life: the database and its migrations,
crash recovery of the ledger, the ledger writer, rate limiters, and the
engines (loaded in the background, so ``/health`` can say "loading").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.exc import ArgumentError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tokenwell.billing.accounting import Accounting
from tokenwell.billing.alerts import AlertDelivery, AlertWriter
from tokenwell.billing.db import Database
from tokenwell.billing.idempotency import IdempotencyStore
from tokenwell.billing.journal import Journal
from tokenwell.billing.keychanges import key_changes
from tokenwell.billing.keys import KeyHasher, KeyStore
from tokenwell.billing.ledger import Ledger
from tokenwell.billing.ratelimit import LocalRateLimiter, RateLimiter, RedisRateLimiter
from tokenwell.billing.responses import ResponseStore
from tokenwell.config import Settings
from tokenwell.engines.base import Engine
from tokenwell.engines.registry import create_engine
from tokenwell.errors import (
    APIError,
    ClientDisconnected,
    ConfigError,
    EngineUnusable,
    StartupFailed,
)
from tokenwell.moderation import ContentPolicy
from tokenwell.server import bootstrap, startup
from tokenwell.server.chat import ChatService, ModelRegistry
from tokenwell.server.completions import CompletionsService
from tokenwell.server.dashboard import views as dashboard
from tokenwell.server.dashboard.session import Sessions
from tokenwell.server.embeddings import EmbeddingsService
from tokenwell.server.errors import ErrorBoundary, api_error, client_gone, http_error
from tokenwell.server.idempotent import IdempotencyService
from tokenwell.server.messages import MessagesService
from tokenwell.server.metrics import Metrics
from tokenwell.server.responses_api import ResponsesService
from tokenwell.server.routes import (
    admin,
    chat,
    completions,
    embeddings,
    health,
    messages,
    models,
    openapi,
    usage,
)
from tokenwell.server.routes import responses as responses_routes

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    db: Database
    accounting: Accounting
    keys: KeyStore
    models: ModelRegistry
    chat: ChatService
    metrics: Metrics
    master_key_file: Path | None = None
    recovered: int = 0
    engine_errors: dict[str, str] = field(default_factory=dict)
    # Called once if no model at all can be served (every engine failed to start).
    on_fatal: Callable[[str], None] | None = None
    responses: ResponsesService | None = None
    messages: MessagesService | None = None
    completions: CompletionsService | None = None
    embeddings: EmbeddingsService | None = None
    # The dashboard's sign-ins (server.dashboard.session).
    sessions: Sessions | None = None


def create_app(
    settings: Settings,
    engines: list[Engine] | None = None,
    *,
    on_fatal: Callable[[str], None] | None = None,
) -> Starlette:
    """The app for ``settings``; ``engines`` replaces the configured ones (tests, embedding).

    ``on_fatal(message)`` is called if every model fails to start (``tokenwell
    serve`` then exits non-zero); with several models, the others keep serving.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with _running(settings, engines, on_fatal) as services:
            app.state.services = services
            yield

    routes = [
        Route("/v1/chat/completions", chat.create, methods=["POST"]),
        Route("/v1/completions", completions.create, methods=["POST"]),
        Route("/v1/embeddings", embeddings.create, methods=["POST"]),
        Route("/v1/messages", messages.create, methods=["POST"]),
        Route("/v1/messages/count_tokens", messages.count_tokens, methods=["POST"]),
        Route("/v1/responses", responses_routes.create, methods=["POST"]),
        Route("/v1/responses/input_tokens", responses_routes.input_tokens, methods=["POST"]),
        Route("/v1/responses/{response_id}", responses_routes.retrieve, methods=["GET"]),
        Route("/v1/responses/{response_id}", responses_routes.delete, methods=["DELETE"]),
        Route("/v1/responses/{response_id}/cancel", responses_routes.cancel, methods=["POST"]),
        Route(
            "/v1/responses/{response_id}/input_items", responses_routes.input_items, methods=["GET"]
        ),
        Route("/v1/models", models.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", models.get_model, methods=["GET"]),
        Route("/v1/usage", usage.own_usage, methods=["GET"]),
        Route("/admin/keys", admin.create_key, methods=["POST"]),
        Route("/admin/keys", admin.list_keys, methods=["GET"]),
        Route("/admin/keys/{key_id}", admin.get_key, methods=["GET"]),
        Route("/admin/keys/{key_id}", admin.update_key, methods=["PATCH"]),
        Route("/admin/keys/{key_id}", admin.revoke_key, methods=["DELETE"]),
        Route("/admin/keys/{key_id}/rotate", admin.rotate_key, methods=["POST"]),
        Route("/admin/audit", admin.audit_trail, methods=["GET"]),
        Route("/admin/alerts", admin.alert_outbox, methods=["GET"]),
        Route("/admin/usage", admin.usage_report, methods=["GET"]),
        Route("/admin/requests", admin.list_requests, methods=["GET"]),
        Route("/admin/requests/{request_id}", admin.get_request, methods=["GET"]),
        Route("/health", health.health, methods=["GET"]),
        Route("/metrics", health.metrics, methods=["GET"]),
        Route("/openapi.json", openapi.openapi, methods=["GET"]),
        # The operator's dashboard and the chat page: HTML, assets from the package.
        Route("/", dashboard.chat_page, methods=["GET"]),
        Route("/chat", dashboard.chat_page, methods=["GET"]),
        Route("/dashboard", dashboard.overview, methods=["GET"]),
        Route("/dashboard/login", dashboard.login_page, methods=["GET"]),
        Route("/dashboard/login", dashboard.login, methods=["POST"]),
        Route("/dashboard/logout", dashboard.logout, methods=["POST"]),
        Route("/dashboard/keys", dashboard.keys_page, methods=["GET"]),
        Route("/dashboard/keys", dashboard.create_key, methods=["POST"]),
        Route("/dashboard/keys/{key_id}", dashboard.update_key, methods=["POST"]),
        Route("/dashboard/keys/{key_id}/revoke", dashboard.revoke_key, methods=["POST"]),
        Route("/dashboard/requests", dashboard.requests_page, methods=["GET"]),
        Route("/dashboard/requests/{request_id}", dashboard.request_page, methods=["GET"]),
        Route("/dashboard/live", dashboard.live, methods=["GET"]),
        Route("/dashboard/models", dashboard.models_page, methods=["GET"]),
        Mount(
            "/assets",
            StaticFiles(packages=[("tokenwell.server.dashboard", "static")]),
            name="assets",
        ),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        # Unexpected exceptions: ErrorBoundary, not Starlette's 500 handler (see server.errors).
        middleware=[Middleware(ErrorBoundary)],
        exception_handlers={
            ClientDisconnected: client_gone,
            APIError: api_error,
            HTTPException: http_error,
        },
    )
    # An API answers what was asked: a 404 in the error shape, not a 307 to another URL.
    app.router.redirect_slashes = False
    return app


@contextlib.asynccontextmanager
async def _running(
    settings: Settings,
    engines: list[Engine] | None,
    on_fatal: Callable[[str], None] | None = None,
) -> AsyncIterator[Services]:
    try:
        instance = bootstrap.claim_instance(settings)
        master, master_file = bootstrap.master_key(settings)
        secret = bootstrap.key_secret(settings)
        hasher = KeyHasher(secret)
    except OSError as exc:
        raise StartupFailed(
            f"cannot use the data directory {settings.data_path}: {exc.strerror or exc} "
            "(choose another with --data-dir or TOKENWELL_DATA_DIR)"
        ) from exc
    try:
        db = Database(settings.database_url)
    except ArgumentError as exc:
        instance.release()
        raise StartupFailed(
            f"database.url {startup.shown_url(settings.database_url)!r} is not a database "
            "URL: use sqlite:///PATH or postgresql://USER@HOST/DATABASE"
        ) from exc
    limiter: RateLimiter = (
        RedisRateLimiter(settings.redis.url) if settings.redis.url else LocalRateLimiter()
    )
    ledger = Ledger(db, max_batch=settings.database.batch_max_rows)
    alerts = AlertDelivery(db, settings.alerts) if settings.alerts is not None else None
    if alerts is not None and settings.alerts is not None:
        ledger.alerts, ledger.on_alerts = AlertWriter(settings.alerts.thresholds), alerts.wake
    engines = engines if engines is not None else [create_engine(m) for m in settings.models]
    journal: Journal | None = None
    idempotency: IdempotencyService | None = None
    loading: list[asyncio.Task[None]] = []
    services: Services | None = None
    changes = key_changes(settings.redis.url, db.sqlite_path)
    try:
        try:
            async with db.engine.connect():
                pass
        except Exception as exc:
            raise startup.unreachable(settings.database_url, exc) from exc
        try:
            await db.migrate()
        except Exception as exc:
            raise startup.migration_refused(settings.database_url, exc) from exc
        await ledger.start()
        if alerts is not None:
            alerts.start()
        keys = KeyStore(db, hasher, changes=changes)
        keys.listen()  # keys changed elsewhere leave the cache at once
        prices = {m.name: m.price for m in settings.models}
        for engine in engines:
            prices.setdefault(engine.model_id, engine.config.price)
        accounting = Accounting(
            keys, ledger, limiter, master, instance.id, prices, metering=settings.metering
        )
        if not settings.metering:
            log.warning("metering is OFF: requests are not recorded, limited or billed")
        # Close what a crash left open, before this run writes anything new.
        recovered = await accounting.recover(Journal.read(instance.journal_dir))
        if recovered:
            log.warning("closed %d request(s) left open by an earlier crash", recovered)
        journal = Journal(instance.journal_dir)
        accounting.journal = journal
        idempotency = IdempotencyService(
            IdempotencyStore(db, settings.idempotency.ttl_seconds),
            settings.idempotency,
            instance.id,
            settings.keepalive_seconds,
            settings.redis.url,
        )
        await idempotency.start()

        registry = ModelRegistry(engines)
        metrics = Metrics()
        metrics.watch_engines(lambda: {e.model_id: e.stats() for e in registry})
        metrics.watch_engine_timings(lambda: {e.model_id: e.timings() for e in registry})
        metrics.watch_ledger(ledger.stats)
        services = Services(
            settings=settings,
            db=db,
            accounting=accounting,
            keys=keys,
            models=registry,
            chat=ChatService(
                registry,
                accounting,
                metrics,
                max_body_bytes=settings.max_body_bytes,
                keepalive_seconds=settings.keepalive_seconds,
                model_load_wait=settings.model_load_wait_seconds,
                policy=ContentPolicy(settings.content_filter) if settings.content_filter else None,
                idempotency=idempotency,
                http=settings.http,
            ),
            metrics=metrics,
            master_key_file=master_file,
            recovered=recovered,
            on_fatal=on_fatal,
            sessions=Sessions(secret),
        )
        services.messages = MessagesService(services.chat)
        services.completions = CompletionsService(services.chat)
        services.embeddings = EmbeddingsService(services.chat)
        services.responses = ResponsesService(services.chat, ResponseStore(db))
        await services.responses.start()
        for engine in engines:
            loading.append(asyncio.create_task(_start(engine, services)))
        yield services
    finally:
        if services is not None and services.responses is not None:
            await services.responses.stop()  # background responses: ended and stored
        for task in loading:
            task.cancel()
        for engine in engines:
            try:
                await engine.stop()
            except Exception:
                log.exception("stopping %s failed", engine.model_id)
        if idempotency is not None:  # requests that outlived their connection: stored
            await idempotency.stop()
        # Stopping the engines ended every generation; let their requests settle
        # into the ledger before it stops (the journal covers any that cannot).
        deadline = asyncio.get_running_loop().time() + 10
        while journal is not None and journal.live and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        store = services.responses.store if services and services.responses else None
        if store is not None:  # rows queued in a commit window
            await store.flush()
        await ledger.stop()
        if alerts is not None:
            await alerts.stop()
        if journal is not None:
            journal.close()
        await limiter.close()
        if changes is not None:
            await changes.close()
        await db.close()
        instance.release()


async def _start(engine: Engine, services: Services) -> None:
    began = time.monotonic()
    log.info("loading model %s (%s engine)", engine.model_id, engine.kind)
    try:
        await engine.start()
    except (EngineUnusable, ConfigError) as exc:
        # Expected failures carry their cause and fix: no traceback.
        log.error("model %s cannot be served: %s", engine.model_id, exc)
        engine.start_error = services.engine_errors[engine.model_id] = str(exc)
    except Exception as exc:
        log.exception("model %s failed to start", engine.model_id)
        engine.start_error = services.engine_errors[engine.model_id] = str(exc)
    else:
        log.info("model %s is ready (%.1f s)", engine.model_id, time.monotonic() - began)
        return
    served = {e.model_id for e in services.models}
    if served <= services.engine_errors.keys() and services.on_fatal is not None:
        services.on_fatal(
            "no model can be served:\n"
            + "\n".join(f"  {m}: {services.engine_errors[m]}" for m in sorted(served))
        )
