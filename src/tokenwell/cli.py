"""The ``tokenwell`` command: serve, keys, usage."""

from __future__ import annotations

import asyncio
import faulthandler
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich import box
from rich.console import Console
from rich.table import Table

import tokenwell.cli_spend as cli_spend
from tokenwell import interpreter, logs
from tokenwell.config import Settings, load_settings
from tokenwell.errors import APIError, ConfigError, StartupFailed

T = TypeVar("T")
console = Console(stderr=True, soft_wrap=True)
# Piped output is not cut to 80 columns: ids in a table must survive intact.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 240)

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TOKENWELL_CONFIG",
    help="TOML config file (default: built-in SmolLM2 model).",
)
data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the ledger, secrets and journal live (default ~/.local/share/tokenwell).",
)


def _settings(config_path: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config_path, **overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
@click.version_option(package_name="tokenwell")
def main() -> None:
    """tokenwell: an OpenAI-compatible token API that bills every token to its key."""


# ---------------------------------------------------------------------- serve


@main.command()
@config_option
@data_dir_option
@click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port to listen on (default 8000).")
def serve(
    config_path: Path | None, data_dir: Path | None, host: str | None, port: int | None
) -> None:
    """Serve /v1/chat/completions on the configured models."""
    import uvicorn
    import uvloop

    from tokenwell.server import startup
    from tokenwell.server.app import create_app
    from tokenwell.server.protocol import protocol_class

    settings = _settings(config_path, host=host, port=port, data_dir=data_dir)
    interpreter.tune(settings)
    logs.configure(settings.log_level, settings.log_format)
    logging.getLogger("uvicorn.error").addFilter(startup.DropStartupNoise())
    # A native crash (SIGSEGV, SIGILL, ...) prints where it happened, never nothing.
    faulthandler.enable()
    fatal: list[str] = []
    failed: list[str] = []

    def on_fatal(message: str) -> None:
        fatal.append(message)
        server.should_exit = True

    try:
        startup.check_files(settings)
        sock = startup.listen(settings.host, settings.port)
    except StartupFailed as exc:
        _cannot_start(str(exc))
    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(
        startup.refusing_lifespan(app, failed.append),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # tokenwell.logs: one format for every line
        access_log=False,
        timeout_graceful_shutdown=settings.drain_seconds,
        loop="uvloop",
        # httptools, with time limits on headers, body and slow readers.
        http=protocol_class(settings.http),
        timeout_keep_alive=settings.http.idle_timeout,
    )
    server = uvicorn.Server(config)

    async def serve_until_done() -> None:
        try:
            await server.serve(sockets=[sock])
        except SystemExit:
            # uvicorn exits from inside its task when the app's start-up failed:
            # the sentence is in `failed`, printed below.
            if not failed:
                raise

    async def run() -> None:
        task = asyncio.create_task(serve_until_done())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            interpreter.started(settings)
            _welcome(app, settings, config_path, data_dir)
        await task

    # uvloop: Server.serve() under a plain asyncio.run would not get it.
    uvloop.run(run())
    sock.close()
    if failed:
        _cannot_start(failed[0])
    if fatal:
        console.print(f"[bold red]tokenwell cannot serve[/]: {fatal[0]}", highlight=False)
        sys.exit(3)
    if not server.started:
        sys.exit(1)


def _cannot_start(sentence: str) -> NoReturn:
    console.print(f"[bold red]tokenwell cannot start[/]: {sentence}", highlight=False)
    sys.exit(1)


def _welcome(app: Any, settings: Settings, config_path: Path | None, data_dir: Path | None) -> None:
    services = app.state.services
    url = f"http://{settings.host}:{settings.port}"
    model = next(iter(services.models)).model_id
    if settings.log_format == "json":  # a log pipeline reads stderr: one record, no banner
        logging.getLogger("tokenwell").info(
            "tokenwell listening",
            extra={
                "fields": {
                    "url": url,
                    "models": [e.model_id for e in services.models],
                    "dashboard": f"{url}/dashboard",
                }
            },
        )
        return
    key_hint = (
        f"$(cat {services.master_key_file})"
        if services.master_key_file
        else "$TOKENWELL_MASTER_KEY"
    )
    console.print(f"[bold green]tokenwell[/] listening on [bold]{url}[/]")
    console.print(
        f"  models: {', '.join(e.model_id for e in services.models)} (loading: see {url}/health)"
    )
    console.print(f"  ledger: {settings.database_url.split('@')[-1]}")
    if services.master_key_file:
        console.print(f"  master key: kept in {services.master_key_file}")
    where = f" --config {config_path}" if config_path else ""
    if data_dir:
        where += f" --data-dir {data_dir}"
    free = [
        e.model_id
        for e in services.models
        if not (e.config.price.prompt or e.config.price.completion)
    ]
    if free:
        console.print(
            f"  price: {', '.join(free)} {'is' if len(free) == 1 else 'are'} free (no price in "
            "[[models]]): requests are counted, budgets are never spent"
        )
    console.print(f"  dashboard: {url}/dashboard (the master key)   chat: {url}/")
    console.print(f"  create an API key:   tokenwell keys create --name me{where}")
    console.print(
        "  first request:\n"
        f'    curl {url}/v1/chat/completions -H "Authorization: Bearer {key_hint}" \\\n'
        "      -H 'Content-Type: application/json' -N -d '{\"model\": \""
        + model
        + '", "messages": [{"role": "user", "content": "Count to five."}], '
        '"stream": true, "stream_options": {"include_usage": true}}\''
    )


# ---------------------------------------------------------------------- keys


def _run_db(
    config_path: Path | None, data_dir: Path | None, work: Callable[[Any], Awaitable[T]]
) -> T:
    from tokenwell.billing.db import Database
    from tokenwell.billing.keychanges import key_changes
    from tokenwell.billing.keys import KeyHasher, KeyStore
    from tokenwell.server import bootstrap

    settings = _settings(config_path, data_dir=data_dir)

    async def go() -> T:
        db = Database(settings.database_url)
        try:
            await db.migrate()
            # Changes are published to the running servers' key caches.
            changes = key_changes(settings.redis.url, db.sqlite_path)
            store = KeyStore(
                db,
                KeyHasher(bootstrap.key_secret(settings)),
                cache_seconds=0,
                changes=changes,
                actor=cli_spend.actor(),
            )
            try:
                return await work(store)
            finally:
                if changes is not None:
                    await changes.close()
        finally:
            await db.close()

    try:
        return asyncio.run(go())
    except APIError as exc:
        raise click.ClickException(exc.message) from exc


def _key_fields(**given: Any) -> tuple[Any, set[str]]:
    from tokenwell.billing.keys import parse_key_fields

    data = {k: v for k, v in given.items() if v is not None}
    if "models" in data:
        data["models"] = [m.strip() for m in data["models"].split(",") if m.strip()]
    try:
        return parse_key_fields(data, creating="name" in given and given["name"] is not None)
    except APIError as exc:
        raise click.ClickException(exc.message) from exc


def _compact() -> Table:
    """A table that fits a terminal: no vertical rules, no outer padding."""
    return Table(box=box.SIMPLE_HEAD, pad_edge=False)


def _key_table(records: list[Any]) -> Table:
    """Keys, readable in 80 columns; ``keys show`` has every field of one."""
    table = _compact()
    # The id is what `keys update/show/revoke` take: never cut, whatever the width.
    table.add_column("id", no_wrap=True, min_width=max((len(r.id) for r in records), default=2))
    table.add_column("name", overflow="fold", min_width=6)
    for name in ("status", "spend", "budget", "rpm/tpm", "expires"):
        table.add_column(name, overflow="fold")
    for r in records:
        p = r.public()
        table.add_row(
            p["id"],
            p["name"],
            p["status"],
            p["spend_usd"],
            p["budget_usd"] or "-",
            f"{p['rpm'] or '-'}/{p['tpm'] or '-'}",
            (p["expires_at"] or "-")[:10],
        )
    return table


key_limit_options = [
    click.option("--budget", "budget_usd", default=None, help="Hard budget in USD."),
    click.option("--rpm", type=int, default=None, help="Requests per minute."),
    click.option("--tpm", type=int, default=None, help="Tokens per minute."),
    click.option("--models", default=None, help="Comma-separated models the key may use."),
    click.option(
        "--expires", "expires_at", default=None, help="Expiry: ISO date or datetime (UTC)."
    ),
]


def _with_limits(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(key_limit_options + cli_spend.options):
        fn = option(fn)
    return fn


@main.group()
def keys() -> None:
    """Create, list, update and revoke API keys (writes the database directly)."""


@keys.command("create")
@config_option
@data_dir_option
@click.option("--name", required=True, help="A name for the key's owner.")
@_with_limits
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with the secret).")
def keys_create(
    config_path: Path | None, data_dir: Path | None, as_json: bool, **given: Any
) -> None:
    """Create a key; its secret is printed once and never stored."""
    chosen = cli_spend.take(given)
    given["budgets"] = cli_spend.as_list(chosen)
    given["end_user_budget"] = cli_spend.end_user_budget(chosen)[1]
    fields, names = _key_fields(**given)
    secret, record = _run_db(config_path, data_dir, lambda store: store.create(fields, names))
    if as_json:
        out.print_json(json.dumps({**record.public(), "key": secret}))
        return
    console.print(_key_table([record]))
    console.print("[bold]Secret (shown only now):[/]")
    out.print(secret, soft_wrap=True)


@keys.command("list")
@config_option
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keys_list(config_path: Path | None, data_dir: Path | None, as_json: bool) -> None:
    """List keys with their limits and spend."""
    records = _run_db(config_path, data_dir, lambda store: store.list())
    if as_json:
        out.print_json(json.dumps([r.public() for r in records]))
    else:
        out.print(_key_table(records))


@keys.command("update")
@config_option
@data_dir_option
@click.argument("key_id")
@click.option("--name", default=None, help="A new name.")
@_with_limits
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keys_update(
    config_path: Path | None, data_dir: Path | None, key_id: str, as_json: bool, **given: Any
) -> None:
    """Change a key's name, budget, limits, models or expiry."""
    chosen = cli_spend.take(given)
    fields, names = _key_fields(**given)
    record = _run_db(
        config_path,
        data_dir,
        lambda store: cli_spend.update(store, key_id, fields, names, chosen),
    )
    if as_json:
        out.print_json(json.dumps(record.public()))
    else:
        out.print(_key_table([record]))


@keys.command("show")
@config_option
@data_dir_option
@click.argument("key_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keys_show(config_path: Path | None, data_dir: Path | None, key_id: str, as_json: bool) -> None:
    """Show one key: its limits, spend, budget left and usage."""
    from tokenwell.billing.usage import key_usage

    async def work(store: Any) -> dict[str, Any]:
        record = await store.get(key_id)
        used = await key_usage(store.db, record)
        return {**record.public(), "usage": used}

    shown = _run_db(config_path, data_dir, work)
    if as_json:
        out.print_json(json.dumps(shown))
        return
    table = Table("field", "value", show_header=False, box=box.SIMPLE)
    used = shown.pop("usage")
    for field in ("requests", "in_flight", "prompt_tokens", "cached_tokens", "completion_tokens"):
        shown[field] = used[field]
    for field, value in shown.items():
        if field == "object":
            continue
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        elif isinstance(value, list | dict):
            value = json.dumps(value)
        table.add_row(field, "-" if value is None else str(value))
    out.print(table)


@keys.command("revoke")
@config_option
@data_dir_option
@click.argument("key_id")
def keys_revoke(config_path: Path | None, data_dir: Path | None, key_id: str) -> None:
    """Revoke a key: refused at once by every server on this database."""
    record = _run_db(config_path, data_dir, lambda store: store.revoke(key_id))
    out.print(_key_table([record]))


@keys.command("rotate")
@config_option
@data_dir_option
@click.argument("key_id")
@click.option(
    "--grace",
    default="0",
    show_default=True,
    help="How long the old secret keeps working: 24h, 30m, 90s, 2d or seconds.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with the new secret).")
def keys_rotate(
    config_path: Path | None, data_dir: Path | None, key_id: str, grace: str, as_json: bool
) -> None:
    """A new secret for a key (same budgets, limits and history); printed once."""
    from tokenwell.billing.keys import parse_rotation

    try:
        rotation = parse_rotation({"grace_seconds": cli_spend.duration(grace)})
    except APIError as exc:
        raise click.ClickException(exc.message) from exc
    secret, record = _run_db(
        config_path, data_dir, lambda store: store.rotate(key_id, rotation.grace_seconds)
    )
    if as_json:
        out.print_json(json.dumps({**record.public(), "key": secret}))
        return
    console.print(_key_table([record]))
    console.print(f"The old secret works until {record.public()['previous_key_expires_at']}.")
    console.print("[bold]New secret (shown only now):[/]")
    out.print(secret, soft_wrap=True)


# ---------------------------------------------------------------------- usage


@main.command()
@config_option
@data_dir_option
@click.option(
    "--by",
    "group_by",
    default="key,model,day",
    show_default=True,
    help="Group by any of key, model, day, end_user, tag:NAME (a metadata key).",
)
@click.option("--since", default=None, help="First day (YYYY-MM-DD, UTC).")
@click.option("--until", default=None, help="Last day (YYYY-MM-DD, UTC).")
@click.option("--key", "key_id", default=None, help="Only this key's requests (its id).")
@click.option("--user", default=None, help="Only this end user's requests.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV (as GET /admin/usage?format=csv).")
def usage(
    config_path: Path | None,
    data_dir: Path | None,
    group_by: str,
    since: str | None,
    until: str | None,
    key_id: str | None,
    user: str | None,
    as_json: bool,
    as_csv: bool,
) -> None:
    """Print billed usage and spend from the ledger."""
    from tokenwell.billing.usage import parse_day, parse_group_by, usage_report

    try:
        groups = parse_group_by(group_by)
        first, last = parse_day(since, "since"), parse_day(until, "until")
    except APIError as exc:
        raise click.ClickException(exc.message) from exc
    rows = _run_db(
        config_path,
        data_dir,
        lambda store: usage_report(store.db, groups, first, last, key_id=key_id, user=user),
    )
    if as_json:
        out.print_json(json.dumps(rows))
        return
    if as_csv:
        from tokenwell.billing.usage import as_csv as csv_text

        click.echo(csv_text(rows, groups), nl=False)
        return
    named = ["key", "name", *[g for g in groups if g != "key"]] if "key" in groups else groups
    table = _compact()
    for column in (*named, "requests", "prompt", "cached", "completion", "spend (USD)"):
        table.add_column(column, no_wrap=column == "key", overflow="fold")
    for row in rows:
        row["name"] = row.get("key_name") or "-"
        table.add_row(
            *[str(row[g]) for g in named],
            str(row["requests"]),
            str(row["prompt_tokens"]),
            str(row["cached_tokens"]),
            str(row["completion_tokens"]),
            row["spend_usd"],
        )
    out.print(table)


# ---------------------------------------------------------------------- requests


@main.group()
def requests() -> None:
    """The request log (the ledger): list and show requests (reads the database)."""


@requests.command("list")
@config_option
@data_dir_option
@click.option("--key", "key_id", default=None, help="Only this key's requests (its id).")
@click.option("--model", default=None, help="Only this model's.")
@click.option("--status", default=None, help="Only this status (completed, rejected, ...).")
@click.option("--since", default=None, help="Created at or after (ISO date or datetime, UTC).")
@click.option("--until", default=None, help="Created before (ISO date or datetime, UTC).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def requests_list(
    config_path: Path | None,
    data_dir: Path | None,
    key_id: str | None,
    model: str | None,
    status: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """The newest requests: time, id, key, model, status, tokens, cost, timings."""
    from tokenwell.billing.keys import parse_when
    from tokenwell.billing.usage import request_rows

    try:
        first, last = parse_when(since), parse_when(until)
    except ValueError as exc:
        raise click.ClickException(f"--since/--until: {exc}") from exc

    async def work(store: Any) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await request_rows(
            store.db,
            key_id=key_id,
            model=model,
            status=status,
            since=first,
            until=last,
            limit=limit,
        )
        names = {r.id: r.name for r in await store.list()}
        for row in rows:
            row["key_name"] = "master" if row["key_id"] == "master" else names.get(row["key_id"])
        return rows

    rows = _run_db(config_path, data_dir, work)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    wide = out.width >= 120  # time and duration too, where they fit
    table = _compact()
    if wide:
        table.add_column("UTC", no_wrap=True)
    table.add_column("id", no_wrap=True, min_width=max((len(r["id"]) for r in rows), default=2))
    for name in ("key", "model", "status", "tokens", "USD", *(["ms"] if wide else [])):
        table.add_column(name, overflow="fold")
    for row in rows:
        cells = [
            row["id"],
            row["key_name"] or row["key_id"],
            row["model"],
            row["status"],
            f"{row['prompt_tokens']}+{row['completion_tokens']}",
            row["cost_usd"],
        ]
        if wide:
            cells = [_utc(row["created_at"]), *cells, _ms(row["total_ms"])]
        table.add_row(*cells)
    out.print(table)


@requests.command("show")
@config_option
@data_dir_option
@click.argument("request_id")
def requests_show(config_path: Path | None, data_dir: Path | None, request_id: str) -> None:
    """One request's row in full, as JSON."""
    from tokenwell.billing.usage import request_rows

    rows = _run_db(
        config_path, data_dir, lambda store: request_rows(store.db, request_id=request_id, limit=1)
    )
    if not rows:
        raise click.ClickException(f"no request with id {request_id!r}")
    out.print_json(json.dumps(rows[0]))


def _utc(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%m-%d %H:%M:%S")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


# ---------------------------------------------------------------------- chat


@main.command()
@click.option("--model", default=None, help="The model (default: the first the key may use).")
@click.option(
    "--key",
    default=None,
    envvar="TOKENWELL_API_KEY",
    help="API key (default $TOKENWELL_API_KEY, $TOKENWELL_MASTER_KEY, or the local master key).",
)
@click.option(
    "--url",
    default="http://127.0.0.1:8000",
    envvar="TOKENWELL_URL",
    show_default=True,
    help="The tokenwell to talk to ($TOKENWELL_URL).",
)
@click.option("--system", default=None, help="A system prompt for the conversation.")
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="At most this many tokens per answer (default: the server's).",
)
@click.option(
    "--temperature",
    type=click.FloatRange(0, 2),
    default=None,
    help="Sampling temperature, 0 to 2 (default: the server's).",
)
@data_dir_option
def chat(
    model: str | None,
    key: str | None,
    url: str,
    system: str | None,
    max_tokens: int | None,
    temperature: float | None,
    data_dir: Path | None,
) -> None:
    """Chat in the terminal: tokens stream as they come, each turn's usage and cost
    follow it; /reset, /model [NAME], /quit."""
    import contextlib
    import os

    import httpx

    from tokenwell.client.stream import ChatError
    from tokenwell.client.terminal import TerminalChat

    key = key or os.environ.get("TOKENWELL_MASTER_KEY") or _local_master_key(data_dir)
    if not key:
        raise click.ClickException(
            "no API key: pass --key, or set TOKENWELL_API_KEY (or TOKENWELL_MASTER_KEY)"
        )
    with contextlib.suppress(ImportError):  # not on every platform
        import readline  # noqa: F401  (line editing and history for input())
    try:
        session = TerminalChat(
            url,
            key,
            model,
            sys.stdout,
            system=system,
            options={"max_tokens": max_tokens, "temperature": temperature},
        )
    except ChatError as exc:
        raise click.ClickException(str(exc)) from exc
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}") from exc
    try:
        session.run()
    finally:
        session.close()


def _local_master_key(data_dir: Path | None) -> str | None:
    """The master key a local `tokenwell serve` generated, when this user can read it."""
    settings = _settings(None, data_dir=data_dir)
    try:
        return (settings.data_path / "master_key").read_text().strip() or None
    except OSError:
        return None


if __name__ == "__main__":  # pragma: no cover
    main()
