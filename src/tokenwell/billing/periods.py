"""Budget periods: when a day, a week or a month begins, in UTC or a key's time zone.

A key's spend per period is kept beside its lifetime spend, with the start of
the window it belongs to (``day_start``, ``week_start``, ``month_start``:
UNIX seconds of the local midnight that opened it). A request's window is
that of the moment it was admitted, in the key's zone: the reservation that
admits it rolls the key's window forward when a new one has begun (its spend
starts again at zero), and its cost counts toward that window when it closes,
also after midnight. Weeks begin on Monday (ISO 8601).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo
from functools import lru_cache
from typing import NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

PERIODS = ("day", "week", "month")
ALL_PERIODS = (*PERIODS, "total")


class Windows(NamedTuple):
    """The starts of the day, week and month containing a moment (UNIX seconds)."""

    day: float
    week: float
    month: float


# Before any window (what a row made without a clock carries).
EPOCH = Windows(0.0, 0.0, 0.0)


@lru_cache(maxsize=512)
def zone(name: str | None) -> tzinfo:
    """The time zone of an IANA name (None: UTC); ValueError for an unknown one."""
    if name is None or name == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"unknown time zone {name!r}: expected an IANA name") from exc


def _midnight(day: datetime, tz: tzinfo) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()


@lru_cache(maxsize=1024)
def _windows_of(tz_name: str | None, year: int, month: int, day: int) -> tuple[Windows, float]:
    tz = zone(tz_name)
    local = datetime(year, month, day)
    week = local - timedelta(days=local.weekday())
    first = local.replace(day=1)
    tomorrow = local + timedelta(days=1)
    return Windows(_midnight(local, tz), _midnight(week, tz), _midnight(first, tz)), _midnight(
        tomorrow, tz
    )


def windows(ts: float, tz_name: str | None = None) -> Windows:
    """The windows containing ``ts`` in the zone (cached per local day)."""
    local = datetime.fromtimestamp(ts, zone(tz_name))
    return _windows_of(tz_name, local.year, local.month, local.day)[0]


def next_reset(period: str, ts: float, tz_name: str | None = None) -> float | None:
    """When the window of ``period`` containing ``ts`` ends (None for ``total``)."""
    if period == "total":
        return None
    tz = zone(tz_name)
    local = datetime.fromtimestamp(ts, tz)
    if period == "day":
        end = local + timedelta(days=1)
    elif period == "week":
        end = local + timedelta(days=7 - local.weekday())
    else:
        end = (local.replace(day=1) + timedelta(days=32)).replace(day=1)
    return _midnight(end, tz)


def window_start(period: str, ts: float, tz_name: str | None = None) -> float:
    if period == "total":
        return 0.0
    return float(getattr(windows(ts, tz_name), period))


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()
