"""Counting tokens with a GGUF's vocabulary, for upstreams that report no usage."""

from __future__ import annotations

from pathlib import Path

from llama_cpp import llama_cpp as L

from tokenwell.engines.llamacpp.model import _init_backend
from tokenwell.errors import ConfigError


class Counter:
    """A vocabulary only (no weights): loads in milliseconds, counts on any thread."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise ConfigError(f"tokenizer GGUF not found: {path}")
        _init_backend()
        params = L.llama_model_default_params()
        params.vocab_only = True
        self._model = L.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise ConfigError(f"llama.cpp could not read the vocabulary of {path}")
        self._vocab = L.llama_model_get_vocab(self._model)

    def count(self, text: str) -> int:
        data = text.encode()
        if not data:
            return 0
        # A negative return is the number of tokens when the buffer is too small.
        n = L.llama_tokenize(self._vocab, data, len(data), None, 0, False, False)
        return -n if n < 0 else n
