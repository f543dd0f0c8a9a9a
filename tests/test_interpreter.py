"""The interpreter's settings for a server process (tokenwell.interpreter)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest

from tokenwell import interpreter
from tokenwell.config import Settings, load_settings
from tokenwell.errors import ConfigError


@pytest.fixture
def restored() -> Iterator[None]:
    """Put the test process's interpreter back as it was."""
    threshold, interval = gc.get_threshold(), sys.getswitchinterval()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        sys.setswitchinterval(interval)


def test_tune_sets_the_switch_interval_and_the_youngest_threshold(restored: None) -> None:
    gc.set_threshold(700, 11, 12)
    interpreter.tune(Settings(gil_switch_ms=2.0, gc_threshold=25_000))
    assert sys.getswitchinterval() == pytest.approx(0.002)
    assert gc.get_threshold() == (25_000, 11, 12)  # the older generations' as they were


def test_a_zero_threshold_keeps_cpythons(restored: None) -> None:
    gc.set_threshold(700, 10, 10)
    interpreter.tune(Settings(gc_threshold=0))
    assert gc.get_threshold() == (700, 10, 10)


def test_started_freezes_what_exists_unless_told_not_to(restored: None) -> None:
    gc.unfreeze()
    interpreter.started(Settings(gc_freeze=False))
    assert gc.get_freeze_count() == 0
    interpreter.started(Settings())
    assert gc.get_freeze_count() > 1000  # at least the modules this test imported
    # Frozen objects are still freed by reference counting; only cycles wait.
    assert gc.isenabled()


def test_a_negative_threshold_is_a_config_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "config.toml"
    config.write_text("gc_threshold = -1\n")
    with pytest.raises(ConfigError, match="gc_threshold"):
        load_settings(config, env={})
