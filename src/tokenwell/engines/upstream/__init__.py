"""Models served by OpenAI-compatible inference servers (``engine = "upstream"``)."""

from tokenwell.engines.upstream.engine import UpstreamEngine

__all__ = ["UpstreamEngine"]
