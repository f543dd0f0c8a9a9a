"""The embedded llama.cpp engine (``engine = "llamacpp"``)."""

from tokenwell.engines.llamacpp.engine import LlamaCppEngine

__all__ = ["LlamaCppEngine"]
