"""Every start-up failure an operator meets first is one sentence and a non-zero exit.

Each test runs ``tokenwell serve`` as a real process that cannot start, and
reads what a person would read: the cause and the fix, no traceback.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import KEY_SECRET, MASTER, SCRIPTED_CONFIG, Server, free_port

pytestmark = pytest.mark.timeout(120)

SCRIPTED = '[[models]]\nname = "scripted"\nengine = "scripted"\n'


def serve(
    tmp_path: Path,
    config: str = SCRIPTED,
    *,
    port: int | None = None,
    data_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Run ``tokenwell serve``; its exit status and everything it printed."""
    config_path = tmp_path / "config.toml"
    config_path.write_text(config)
    done = subprocess.run(
        [
            sys.executable, "-m", "tokenwell", "serve",
            "--config", str(config_path),
            "--data-dir", str(data_dir or tmp_path / "data"),
            "--port", str(port or free_port()),
        ],
        env={
            **os.environ,
            "TOKENWELL_MASTER_KEY": MASTER,
            "TOKENWELL_KEY_SECRET": KEY_SECRET,
            **(env or {}),
        },
        capture_output=True,
        text=True,
        timeout=90,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def assert_one_sentence(rc: int, output: str, *words: str) -> None:
    assert rc != 0, output
    assert "Traceback" not in output, output
    assert "Task exception was never retrieved" not in output, output
    assert "tokenwell cannot start" in output, output
    for word in words:
        assert word in output, output
    # The sentence, and a few lines of start-up progress before it at most.
    assert len(output.strip().splitlines()) <= 6, output


def test_a_port_already_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        rc, output = serve(tmp_path, port=port)
    assert_one_sentence(rc, output, f"port {port} on 127.0.0.1 is already in use", "--port")


def test_a_data_directory_another_server_uses(tmp_path: Path) -> None:
    with Server(tmp_path / "first", SCRIPTED_CONFIG) as first:
        rc, output = serve(tmp_path, data_dir=first.data_dir)
        # The first server is unharmed.
        assert first.proc is not None and first.proc.poll() is None
    assert_one_sentence(
        rc, output, "another tokenwell server is using the data directory", "--data-dir"
    )


def test_a_database_that_cannot_be_reached(tmp_path: Path) -> None:
    closed = free_port()
    url = f"postgresql://tokenwell:hunter2secret@127.0.0.1:{closed}/tokenwell"
    rc, output = serve(tmp_path, env={"TOKENWELL_DATABASE_URL": url})
    assert_one_sentence(
        rc, output, "cannot reach the database at postgresql://tokenwell:***@127.0.0.1"
    )
    assert "hunter2secret" not in output  # the password is never shown


def test_a_database_url_that_is_not_one(tmp_path: Path) -> None:
    rc, output = serve(tmp_path, env={"TOKENWELL_DATABASE_URL": "not a database"})
    assert_one_sentence(rc, output, "is not a database URL", "postgresql://")


def test_a_content_filter_classifier_that_cannot_be_imported(tmp_path: Path) -> None:
    config = SCRIPTED + '[content_filter]\nclassifier = "mypackage.policy:flags"\n'
    rc, output = serve(tmp_path, config)
    assert_one_sentence(rc, output, "content_filter.classifier", "mypackage.policy:flags")


def test_a_model_file_that_does_not_exist(tmp_path: Path) -> None:
    config = '[[models]]\nname = "mine"\nengine = "llamacpp"\npath = "/models/missing.gguf"\n'
    rc, output = serve(tmp_path, config)
    assert_one_sentence(rc, output, "model 'mine'", "/models/missing.gguf", "is not a file")


def test_a_database_migrated_by_a_newer_tokenwell(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with sqlite3.connect(data / "tokenwell.db") as db:
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        db.execute("INSERT INTO alembic_version VALUES ('9999_from_the_future')")
    rc, output = serve(tmp_path, data_dir=data)
    assert_one_sentence(rc, output, "cannot be migrated", "9999_from_the_future", "newer tokenwell")


def test_the_readme_placeholder_is_not_a_master_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('master_key = "…"\n' + SCRIPTED)
    env = {k: v for k, v in os.environ.items() if k != "TOKENWELL_MASTER_KEY"}
    done = subprocess.run(
        [sys.executable, "-m", "tokenwell", "serve", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "master_key" in output and "placeholder" in output, output
    assert "Traceback" not in output
