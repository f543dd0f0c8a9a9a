"""libgomp's spin count is set before llama.cpp loads libgomp (engines/__init__)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Loads the engine as the server does, then says what libgomp was loaded with:
# the variable as the process had it when libgomp appeared in its memory map.
PROBE = """
import os
def gomp_loaded():
    with open("/proc/self/maps") as maps:
        return "libgomp" in maps.read()
assert not gomp_loaded(), "libgomp was loaded before the engine"
import tokenwell.engines.llamacpp.model  # noqa: F401  (loads llama.cpp)
print(gomp_loaded(), os.environ.get("GOMP_SPINCOUNT"))
"""


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_engine_loads_libgomp_with_a_spin_count_that_outlasts_a_step() -> None:
    assert _probe() == "True 30000000"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_an_operators_own_openmp_settings_are_kept() -> None:
    assert _probe(GOMP_SPINCOUNT="1000") == "True 1000"
    assert _probe(OMP_WAIT_POLICY="passive") == "True None"
