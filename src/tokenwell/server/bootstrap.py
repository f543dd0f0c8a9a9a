"""The data directory: secrets generated on first start, and this instance's identity.

- ``master_key``: the admin key, when neither the config nor
  ``TOKENWELL_MASTER_KEY`` sets one (mode 0600; its path is printed at start).
- ``key_secret``: the HMAC secret API keys are hashed with. Replicas sharing a
  database must share it: set ``TOKENWELL_KEY_SECRET`` on each.
- ``instance``: this server's stable id; its open ledger rows are closed as
  ``interrupted`` when it restarts after a crash. A lock keeps two live
  servers from sharing one data directory (and so one identity).
"""

from __future__ import annotations

import fcntl
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tokenwell.billing.keys import new_secret
from tokenwell.config import Settings
from tokenwell.errors import ConfigError


def _secret_file(path: Path, make: str) -> str:
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(make + "\n")
    return make


def master_key_path(settings: Settings) -> Path:
    return settings.data_path / "master_key"


def master_key(settings: Settings) -> tuple[str, Path | None]:
    """The master key, and the file it is kept in when it was generated."""
    if settings.master_key:
        return settings.master_key, None
    settings.data_path.mkdir(parents=True, exist_ok=True)
    path = master_key_path(settings)
    return _secret_file(path, new_secret()), path


def key_secret(settings: Settings) -> str:
    if settings.key_secret:
        return settings.key_secret
    settings.data_path.mkdir(parents=True, exist_ok=True)
    return _secret_file(settings.data_path / "key_secret", secrets.token_urlsafe(32))


@dataclass
class Instance:
    id: str
    journal_dir: Path
    _lock: IO[str]

    def release(self) -> None:
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()


def claim_instance(settings: Settings) -> Instance:
    data = settings.data_path
    data.mkdir(parents=True, exist_ok=True)
    lock = (data / "instance.lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        lock.close()
        raise ConfigError(
            f"another tokenwell server is using the data directory {data}; "
            "give each server its own (--data-dir or TOKENWELL_DATA_DIR)"
        ) from exc
    ident = _secret_file(data / "instance", "inst_" + secrets.token_hex(8))
    return Instance(ident, data / "journal", lock)
