"""Engines: the embedded llama.cpp model, the upstream gateway, the scripted engine.

llama.cpp's CPU backend runs each decode as an OpenMP team (libgomp), whose
threads meet at a barrier after every operation of the graph, and whose
workers wait for the next decode between two. libgomp reads how long a waiting
thread spins before it sleeps (``GOMP_SPINCOUNT``) once, when llama.cpp loads
it: every module that loads llama.cpp is in this package, so the default is
set here, before any of them runs. libgomp's own default (300,000 spins, ~3 ms)
is shorter than what a thread waits when the event loop or the Python sampling
between two decodes holds a core; the thread then sleeps, and each wake-up
costs the whole team. 30,000,000 (~0.3 s) keeps the team spinning through
those waits (bench/RESULTS.md, issue 20) and lets it sleep soon after the last
decode of a busy period. An operator's own ``GOMP_SPINCOUNT`` (or
``OMP_WAIT_POLICY``) is kept.
"""

import os

if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "30000000"
