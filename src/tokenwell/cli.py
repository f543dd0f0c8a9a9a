"""The ``tokenwell`` command: serve, keys, usage."""

from __future__ import annotations

import asyncio
import faulthandler
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from tokenwell import interpreter
from tokenwell.config import Settings, load_settings
from tokenwell.errors import APIError, ConfigError

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

    from tokenwell.server.app import create_app
    from tokenwell.server.protocol import protocol_class

    settings = _settings(config_path, host=host, port=port, data_dir=data_dir)
    interpreter.tune(settings)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # A native crash (SIGSEGV, SIGILL, ...) prints where it happened, never nothing.
    faulthandler.enable()
    fatal: list[str] = []

    def on_fatal(message: str) -> None:
        fatal.append(message)
        server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=settings.drain_seconds,
        loop="uvloop",
        # httptools, with time limits on headers, body and slow readers.
        http=protocol_class(settings.http),
        timeout_keep_alive=settings.http.idle_timeout,
    )
    server = uvicorn.Server(config)

    async def run() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            interpreter.started(settings)
            _welcome(app, settings, config_path, data_dir)
        await task

    try:
        # uvloop: Server.serve() under a plain asyncio.run would not get it.
        uvloop.run(run())
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    if fatal:
        console.print(f"[bold red]tokenwell cannot serve[/]: {fatal[0]}", highlight=False)
        sys.exit(3)
    if not server.started:
        sys.exit(1)


def _welcome(app: Any, settings: Settings, config_path: Path | None, data_dir: Path | None) -> None:
    services = app.state.services
    url = f"http://{settings.host}:{settings.port}"
    model = next(iter(services.models)).model_id
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
                db, KeyHasher(bootstrap.key_secret(settings)), cache_seconds=0, changes=changes
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


def _key_table(records: list[Any]) -> Table:
    table = Table(
        "id", "name", "prefix", "status", "budget", "spend", "rpm", "tpm", "models", "expires"
    )
    for r in records:
        p = r.public()
        table.add_row(
            p["id"],
            p["name"],
            p["prefix"] + "…",
            p["status"],
            p["budget_usd"] or "-",
            p["spend_usd"],
            str(p["rpm"] or "-"),
            str(p["tpm"] or "-"),
            ",".join(p["models"]) if p["models"] else "all",
            p["expires_at"] or "-",
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
    for option in reversed(key_limit_options):
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
    fields, names = _key_fields(**given)
    record = _run_db(config_path, data_dir, lambda store: store.update(key_id, fields, names))
    if as_json:
        out.print_json(json.dumps(record.public()))
    else:
        out.print(_key_table([record]))


@keys.command("revoke")
@config_option
@data_dir_option
@click.argument("key_id")
def keys_revoke(config_path: Path | None, data_dir: Path | None, key_id: str) -> None:
    """Revoke a key: refused at once by every server on this database."""
    record = _run_db(config_path, data_dir, lambda store: store.revoke(key_id))
    out.print(_key_table([record]))


# ---------------------------------------------------------------------- usage


@main.command()
@config_option
@data_dir_option
@click.option(
    "--by",
    "group_by",
    default="key,model,day",
    show_default=True,
    help="Group by any of key, model, day.",
)
@click.option("--since", default=None, help="First day (YYYY-MM-DD, UTC).")
@click.option("--until", default=None, help="Last day (YYYY-MM-DD, UTC).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def usage(
    config_path: Path | None,
    data_dir: Path | None,
    group_by: str,
    since: str | None,
    until: str | None,
    as_json: bool,
) -> None:
    """Print billed usage and spend from the ledger."""
    from tokenwell.billing.usage import parse_day, parse_group_by, usage_report

    try:
        groups = parse_group_by(group_by)
        first, last = parse_day(since, "since"), parse_day(until, "until")
    except APIError as exc:
        raise click.ClickException(exc.message) from exc
    rows = _run_db(config_path, data_dir, lambda store: usage_report(store.db, groups, first, last))
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(*groups, "requests", "prompt", "cached", "completion", "spend (USD)")
    for row in rows:
        table.add_row(
            *[str(row[g]) for g in groups],
            str(row["requests"]),
            str(row["prompt_tokens"]),
            str(row["cached_tokens"]),
            str(row["completion_tokens"]),
            row["spend_usd"],
        )
    out.print(table)


if __name__ == "__main__":  # pragma: no cover
    main()
