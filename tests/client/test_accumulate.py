"""The chunk accumulator: dicts and the official SDK's objects alike."""

from __future__ import annotations

import subprocess
import sys

from openai.types.chat import ChatCompletionChunk

from tokenwell.client import ChatAccumulator

CHUNKS = [
    {"id": "c1", "model": "m", "created": 1, "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": None}, "finish_reason": None}]},
    {"id": "c1", "model": "m", "created": 1, "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}}]}, "finish_reason": None}]},
    {"id": "c1", "model": "m", "created": 1, "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": '{"city": '}}]}, "finish_reason": None}]},
    {"id": "c1", "model": "m", "created": 1, "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 1, "id": "call_b", "type": "function",
         "function": {"name": "get_time", "arguments": "{}"}}]}, "finish_reason": None}]},
    {"id": "c1", "model": "m", "created": 1, "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": '"Oslo"}'}}]}, "finish_reason": None}]},
    {"id": "c1", "model": "m", "created": 1, "choices": [
        {"index": 0, "delta": {}, "finish_reason": "tool_calls"},
    ]},
    {"id": "c1", "model": "m", "created": 1, "choices": [], "usage": {
        "prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}},
]  # fmt: skip


def _check(acc: ChatAccumulator) -> None:
    result = acc.result()
    message = result["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        },
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    assert result["choices"][0]["finish_reason"] == "tool_calls" and acc.finished
    assert result["usage"]["total_tokens"] == 12


def test_tool_calls_by_index_from_dicts() -> None:
    acc = ChatAccumulator()
    for chunk in CHUNKS:
        acc.add(chunk)
    _check(acc)


def test_the_sdk_objects_fold_the_same() -> None:
    acc = ChatAccumulator()
    for chunk in CHUNKS:
        acc.add(ChatCompletionChunk.model_validate({**chunk, "object": "chat.completion.chunk"}))
    _check(acc)


def test_content_and_several_choices() -> None:
    acc = ChatAccumulator()
    for i, piece in enumerate(["Hel", "lo", "!"]):
        acc.add({"choices": [{"index": i % 2, "delta": {"content": piece}}]})
    acc.add({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    assert acc.text(0) == "Hel!" and acc.text(1) == "lo" and not acc.finished


def test_the_client_imports_without_the_server() -> None:
    code = (
        "import sys, tokenwell.client; "
        "heavy = {'starlette', 'sqlalchemy', 'pydantic', 'uvicorn', 'redis', 'llama_cpp'}; "
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
