"""Shared pieces of the benchmarks: servers in subprocesses and a lean SSE client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg

ROOT = Path(__file__).resolve().parents[1]
MASTER = "sk-bench-master"
MODEL = "SmolLM2-135M-Instruct"

# Long answers: the model is asked for stories and never allowed to end early
# (its end tokens are biased out), so every run makes exactly max_tokens.
PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain in detail how a steam engine works.",
    "Write a long letter to a friend about a journey through the mountains.",
    "Describe a busy market in a large city, in great detail.",
    "Tell the long history of an imaginary kingdom.",
    "Write a long essay about the ocean and its creatures.",
    "Describe the life of a bee over one summer.",
    "Write a long dialogue between two old friends.",
]
NO_EOS = {"0": -100, "2": -100}  # <|endoftext|>, <|im_end|>


PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def pg(sql: str) -> None:
    """Run one statement on the local PostgreSQL (CREATE / DROP DATABASE)."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    """A server in a subprocess, stopped by its own pid only."""

    def __init__(
        self,
        argv: Sequence[str],
        port: int,
        env: dict[str, str] | None = None,
        health: str = "/health",
        log: Path | None = None,
    ) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.health = health
        self.log = log or Path(tempfile.mkstemp(prefix="bench-", suffix=".log")[1])
        self.proc = subprocess.Popen(
            list(argv),
            env={**os.environ, **(env or {})},
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def wait(self, timeout: float = 180) -> Process:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.base + self.health, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"not ready: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def tokenwell(
    config: str,
    port: int | None = None,
    env: dict[str, str] | None = None,
    cpus: set[int] | None = None,
) -> Process:
    """tokenwell in a subprocess; ``cpus``: the only CPUs it may run on."""
    work = Path(tempfile.mkdtemp(prefix="tw-bench-"))
    (work / "config.toml").write_text(config)
    port = port or free_port()
    pin = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []
    return Process(
        [
            *pin,
            sys.executable,
            "-m",
            "tokenwell",
            "serve",
            "--config",
            str(work / "config.toml"),
            "--data-dir",
            str(work / "data"),
            "--port",
            str(port),
        ],
        port,
        env={"TOKENWELL_MASTER_KEY": MASTER, **(env or {})},
        log=work / "server.log",
    )


def llama_server(threads: int, *options: str) -> Process:
    """llama.cpp's llama-server (bench/peers.py: built with tokenwell's ggml
    flags) on the built-in GGUF, on a free local port, ready; ``options``
    are its own (slots, context, embeddings...)."""
    from bench import peers
    from tokenwell.engines.llamacpp.model import builtin_model_path

    port = free_port()
    argv = [
        str(peers.llama_server()),
        "-m",
        str(builtin_model_path()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "--no-webui",
        *options,
    ]
    return Process(argv, port).wait()


@dataclass
class Run:
    ttft: float = 0.0  # seconds to the first content
    total: float = 0.0
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)  # between content chunks
    status: int = 200


async def stream_chat(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Run:
    """One streamed chat completion, timed: TTFT, inter-chunk gaps, usage."""
    run = Run()
    start = time.perf_counter()
    last = None
    buffer = b""
    async with client.stream("POST", url, json=body, headers=headers) as response:
        run.status = response.status_code
        if response.status_code != 200:
            await response.aread()
            run.total = time.perf_counter() - start
            return run
        async for data in response.aiter_raw():
            now = time.perf_counter()
            buffer += data
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: {"):
                    continue
                chunk = orjson.loads(event[6:])
                usage = chunk.get("usage")
                if usage:
                    run.tokens = usage["completion_tokens"]
                choices = chunk.get("choices") or []
                if choices and choices[0]["delta"].get("content"):
                    if last is None:
                        run.ttft = now - start
                    else:
                        run.gaps.append(now - last)
                    last = now
    run.total = time.perf_counter() - start
    return run


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def cpu_seconds_of(name: str) -> float:
    """CPU time of every process called ``name`` (e.g. the postgres backends)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text[text.find("(") + 1 : text.rfind(")")] == name:
            fields = text.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def callgrind(module: str, *args: str) -> subprocess.Popen[str]:
    """``python -m module args`` under valgrind's callgrind, started; its count with
    ``instructions``. (``./dev bench`` installs valgrind for the benchmarks that
    count.)"""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        module,
        *args,
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def instructions(process: subprocess.Popen[str]) -> int:
    """The instructions a ``callgrind`` run executed, once it ended."""
    _, err = process.communicate()
    found = re.search(r"Collected : (\d+)", err)
    if process.returncode != 0 or found is None:
        raise SystemExit(f"the run under valgrind failed:\n{err[-2000:]}")
    return int(found.group(1))


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def in_process(config: str, env: dict[str, str]) -> AsyncIterator[Any]:
    """The ASGI app of ``config`` started in this process as ``tokenwell serve``
    runs it: the interpreter tuned first (GIL switch interval, the collector's
    threshold) and what start-up built frozen out of garbage collection once
    it is up. Without that an in-process measure counts default-threshold
    collections of the whole start-up heap that the server never makes."""
    from tokenwell import interpreter
    from tokenwell.config import load_settings
    from tokenwell.server.app import create_app

    work = Path(tempfile.mkdtemp(prefix="tw-bench-"))
    (work / "config.toml").write_text(config)
    settings = load_settings(
        work / "config.toml", env={"TOKENWELL_DATA_DIR": str(work / "data"), **env}
    )
    interpreter.tune(settings)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        interpreter.started(settings)
        yield app
