"""``tokenwell chat``: a conversation in the terminal with any tokenwell, local or remote.

Tokens are printed as they arrive; the conversation is kept and sent whole
each turn; after each answer one line says what the turn used and cost. The
cost is what the ledger billed: the key's spend (``GET /v1/usage``) after the
turn's row closed, less its spend before (so another client spending on the
same key at the same moment shows up in this turn).

Commands: ``/reset`` forgets the conversation, ``/model`` lists the models
(``/model NAME`` switches), ``/quit`` (or Ctrl-D) leaves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TextIO

import httpx

from tokenwell.client.stream import ChatError, Client

HELP = "/reset: forget the conversation · /model [NAME]: list or switch · /quit: leave"


class TerminalChat:
    def __init__(
        self,
        url: str,
        key: str,
        model: str | None,
        out: TextIO,
        read: Callable[[str], str] = input,
        system: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.client = Client(self.base, key, max_attempts=3)
        self.http = self.client.http
        self.out = out
        self.read = read
        self.system = system
        self.options = {k: v for k, v in (options or {}).items() if v is not None}
        self.messages: list[dict[str, Any]] = []
        self.model = model or self._first_model()

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        self._say(f"tokenwell chat · {self.base} · model {self.model}\n{HELP}\n")
        while True:
            try:
                line = self.read("you> ")
            except (EOFError, KeyboardInterrupt):
                self._say("\n")
                return
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                return
            if text == "/reset":
                self.messages.clear()
                self._say("(conversation forgotten)\n")
            elif text == "/model" or text.startswith("/model "):
                self._switch(text.removeprefix("/model").strip())
            elif text.startswith("/"):
                self._say(f"unknown command {text.split()[0]}: {HELP}\n")
            else:
                try:
                    self.turn(text)
                except KeyboardInterrupt:
                    self._say("\n(interrupted)\n")

    def turn(self, text: str) -> None:
        """Send the conversation with ``text`` added; print the answer as it streams."""
        before = self._usage()
        self.messages.append({"role": "user", "content": text})
        prompt = [{"role": "system", "content": self.system}] if self.system else []
        started = time.monotonic()
        stream = self.client.stream(
            model=self.model, messages=prompt + self.messages, **self.options
        )
        self._say(f"{self.model}> ")
        try:
            for chunk in stream:
                for choice in chunk.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        self._say(piece)
        except ChatError as exc:
            self.messages.pop()  # not part of the conversation: nothing answered it
            hint = " (/reset starts a new one)" if exc.code == "context_length_exceeded" else ""
            self._say(f"\nerror: {exc}{hint}\n")
            return
        except httpx.HTTPError as exc:
            self.messages.pop()
            self._say(f"\nerror: cannot reach {self.base}: {exc}\n")
            return
        seconds = time.monotonic() - started
        answer = stream.text()
        self.messages.append({"role": "assistant", "content": answer})
        if stream.error:
            self._say(f"\nerror: {stream.error}")
        usage = stream.accumulator.usage or {}
        cost = self._cost(before)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        self._say(
            f"\n[{usage.get('prompt_tokens', '?')} prompt"
            + (f" ({cached} cached)" if cached else "")
            + f" + {usage.get('completion_tokens', '?')} completion tokens · "
            + (f"${_usd(cost)}" if cost is not None else "cost unknown")
            + f" · {seconds:.1f} s · {stream.request_id}]\n"
        )

    # ------------------------------------------------------------------ helpers

    def _say(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _models(self) -> list[str]:
        response = self.http.get("models")
        if response.status_code != 200:
            raise ChatError(response.status_code, _json(response))
        return [m["id"] for m in response.json()["data"]]

    def _first_model(self) -> str:
        models = self._models()
        if not models:
            raise ChatError(403, {"error": {"message": "this key may use no model"}})
        return models[0]

    def _switch(self, name: str) -> None:
        models = self._models()
        if not name:
            listed = ", ".join(f"*{m}" if m == self.model else m for m in models)
            self._say(f"models: {listed}\n")
        elif name not in models:
            self._say(f"no model {name!r} for this key; models: {', '.join(models)}\n")
        else:
            self.model = name
            self._say(f"(model {name}; the conversation goes on)\n")

    def _usage(self) -> dict[str, Any] | None:
        try:
            response = self.http.get("usage")
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None  # type: ignore[no-any-return]

    def _cost(self, before: dict[str, Any] | None, wait: float = 5.0) -> Decimal | None:
        """What the turn was billed: once its ledger row has closed, the spend it added."""
        if before is None:
            return None
        deadline = time.monotonic() + wait
        while True:
            after = self._usage()
            if after is None:
                return None
            if after["requests"] > before["requests"] or time.monotonic() > deadline:
                # Once more: the count and the spend are two reads, and the turn's
                # close may have committed between them in the one that saw it.
                after = self._usage() or after
                return Decimal(after["spend_usd"]) - Decimal(before["spend_usd"])
            time.sleep(0.05)

    def close(self) -> None:
        self.client.close()


def _usd(amount: Decimal) -> str:
    """As the server writes amounts: exact, nine decimals at most, no trailing zeros."""
    text = f"{amount:.9f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text
