"""The dashboard's pages (``/dashboard``) and the chat page (``/``), server-rendered.

Every page is HTML from the package's templates with the package's own CSS
and a little JavaScript (no CDN: it works offline). Changes to keys go
through the same functions as the admin API (``parse_key_fields``, the
``KeyStore``), so a key made here is the key ``POST /admin/keys`` would make.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from tokenwell.billing.keys import parse_key_fields, parse_when
from tokenwell.billing.money import nanos_to_usd
from tokenwell.billing.usage import key_names, request_rows
from tokenwell.errors import APIError
from tokenwell.server.app_state import services_of
from tokenwell.server.body import read_body
from tokenwell.server.dashboard import charts, queries
from tokenwell.server.dashboard.session import Session, Sessions

if TYPE_CHECKING:
    from tokenwell.server.app import Services

STATUSES = (
    "completed",
    "length",
    "tool_calls",
    "content_filter",
    "client_disconnected",
    "upstream_error",
    "engine_error",
    "rejected",
    "interrupted",
    "slow_client",
    "cancelled",
    "open",
)
_env = Environment(
    loader=PackageLoader("tokenwell.server.dashboard", "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["usd"] = lambda v: "-" if v is None else f"${float(v):,.6f}".rstrip("0").rstrip(".")
_env.filters["when"] = lambda ts: (
    "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(ts)))
)
_env.filters["ms"] = lambda v: (
    "-" if v is None else (f"{float(v):.1f} ms" if float(v) < 10 else f"{float(v):,.0f} ms")
)
_env.filters["num"] = lambda v: "-" if v is None else f"{int(v):,}"


def _sessions(services: Services) -> Sessions:
    assert services.sessions is not None  # made with the app (server.app)
    return services.sessions


def _page(name: str, **context: Any) -> HTMLResponse:
    html = _env.get_template(name).render(**context)
    return HTMLResponse(
        html,
        headers={
            # Only this server's own scripts, styles and requests; never framed.
            "Content-Security-Policy": (
                "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
                "form-action 'self'; base-uri 'none'"
            ),
            "X-Frame-Options": "DENY",
            # (no-referrer would make the browser send "Origin: null" with our own forms)
            "Referrer-Policy": "same-origin",
            "Cache-Control": "no-store",
        },
    )


def _login_redirect() -> Response:
    return RedirectResponse("/dashboard/login", status_code=303)


def _signed_in(request: Request) -> tuple[Services, Session] | None:
    services = services_of(request)
    session = _sessions(services).current(request)
    return (services, session) if session is not None else None


async def _form(request: Request) -> dict[str, str]:
    body = await read_body(request, 64 * 1024)
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[-1] for k, v in fields.items()}


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


# ------------------------------------------------------------------ login


async def login_page(request: Request) -> Response:
    return _page("login.html", error=None)


async def login(request: Request) -> Response:
    services = services_of(request)
    sessions = _sessions(services)
    form = await _form(request)
    given = form.get("master_key", "").strip()
    try:
        # The API's own check (hashed, compared in constant time).
        master = (await services.accounting.authenticate(f"Bearer {given}")).is_master
    except APIError:
        master = False
    if not master:
        await sessions.failed(_client(request))
        page = _page("login.html", error="That is not the master key.")
        page.status_code = 401
        return page
    sessions.succeeded(_client(request))
    response = RedirectResponse("/dashboard", status_code=303)
    sessions.issue(response, request)
    return response


async def logout(request: Request) -> Response:
    response = RedirectResponse("/dashboard/login", status_code=303)
    Sessions.end(response)
    return response


# ------------------------------------------------------------------ overview


async def overview(request: Request) -> Response:
    signed = _signed_in(request)
    if signed is None:
        return _login_redirect()
    services, session = signed
    db = services.db
    windows = [(label, await queries.totals(db, days)) for label, days in
               (("today", 1), ("7 days", 7), ("30 days", 30))]  # fmt: skip
    days, spend = await queries.series(db, "key")
    _, tokens = await queries.series(db, "model")
    async with db.engine.connect() as conn:
        names = await key_names(conn, set(spend))
    spend_named = {f"{names.get(k, k)}": v for k, v in spend.items()}
    return _page(
        "overview.html",
        nav="overview",
        csrf=_sessions(services).csrf(session),
        windows=windows,
        spend_chart=Markup(charts.stacked_bars(days, spend_named, lambda n: "$" + nanos_to_usd(n))),
        tokens_chart=Markup(charts.stacked_bars(days, tokens, lambda n: f"{n:,}")),
        ttft=await queries.ttft(db),
    )


# ------------------------------------------------------------------ keys


# What a key's edit form shows and a blank field clears (no budget, no limit,
# every model, never expires); a new key's blank field is not given.
CLEARABLE = ("budget_usd", "rpm", "tpm", "models", "expires_at")


def _key_fields(form: dict[str, str], creating: bool) -> dict[str, Any]:
    """Form fields → the admin API's key fields. Blank: not given on a new key;
    cleared on an edited one (its form shows every value the key has)."""
    data: dict[str, Any] = {}
    for name in ("name", "budget_usd", "expires_at"):
        if form.get(name, "").strip():
            data[name] = form[name].strip()
    for name in ("rpm", "tpm"):
        value = form.get(name, "").strip()
        if value:
            data[name] = int(value) if value.isascii() and value.isdigit() else value
    models = [m.strip() for m in form.get("models", "").split(",") if m.strip()]
    if models:
        data["models"] = models
    if not creating:
        for name in CLEARABLE:
            if name in form:
                data.setdefault(name, None)
    return data


async def keys_page(
    request: Request,
    *,
    created: dict[str, Any] | None = None,
    error: str | None = None,
    status: int = 200,
) -> Response:
    signed = _signed_in(request)
    if signed is None:
        return _login_redirect()
    services, session = signed
    records = [r.public() for r in await services.keys.list()]
    for key in records:
        key["bars"] = _bars(key)
    page = _page(
        "keys.html",
        nav="keys",
        csrf=_sessions(services).csrf(session),
        keys=records,
        created=created,
        error=error,
        models=[e.model_id for e in services.models],
    )
    page.status_code = status
    return page


def _bars(key: dict[str, Any]) -> list[dict[str, Any]]:
    """Spend against each budget of a key, for the bars (budget periods when the key has them)."""
    budgets = key.get("budgets")
    if budgets is None and key.get("budget_usd") is not None:
        budgets = [{"period": "total", "usd": key["budget_usd"], "spent_usd": key["spend_usd"]}]
    bars = []
    for budget in budgets or ():
        limit, spent = float(budget["usd"]), float(budget.get("spent_usd") or 0)
        share = 1.0 if limit <= 0 else min(spent / limit, 1.0)
        bars.append({**budget, "percent": round(share * 100, 1)})
    return bars


async def _checked(request: Request) -> tuple[Services, dict[str, str]] | Response:
    signed = _signed_in(request)
    if signed is None:
        return _login_redirect()
    services, session = signed
    form = await _form(request)
    if not _sessions(services).csrf_ok(session, request, form.get("csrf")):
        page = _page(
            "error.html", message="The form expired or came from elsewhere: reload and try again."
        )
        page.status_code = 403
        return page
    return services, form


async def create_key(request: Request) -> Response:
    checked = await _checked(request)
    if isinstance(checked, Response):
        return checked
    services, form = checked
    try:
        fields, given = parse_key_fields(_key_fields(form, True), creating=True)
        secret, record = await services.keys.create(fields, given)
    except APIError as exc:
        return await keys_page(request, error=exc.message, status=400)
    return await keys_page(request, created={**record.public(), "key": secret}, status=201)


async def update_key(request: Request) -> Response:
    checked = await _checked(request)
    if isinstance(checked, Response):
        return checked
    services, form = checked
    try:
        fields, given = parse_key_fields(_key_fields(form, False), creating=False)
        await services.keys.update(request.path_params["key_id"], fields, given)
    except APIError as exc:
        return await keys_page(request, error=exc.message, status=400)
    return RedirectResponse("/dashboard/keys", status_code=303)


async def revoke_key(request: Request) -> Response:
    checked = await _checked(request)
    if isinstance(checked, Response):
        return checked
    services, _ = checked
    try:
        await services.keys.revoke(request.path_params["key_id"])
    except APIError as exc:
        return await keys_page(request, error=exc.message, status=400)
    return RedirectResponse("/dashboard/keys", status_code=303)


# ------------------------------------------------------------------ requests


async def requests_page(request: Request) -> Response:
    signed = _signed_in(request)
    if signed is None:
        return _login_redirect()
    services, session = signed
    q = request.query_params
    filters = {k: q.get(k, "").strip() for k in ("key_id", "model", "status", "since", "until")}
    error = None
    try:
        since = parse_when(filters["since"]) if filters["since"] else None
        until = parse_when(filters["until"]) if filters["until"] else None
    except ValueError as exc:
        since = until = None
        error = f"since/until: {exc}"
    rows = await request_rows(
        services.db,
        key_id=filters["key_id"] or None,
        model=filters["model"] or None,
        status=filters["status"] or None,
        since=since,
        until=until,
        limit=200,
    )
    keys = await services.keys.list()
    names = {k.id: k.name for k in keys} | {"master": "master"}
    return _page(
        "requests.html",
        nav="requests",
        csrf=_sessions(services).csrf(session),
        rows=rows,
        names=names,
        keys=keys,
        models=[e.model_id for e in services.models],
        statuses=STATUSES,
        filters=filters,
        error=error,
        query=urlencode({k: v for k, v in filters.items() if v}),
    )


async def request_page(request: Request) -> Response:
    signed = _signed_in(request)
    if signed is None:
        return _login_redirect()
    services, session = signed
    rows = await request_rows(services.db, request_id=request.path_params["request_id"], limit=1)
    if not rows:
        page = _page("error.html", nav="requests", message="No such request.")
        page.status_code = 404
        return page
    row = rows[0]
    return _page(
        "request.html",
        nav="requests",
        csrf=_sessions(services).csrf(session),
        row=row,
        fields=sorted(row.items()),
    )


async def live(request: Request) -> Response:
    """Requests in flight now (the requests page polls this)."""
    signed = _signed_in(request)
    if signed is None:
        return JSONResponse({"error": "signed out"}, status_code=401)
    services, _ = signed
    now = time.time()
    running = [
        {
            "id": r.ticket.request_id,
            "key_id": r.ticket.key.id,
            "key_name": r.ticket.key.name,
            "model": r.ticket.model,
            "api": r.api,
            "seconds": round(now - r.since, 1),
            "completion_tokens": r.ticket.meter.completion_tokens,
        }
        for r in list(services.chat.running.values())
    ]
    return JSONResponse({"object": "list", "data": running}, headers={"Cache-Control": "no-store"})


# ------------------------------------------------------------------ models


async def models_page(request: Request) -> Response:
    signed = _signed_in(request)
    if signed is None:
        return _login_redirect()
    services, session = signed
    cache = await queries.cache_use(services.db)
    models = []
    for engine in services.models:
        stats = engine.stats()
        error = services.engine_errors.get(engine.model_id) or engine.unavailable
        if services.engine_errors.get(engine.model_id):
            state = "failed"
        elif engine.ready:
            state = "ready"
        else:
            state = "unavailable" if engine.unavailable else "loading"
        used = cache.get(engine.model_id, {"prompt": 0, "cached": 0})
        models.append(
            {
                "id": engine.model_id,
                "engine": engine.kind,
                "state": state,
                "error": error,
                "stats": {k: v for k, v in stats.items() if k not in ("upstreams", "state")},
                "upstreams": stats.get("upstreams") or [],
                "cache": used,
                "cache_percent": round(100 * used["cached"] / used["prompt"], 1)
                if used["prompt"]
                else None,
                "price": engine.config.price,
            }
        )
    return _page("models.html", nav="models", csrf=_sessions(services).csrf(session), models=models)


# ------------------------------------------------------------------ chat


async def chat_page(request: Request) -> Response:
    return _page("chat.html")
