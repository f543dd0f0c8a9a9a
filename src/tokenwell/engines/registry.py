"""Engine kinds by name, found through the ``tokenwell.engines`` entry points.

Built-in engines are registered the way a third-party package would register
its own, so core code never switches on an engine's name.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from tokenwell.config import ModelConfig
from tokenwell.engines.base import Engine
from tokenwell.errors import ConfigError

GROUP = "tokenwell.engines"

_extra: dict[str, type[Engine]] = {}


def register(kind: str, engine: type[Engine]) -> None:
    """Register an engine class in-process (tests, embedding applications)."""
    _extra[kind] = engine


def available() -> dict[str, str]:
    kinds = {ep.name: ep.value for ep in entry_points(group=GROUP)}
    kinds.update({k: f"{v.__module__}:{v.__qualname__}" for k, v in _extra.items()})
    return kinds


def engine_class(kind: str) -> type[Engine]:
    if kind in _extra:
        return _extra[kind]
    for ep in entry_points(group=GROUP):
        if ep.name == kind:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Engine)):
                raise ConfigError(f"engine {kind!r} ({ep.value}) is not an Engine subclass")
            return cls
    known = ", ".join(sorted(available())) or "none"
    raise ConfigError(f"unknown engine {kind!r}; installed engines: {known}")


def create_engine(config: ModelConfig) -> Engine:
    return engine_class(config.engine)(config)
