"""Settings of an upstream model (``engine = "upstream"``).

```toml
[[models]]
name = "Qwen/Qwen2.5-32B-Instruct"
engine = "upstream"
urls = ["http://gpu-a:8000/v1", { url = "http://gpu-b:8000/v1", api_key = "k", model = "qwen" }]
context = 32768                 # for budgets: the most a request can make
tokenizer = "/models/qwen.gguf" # optional: counts usage when an upstream sends none
```
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tokenwell.config import engine_settings


class UpstreamURL(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str
    api_key: str | None = None
    # The upstream's own name for the model, when it differs.
    model: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(
                f"expected an http(s) base URL like http://host:8000/v1, got {value!r}"
            )
        return value.rstrip("/")


class UpstreamSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    urls: list[str | UpstreamURL] = Field(min_length=1)
    # Defaults for every URL that does not set its own.
    api_key: str | None = None
    model: str | None = None
    # The model's context window: a request without max_tokens reserves this.
    context: int = Field(default=32768, ge=16)
    # A GGUF whose vocabulary counts usage when an upstream reports none.
    tokenizer: Path | None = None
    connect_timeout: float = Field(default=5.0, gt=0)
    # Seconds without a byte from the upstream before the stream is given up.
    idle_timeout: float = Field(default=60.0, gt=0)
    # Tries on other replicas, while nothing has been sent to the client yet.
    retries: int = Field(default=2, ge=0)
    health_interval: float = Field(default=5.0, gt=0)
    # Ask vLLM-style servers for usage on every chunk (exact partial counts).
    continuous_usage: bool = False
    max_connections: int = Field(default=512, ge=1)

    def replicas(self) -> list[UpstreamURL]:
        out = []
        for item in self.urls:
            entry = UpstreamURL(url=item) if isinstance(item, str) else item
            out.append(
                UpstreamURL(
                    url=entry.url,
                    api_key=entry.api_key or self.api_key,
                    model=entry.model or self.model,
                )
            )
        return out


def parse_settings(model: str, options: dict[str, object]) -> UpstreamSettings:
    return engine_settings(UpstreamSettings, model, options)
