"""The usage journal: what each in-flight request has used, for crash recovery.

Each admitted request's meter *lives* in this journal: its three counters are
words of a memory-mapped file (``MAP_SHARED``), so every token an engine counts
is stored as it is counted — a plain memory write, no system call, nothing
per chunk. The kernel keeps the pages when the process dies, so after a
``kill -9`` the ledger closes every request that was in flight with exactly
the usage counted at the crash. (A power loss can lose the last seconds; the
SQLite ledger with ``synchronous=NORMAL`` makes the same promise.)

Layout: segment files ``journal.<n>.bin`` of fixed 64-byte records:
``state (u8) | request id (47 bytes, NUL-padded) | prompt | cached | completion``
(three native u32; the counters start at byte 48). A record is claimed by
writing the id, then the state byte, and freed by clearing the state byte.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

from tokenwell.protocol.events import Meter

Usage = tuple[int, int, int]

RECORD = 64
SEGMENT_SLOTS = 4096
_COUNTS = struct.Struct("=III")
_COUNTS_AT = 48
_LIVE = 1


class JournalMeter(Meter):
    """A meter whose counters are words of a journal record.

    ``_words`` is the whole segment as native u32 words (one view, made once
    per segment) and ``_at`` the index of this record's first counter; once
    the record is let go, ``_words`` is a plain list of the final counts.
    """

    __slots__ = ("_at", "_completion", "_words")

    def __init__(self, words: memoryview, at: int) -> None:
        self._words: memoryview | list[int] = words
        self._at = at
        self._completion = at + 2
        self.estimated = False

    @property  # type: ignore[override]
    def prompt_tokens(self) -> int:
        return self._words[self._at]

    @prompt_tokens.setter
    def prompt_tokens(self, value: int) -> None:
        self._words[self._at] = value

    @property  # type: ignore[override]
    def cached_tokens(self) -> int:
        return self._words[self._at + 1]

    @cached_tokens.setter
    def cached_tokens(self, value: int) -> None:
        self._words[self._at + 1] = value

    @property  # type: ignore[override]
    def completion_tokens(self) -> int:
        return self._words[self._completion]

    @completion_tokens.setter
    def completion_tokens(self, value: int) -> None:
        self._words[self._completion] = value

    def add_completion(self, tokens: int = 1) -> None:
        self._words[self._completion] += tokens

    def detach(self) -> None:
        """Keep the counts, let go of the record (it may serve another request)."""
        if type(self._words) is memoryview:
            at = self._at
            self._words = list(self._words[at : at + 3])
            self._at, self._completion = 0, 2


class _Segment:
    def __init__(self, path: Path, slots: int) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, slots * RECORD)
            self.map = mmap.mmap(fd, slots * RECORD)
        finally:
            os.close(fd)
        self.view = memoryview(self.map)
        self.words = self.view.cast("I")

    def release(self) -> None:
        self.words.release()
        self.view.release()
        self.map.close()


class Journal:
    """The meters of in-flight requests, in memory-mapped segment files."""

    def __init__(self, directory: Path, slots: int = SEGMENT_SLOTS) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("journal.*.bin"):  # read by recovery before this
            old.unlink()
        self._slots_per_segment = slots
        self._segments: list[_Segment] = []
        self._free: list[tuple[int, int]] = []
        self._live: dict[str, tuple[int, int, JournalMeter]] = {}
        self._add_segment()

    def _add_segment(self) -> None:
        index = len(self._segments)
        self._segments.append(
            _Segment(self.directory / f"journal.{index}.bin", self._slots_per_segment)
        )
        self._free.extend((index, slot) for slot in range(self._slots_per_segment - 1, -1, -1))

    def meter(self, request_id: str) -> JournalMeter:
        """Claim a record for ``request_id``: its meter, starting at zero."""
        if not self._free:
            self._add_segment()
        segment, slot = self._free.pop()
        seg = self._segments[segment]
        at = slot * RECORD
        seg.view[at + 1 : at + 48] = request_id.encode()[:47].ljust(47, b"\0")
        words = seg.words
        counts = (at + _COUNTS_AT) // 4
        words[counts] = words[counts + 1] = words[counts + 2] = 0
        seg.view[at] = _LIVE
        meter = JournalMeter(words, counts)
        self._live[request_id] = (segment, slot, meter)
        return meter

    def forget(self, request_id: str) -> None:
        """The request is in the ledger: free its record."""
        entry = self._live.pop(request_id, None)
        if entry is not None:
            segment, slot, meter = entry
            meter.detach()
            self._segments[segment].view[slot * RECORD] = 0
            self._free.append((segment, slot))

    @property
    def live(self) -> int:
        return len(self._live)

    def close(self) -> None:
        for _, _, meter in self._live.values():
            meter.detach()
        self._live.clear()
        for segment in self._segments:
            segment.release()
        self._segments.clear()

    @staticmethod
    def read(directory: Path) -> dict[str, Usage]:
        """The usage of every request the journal says was in flight."""
        entries: dict[str, Usage] = {}
        for path in sorted(directory.glob("journal.*.bin")):
            data = path.read_bytes()
            for at in range(0, len(data) - RECORD + 1, RECORD):
                if data[at] != _LIVE:
                    continue
                request_id = data[at + 1 : at + 48].rstrip(b"\0").decode(errors="replace")
                if request_id:
                    entries[request_id] = _COUNTS.unpack_from(data, at + _COUNTS_AT)
        return entries
