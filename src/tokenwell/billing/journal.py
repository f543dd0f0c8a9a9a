"""The usage journal: what each in-flight request has used, for crash recovery.

Before the server sends a client tokens, it appends the request's meter to
this file with one ``write(2)``. A ``kill -9`` cannot take back a completed
write (the kernel holds it), so after a crash the ledger can close each
request that was in flight with the usage known at the crash. Lines are
``<request id> <prompt> <cached> <completion>``; the last line for an id wins.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

Usage = tuple[int, int, int]

# Rewrite the file with only live entries once it grows past this.
COMPACT_BYTES = 32 * 1024 * 1024


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size
        self._last: dict[str, Usage] = {}

    def record(self, request_id: str, prompt: int, cached: int, completion: int) -> None:
        usage = (prompt, cached, completion)
        if self._last.get(request_id) == usage:
            return
        self._last[request_id] = usage
        line = f"{request_id} {prompt} {cached} {completion}\n".encode()
        os.write(self._fd, line)
        self._size += len(line)
        if self._size > COMPACT_BYTES:
            self.compact()

    def forget(self, request_id: str) -> None:
        self._last.pop(request_id, None)

    def compact(self, live: Iterable[str] | None = None) -> None:
        """Rewrite the file with the latest line of each live request."""
        keep = self._last if live is None else {k: self._last[k] for k in live if k in self._last}
        tmp = self.path.with_suffix(".tmp")
        data = "".join(f"{rid} {p} {c} {n}\n" for rid, (p, c, n) in keep.items()).encode()
        tmp.write_bytes(data)
        os.replace(tmp, self.path)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = len(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @staticmethod
    def read(path: Path) -> dict[str, Usage]:
        entries: dict[str, Usage] = {}
        try:
            text = path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return entries
        for line in text.splitlines():
            parts = line.split()
            if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
                continue  # a torn last line
            entries[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]))
        return entries
