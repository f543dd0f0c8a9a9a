"""Stored idempotent results are compressed (billing.claims.pack/unpack)."""

from __future__ import annotations

import zlib

from hypothesis import given
from hypothesis import strategies as st

from tokenwell.billing.claims import pack, unpack

EVENT = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":" word%d"},"finish_reason":null}]}\n\n'
)


@given(st.binary(max_size=70_000))
def test_any_body_comes_back_as_it_was_packed(body: bytes) -> None:
    assert unpack(pack(body)) == body


def test_a_streams_text_is_kept_in_a_fraction_of_its_size() -> None:
    body = b"".join(EVENT.replace(b"%d", str(i).encode()) for i in range(64))
    packed = pack(body)
    assert packed is not None and len(packed) * 10 < len(body)
    assert unpack(packed) == body


def test_rows_written_before_read_back() -> None:
    body = EVENT * 3
    deflate = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS, 2)
    assert unpack(b"\0d" + deflate.compress(body) + deflate.flush()) == body  # raw deflate
    assert unpack(b"\0z" + zlib.compress(body, 1)) == body  # packed with zlib's defaults
    packer = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS, 4)
    assert unpack(b"\0z" + packer.compress(body) + packer.flush()) == body  # and memLevel 4
    assert unpack(body) == body  # written before bodies were packed
    assert pack(None) is None and unpack(None) is None
