"""tokenwell's Python client: needs only ``httpx`` (not the server).

- ``ChatAccumulator``: chat-completion chunks (dicts or the ``openai`` SDK's
  objects) → the final message.
- ``Client``: streams with ``include_usage``, an ``Idempotency-Key``, and
  resumes dropped connections with ``Last-Event-ID``.
- ``ResumingTransport``: the same for the official SDK,
  ``openai.OpenAI(http_client=httpx.Client(transport=ResumingTransport()))``;
  ``AsyncResumingTransport`` for ``openai.AsyncOpenAI`` and ``httpx.AsyncClient``.
"""

from tokenwell.client.accumulate import ChatAccumulator
from tokenwell.client.stream import ChatError, ChatStream, Client
from tokenwell.client.transport import AsyncResumingTransport, ResumingTransport, new_key

__all__ = [
    "AsyncResumingTransport",
    "ChatAccumulator",
    "ChatError",
    "ChatStream",
    "Client",
    "ResumingTransport",
    "new_key",
]
