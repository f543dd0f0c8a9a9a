"""Fault injection for tests of what a real failure does to a running server.

Some failures cannot be provoked from outside a server process on a healthy
machine: an illegal instruction in llama.cpp, a bug that kills the decode
thread. Tests name them in ``TOKENWELL_FAULTS`` (comma-separated) when they
start a server; in production the variable is unset and ``hit`` is a set
lookup.

    selftest      the start-up self-test's child dies with SIGILL
    decode-loop   the llama.cpp scheduler thread raises at its next step
"""

from __future__ import annotations

import os
import signal

_ACTIVE = frozenset(f.strip() for f in os.environ.get("TOKENWELL_FAULTS", "").split(",") if f)


class InjectedFault(RuntimeError):
    pass


def active(name: str) -> bool:
    return name in _ACTIVE


def hit(name: str) -> None:
    """Fail here if the fault ``name`` is injected."""
    if name not in _ACTIVE:
        return
    if name == "selftest":
        os.kill(os.getpid(), signal.SIGILL)
    raise InjectedFault(f"injected fault: {name}")
