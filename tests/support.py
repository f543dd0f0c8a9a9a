"""Running real tokenwell server processes for tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai

MASTER = "sk-test-master"
KEY_SECRET = "test-key-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``tokenwell serve`` in a subprocess, on a port of its own."""

    def __init__(
        self,
        root: Path,
        config: str,
        *,
        env: dict[str, str] | None = None,
        data_dir: Path | None = None,
        port: int | None = None,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "config.toml"
        self.config_path.write_text(config)
        self.data_dir = data_dir or root / "data"
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = root / f"server-{self.port}.log"
        self.env = {
            **os.environ,
            "TOKENWELL_MASTER_KEY": MASTER,
            "TOKENWELL_KEY_SECRET": KEY_SECRET,
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> Server:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tokenwell",
                "serve",
                "--config",
                str(self.config_path),
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(self.port),
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""

    def client(self, key: str = MASTER, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=0, **kwargs)

    def async_client(self, key: str = MASTER, **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=0, **kwargs)

    def http(self, key: str | None = MASTER, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers.update(kwargs.pop("headers", {}))
        return httpx.Client(base_url=self.base, headers=headers, timeout=60, **kwargs)

    def create_key(self, **fields: Any) -> dict[str, Any]:
        fields.setdefault("name", "test")
        with self.http() as http:
            response = http.post("/admin/keys", json=fields)
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ledger_row(server: Server, request_id: str, timeout: float = 10) -> dict[str, Any]:
    """The request's ledger row, once it is closed (a close commits just after [DONE])."""
    deadline = time.monotonic() + timeout
    with server.http() as http:
        while True:
            row = http.get(f"/admin/requests/{request_id}").json()
            if row.get("status") not in (None, "open") or time.monotonic() > deadline:
                return row  # type: ignore[no-any-return]
            time.sleep(0.02)


SCRIPTED_CONFIG = """
[[models]]
name = "scripted"
engine = "scripted"
price = { prompt = 1.0, cached_prompt = 0.5, completion = 2.0 }

[[models]]
name = "scripted-64"
engine = "scripted"
reply_tokens = 64
aliases = ["claude-sonnet-*", "gpt-4o-mini"]
price = { prompt = 1.0, completion = 2.0 }

[[models]]
name = "scripted-slow"
engine = "scripted"
delay = 0.02
reply_tokens = 400
price = { prompt = 1.0, completion = 2.0 }

[[models]]
name = "scripted-tiny"
engine = "scripted"
parallel = 1
max_queue = 1
context = 64
delay = 0.05
reply_tokens = 40
"""


def model_config(parallel: int = 4, context: int = 2048, extra: str = "") -> str:
    return f"""
[[models]]
name = "SmolLM2-135M-Instruct"
engine = "llamacpp"
parallel = {parallel}
context = {context}
price = {{ prompt = 0.10, cached_prompt = 0.05, completion = 0.30 }}
{extra}
"""


def sse_events(body: bytes) -> list[str]:
    """The data payloads of an SSE body, asserting strict framing on the way."""
    from tokenwell.protocol.sse import SSEDecoder

    decoder = SSEDecoder()
    events = decoder.feed(body)
    assert all(e.event is None and e.id is None for e in events), "no event:/id: lines"
    return [e.data for e in events]


ROOT = Path(__file__).resolve().parents[1]


class FakeUpstream:
    """``tests/fakes/upstream.py`` in a subprocess."""

    def __init__(
        self,
        log_dir: Path,
        sick: bool = False,
        port: int | None = None,
        api_key: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/v1"
        args = [sys.executable, "-m", "tests.fakes.upstream", "--port", str(self.port)]
        if sick:
            args.append("--sick")
        if api_key:
            args += ["--api-key", api_key]
        self.log = (log_dir / f"fake-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.base}/stats", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("fake upstream did not start")

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.base}/stats").json()  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def gateway_config(models: dict[str, str], **options: object) -> str:
    """One upstream model per (name → TOML urls value)."""
    extra = "".join(f"{k} = {v}\n" for k, v in options.items())
    return "".join(
        f'[[models]]\nname = "{name}"\nengine = "upstream"\nurls = {urls}\n'
        f"price = {{ prompt = 1.0, completion = 2.0 }}\n{extra}\n"
        for name, urls in models.items()
    )


def connect(server: Server, rcvbuf: int | None = None) -> socket.socket:
    """A raw TCP connection to the server (``rcvbuf``: a small receive window,
    for a client that reads slowly)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(15)
    sock.connect(("127.0.0.1", server.port))
    return sock


def raw_request(
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    key: str = MASTER,
    headers: dict[str, str] | None = None,
) -> bytes:
    """An HTTP/1.1 request's bytes, as a client that owns its socket sends them."""
    data = json.dumps(body).encode() if body is not None else b""
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n{extra}"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data
