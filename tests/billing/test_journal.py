"""The crash journal: meters that live in a memory-mapped file."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

from tokenwell.billing.journal import Journal


def test_counts_are_in_the_file_as_they_are_counted(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    meter = journal.meter("req_a")
    meter.prompt_tokens = 12
    meter.cached_tokens = 3
    for _ in range(7):
        meter.completion_tokens += 1
    assert Journal.read(tmp_path) == {"req_a": (12, 3, 7)}
    journal.forget("req_a")
    assert Journal.read(tmp_path) == {}
    # A forgotten meter keeps its counts but no longer writes into the file.
    meter.completion_tokens += 1
    assert meter.completion_tokens == 8 and Journal.read(tmp_path) == {}
    journal.close()


def test_records_are_reused_and_segments_grow(tmp_path: Path) -> None:
    journal = Journal(tmp_path, slots=2)
    meters = [journal.meter(f"req_{i}") for i in range(5)]
    for i, meter in enumerate(meters):
        meter.completion_tokens = i
    assert Journal.read(tmp_path) == {f"req_{i}": (0, 0, i) for i in range(5)}
    assert len(list(tmp_path.glob("journal.*.bin"))) == 3
    for i in range(5):
        journal.forget(f"req_{i}")
    again = journal.meter("req_new")
    assert again.completion_tokens == 0
    assert Journal.read(tmp_path) == {"req_new": (0, 0, 0)}
    journal.close()


def _count_then_hang(directory: str, ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    journal = Journal(Path(directory))
    meter = journal.meter("req_killed")
    meter.prompt_tokens = 5
    meter.completion_tokens = 42
    ready.set()
    signal.pause()


def test_a_killed_process_leaves_its_counts_behind(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_count_then_hang, args=(str(tmp_path), ready))
    child.start()
    assert ready.wait(10)
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    child.join(10)
    assert Journal.read(tmp_path) == {"req_killed": (5, 0, 42)}
    # The next run starts empty (after recovery has read it).
    Journal(tmp_path).close()
    assert Journal.read(tmp_path) == {}
