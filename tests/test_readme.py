"""Every example in the README runs, as written, against a real server on the real model.

The README's Python examples and ``curl`` commands that talk to a server are
taken from README.md itself and run in order (an idempotent retry follows its
first request), each in a subprocess. Only where the README names this
machine's defaults are they replaced: ``http://127.0.0.1:8000`` (and
``localhost:8000``) by the test server's address, and the placeholder key
``tw-…`` by a key made for the test; ``TOKENWELL_MASTER_KEY`` is in the
environment, as the README has the reader export it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import MASTER, ROOT, Server, model_config

pytestmark = pytest.mark.slow

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, re.S)


def _commands(code: str) -> list[str]:
    """The ``curl`` commands of a shell block (a command goes on while a line ends
    with a backslash or a quote is open), without the comments after them; a line
    with placeholders (``[--option]``) is usage, not a command."""
    commands: list[str] = []
    current = ""
    for line in code.splitlines():
        line = re.sub(r"\s{2,}# .*$", "", line)  # a comment after the command
        current += line + "\n"
        if current.count("'") % 2 == 0 and not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    out = []
    for command in commands:
        if command.startswith("curl ") and "[" not in command.split("-d", 1)[0]:
            out.append(command)
    return out


def _examples() -> Iterator[object]:
    for i, (lang, code) in enumerate(BLOCKS):
        if lang == "python" and ("127.0.0.1:8000" in code or "localhost:8000" in code):
            yield pytest.param("python", code, id=f"python-block-{i}")
        elif lang == "sh" and _commands(code):
            yield pytest.param("sh", "\n".join(_commands(code)), id=f"curl-block-{i}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with Server(tmp_path_factory.mktemp("readme"), model_config(parallel=4)) as s:
        yield s


@pytest.fixture(scope="module")
def key(server: Server) -> str:
    return str(server.create_key(name="readme")["key"])


def _localize(code: str, server: Server, key: str) -> str:
    host = server.base.removeprefix("http://")
    code = code.replace("http://127.0.0.1:8000", server.base).replace("localhost:8000", host)
    return code.replace("tw-…", key)


def test_the_readme_has_examples_to_run() -> None:
    kinds = [p.values[0] for p in _examples()]  # type: ignore[attr-defined]
    assert kinds.count("python") >= 8 and kinds.count("sh") >= 5, kinds


@pytest.mark.parametrize(("kind", "code"), list(_examples()))
def test_example(server: Server, key: str, kind: str, code: str, tmp_path: Path) -> None:
    code = _localize(code, server, key)
    env = {**os.environ, "TOKENWELL_MASTER_KEY": MASTER}
    if kind == "python":
        script = tmp_path / "example.py"
        script.write_text(code)
        cmd = [sys.executable, str(script)]
    else:
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    done = subprocess.run(
        cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False
    )
    shown = f"{code}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    assert done.returncode == 0, shown
    assert "Traceback" not in done.stderr, shown
    assert done.stdout.strip(), shown
    if kind == "sh":  # curl exits 0 on an HTTP error: no error object in what came
        assert not re.search(r'"error"\s*:\s*\{', done.stdout), shown
