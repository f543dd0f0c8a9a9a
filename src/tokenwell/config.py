"""Settings: a TOML file, then ``TOKENWELL_*`` environment variables on top.

```toml
master_key = "..."            # or TOKENWELL_MASTER_KEY
data_dir = "~/.local/share/tokenwell"

[database]
url = "sqlite:///./tokenwell.db"   # or postgresql://user@host/db

[redis]
url = "redis://127.0.0.1:6379/0"   # optional: shared limits for many replicas

[[models]]
name = "SmolLM2-135M-Instruct"
engine = "llamacpp"                # engine settings sit beside name and engine
parallel = 8
price = { prompt = 0.10, cached_prompt = 0.05, completion = 0.30 }
```
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tokenwell.errors import ConfigError
from tokenwell.moderation import ContentPolicyConfig

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# Values copied from an example instead of a secret.
_PLACEHOLDERS = {"...", "…", "<secret>", "changeme", "change-me", "secret", "xxx"}
ModelT = TypeVar("ModelT", bound=BaseModel)


class Price(BaseModel):
    """USD per million tokens. Decimal, so that no float reaches a bill."""

    model_config = ConfigDict(extra="forbid")

    prompt: Decimal = Decimal(0)
    cached_prompt: Decimal | None = None
    completion: Decimal = Decimal(0)
    # Input tokens of ``/v1/embeddings``; the prompt price when absent.
    embedding: Decimal | None = None

    @field_validator("prompt", "cached_prompt", "completion", "embedding")
    @classmethod
    def _not_negative(cls, value: Decimal | None) -> Decimal | None:
        if value is not None and value < 0:
            raise ValueError("prices cannot be negative")
        return value

    def for_embeddings(self) -> Price:
        """The price of an embeddings request: its input tokens, nothing generated."""
        rate = self.embedding if self.embedding is not None else self.prompt
        return Price(prompt=rate, cached_prompt=rate, completion=Decimal(0))


class ModelConfig(BaseModel):
    """One ``[[models]]`` table. Keys other than these belong to the engine."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    engine: str = "llamacpp"
    price: Price = Field(default_factory=Price)
    # Other names clients may ask for this model by (exact, or glob patterns such
    # as "claude-*"), in every API: a client that sends its vendor's default
    # model name reaches the model the operator chose.
    aliases: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(default_factory=list)
    # ``/v1/embeddings``: whether ``dimensions`` below the model's own may cut its
    # vectors (a Matryoshka-trained model); otherwise ``dimensions`` is refused.
    embedding_truncate: bool = False

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DatabaseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = None
    # Ledger writes are group-committed: each transaction takes what queued
    # while the previous one ran, up to this many rows.
    batch_max_rows: int = Field(default=256, ge=1)


class RedisConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = None


class AlertsConfig(BaseModel):
    """``[alerts]``: webhooks when spend crosses a share of a budget, or a key is
    about to expire (billing.alerts)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://")
    # Each delivery's body is signed: X-Tokenwell-Signature: hex HMAC-SHA256(secret, body).
    secret: str = Field(min_length=8)
    # Shares of a budget whose crossing is announced (a key's own budgets, and
    # each end user's).
    thresholds: list[Annotated[float, Field(gt=0, le=10)]] = Field(
        default_factory=lambda: [0.5, 0.8, 1.0], max_length=20
    )
    # A key expiring within this many seconds is announced once.
    expiry_warning_seconds: float = Field(default=3 * 86400, ge=0)
    # Delivery: at least once, retried with exponential backoff from this many
    # seconds (at most 5 minutes apart), given up after max_attempts.
    retry_base_seconds: float = Field(default=2.0, gt=0, le=300)
    max_attempts: int = Field(default=20, ge=1)
    timeout_seconds: float = Field(default=10.0, gt=0)
    # How often a server looks for due deliveries and expiring keys.
    poll_seconds: float = Field(default=1.0, gt=0)
    expiry_scan_seconds: float = Field(default=60.0, gt=0)


class IdempotencyConfig(BaseModel):
    """``Idempotency-Key`` requests and resumable streams (server.idempotent)."""

    model_config = ConfigDict(extra="forbid")

    # How long a key's result is remembered (replayed, and refused for another body).
    ttl_seconds: float = Field(default=24 * 3600, gt=0)
    # How long generation goes on after the last connection of a keyed request dropped.
    grace_seconds: float = Field(default=60.0, ge=0)
    # The most a request's event log holds (in process, and in Redis); a longer
    # response streams on, but can no longer be resumed from its start or replayed.
    max_log_bytes: int = Field(default=4 * 1024 * 1024, ge=4096)


class HTTPConfig(BaseModel):
    """Time limits on client connections and backpressure for slow readers
    (``server.protocol``, ``server.generation``)."""

    model_config = ConfigDict(extra="forbid")

    # A request's headers must arrive within this many seconds of the connection
    # opening (or of the request's first byte on a kept-alive connection).
    header_timeout: float = Field(default=10.0, gt=0)
    # The most bytes a request's URL and headers may take (a 431 past it).
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    # Its body, within this many seconds of the end of its headers.
    body_timeout: float = Field(default=60.0, gt=0)
    # A kept-alive connection with no request is closed after this many seconds.
    idle_timeout: float = Field(default=5.0, gt=0)
    # A client that takes none of its response for this long is cut off; a
    # generation for it ends as `slow_client`, billed for what was made.
    send_timeout: float = Field(default=30.0, gt=0)
    # A stream whose client is this many events (about a token each, per choice) behind:
    # "pause" stops generating for it until the client catches up (an engine
    # that cannot pause ends it as "end" does); "end" ends the request there.
    slow_client: Literal["pause", "end"] = "pause"
    stream_buffer: int = Field(default=1024, ge=1)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = 8000
    master_key: str | None = None
    # Keys are stored as HMAC-SHA256(secret, key); generated into data_dir when unset.
    key_secret: str | None = None
    data_dir: Path = Path("~/.local/share/tokenwell")
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    keepalive_seconds: float = Field(default=5.0, gt=0)
    # On SIGTERM, streams in flight may finish for this long; past it they end
    # with an error event and [DONE], and close as `interrupted` with their usage.
    drain_seconds: float = Field(default=10.0, ge=0)
    # A request for a model that is still loading waits this long for it
    # (streams send `: keep-alive` comments meanwhile) before a 503.
    model_load_wait_seconds: float = Field(default=120.0, ge=0)
    # Record every request in the ledger and enforce budgets and limits. Off
    # only for benchmarks or trusted internal use: nothing is billed then.
    metering: bool = True
    # How long a thread may hold the GIL while another waits (CPython: 5 ms).
    gil_switch_ms: float = Field(default=5.0, gt=0, le=100)
    # Garbage collection (see tokenwell.interpreter): the youngest generation's
    # threshold (0 keeps CPython's 700), and whether what start-up built is
    # frozen out of later collections.
    gc_threshold: int = Field(default=10_000, ge=0)
    gc_freeze: bool = True
    log_level: str = "info"
    # "text" (one line per record) or "json" (one object per line, for a log pipeline).
    log_format: Literal["text", "json"] = "text"
    # When set, GET /metrics needs "Authorization: Bearer <metrics_token>".
    metrics_token: str | None = None
    # The operator's content policy (off when absent); see tokenwell.moderation.
    content_filter: ContentPolicyConfig | None = None
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    idempotency: IdempotencyConfig = Field(default_factory=IdempotencyConfig)
    alerts: AlertsConfig | None = None
    models: list[ModelConfig] = Field(
        default_factory=lambda: [ModelConfig(name=DEFAULT_MODEL, engine="llamacpp")]
    )

    @field_validator("master_key", "key_secret", "metrics_token")
    @classmethod
    def _not_a_placeholder(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.strip() in _PLACEHOLDERS or "…" in value:
            raise ValueError(
                f"{value!r} is the README's placeholder, not a secret: set one of your "
                "own (at least 8 characters), or leave the line out and one is generated"
            )
        if len(value) < 8:
            raise ValueError("too short to be a secret: use at least 8 characters")
        return value

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique, repeated: {', '.join(dupes)}")
        if not models:
            raise ValueError("at least one [[models]] table is needed")
        return models

    @property
    def data_path(self) -> Path:
        return self.data_dir.expanduser()

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.data_path / 'tokenwell.db'}"


def engine_settings(kind: type[ModelT], model: str, options: dict[str, Any]) -> ModelT:
    """An engine's settings from the keys of its ``[[models]]`` table."""
    try:
        return kind.model_validate(options)
    except ValidationError as exc:
        lines = [
            f"  models[{model}].{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_url=False)
        ]
        raise ConfigError(f"invalid settings for model {model!r}:\n" + "\n".join(lines)) from exc


# Environment variables that override the file, and where they land.
_ENV = {
    "TOKENWELL_HOST": ("host",),
    "TOKENWELL_PORT": ("port",),
    "TOKENWELL_MASTER_KEY": ("master_key",),
    "TOKENWELL_KEY_SECRET": ("key_secret",),
    "TOKENWELL_DATA_DIR": ("data_dir",),
    "TOKENWELL_LOG_LEVEL": ("log_level",),
    "TOKENWELL_LOG_FORMAT": ("log_format",),
    "TOKENWELL_METRICS_TOKEN": ("metrics_token",),
    "TOKENWELL_DATABASE_URL": ("database", "url"),
    "TOKENWELL_REDIS_URL": ("redis", "url"),
}


def load_settings(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Read ``path`` (or ``$TOKENWELL_CONFIG``), apply the environment, then overrides."""
    env = os.environ if env is None else env
    path = path or env.get("TOKENWELL_CONFIG")
    data: dict[str, Any] = {}
    if path:
        file = Path(path).expanduser()
        try:
            data = tomllib.loads(file.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {file}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from exc
    for var, where in _ENV.items():
        if env.get(var):
            target = data
            for key in where[:-1]:
                target = target.setdefault(key, {})
            target[where[-1]] = env[var]
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            where = ".".join(str(p) for p in err["loc"]) or "config"
            lines.append(f"  {where}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from exc
