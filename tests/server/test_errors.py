"""Bad input: a clear 4xx in the OpenAI error shape, never a 500."""

from __future__ import annotations

import pytest

from tests.support import Server


def error_of(response) -> dict:  # type: ignore[no-untyped-def]
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("content", "status", "param", "code"),
    [
        (b"{oops", 400, None, "invalid_json"),
        (b'{"model": "scripted"}', 400, "messages", "missing_required_parameter"),
        (b'{"model": "scripted", "messages": []}', 400, "messages", "empty_array"),
        (
            b'{"model": "scripted", "messages": [{"role": "user", "content": "x"}],'
            b' "temperature": 200}',
            400,
            "temperature",
            "decimal_above_max_value",
        ),
        (
            b'{"model": "scripted", "messages": [{"role": "user", "content": "x"}], "bogus": 1}',
            400,
            "bogus",
            "unknown_parameter",
        ),
        (
            b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "model",
            "model_not_found",
        ),
        (
            b'{"model": "scripted", "messages": [{"role": "user", "content": "x"}],'
            b' "stream_options": {"include_usage": true}}',
            400,
            "stream_options",
            "invalid_value",
        ),
    ],
)
def test_bad_requests(
    scripted_server: Server, content: bytes, status: int, param: str | None, code: str
) -> None:
    with scripted_server.http() as http:
        r = http.post("/v1/chat/completions", content=content)
    assert r.status_code == status
    err = error_of(r)
    assert (err["param"], err["code"]) == (param, code)
    assert err["type"] == "invalid_request_error"
    # Refused before admission, the error still has an id to quote.
    assert r.headers["x-request-id"].startswith("req_")


def test_every_error_has_its_own_request_id(scripted_server: Server) -> None:
    with scripted_server.http() as http:
        bad = [
            http.post("/v1/chat/completions", content=b"{oops"),
            http.post("/v1/chat/completions", content=b"{oops"),
            http.get("/v1/no-such-route"),
            http.delete("/v1/chat/completions"),
        ]
    assert [r.status_code for r in bad] == [400, 400, 404, 405]
    ids = [r.headers["x-request-id"] for r in bad]
    assert all(i.startswith("req_") for i in ids) and len(set(ids)) == len(ids)


def test_prompt_longer_than_the_context(scripted_server: Server) -> None:
    with scripted_server.http() as http:
        r = http.post(
            "/v1/chat/completions",
            json={
                "model": "scripted-tiny",
                "messages": [{"role": "user", "content": "word " * 100}],
            },
        )
    assert r.status_code == 400
    assert error_of(r)["code"] == "context_length_exceeded"


def test_missing_and_wrong_keys_are_401(scripted_server: Server) -> None:
    for key in (None, "sk-wrong"):
        with scripted_server.http(key=key) as http:
            r = http.post("/v1/chat/completions", json={"model": "scripted", "messages": []})
        assert r.status_code == 401
        err = error_of(r)
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    with scripted_server.http(key=None, headers={"Authorization": "Basic abc"}) as http:
        assert http.get("/v1/models").status_code == 401


def test_oversized_body_is_413(scripted_server: Server) -> None:
    with scripted_server.http() as http:
        r = http.post("/v1/chat/completions", content=b"x" * (9 * 1024 * 1024))
    assert r.status_code == 413
    assert error_of(r)["type"] == "invalid_request_error"


def test_unknown_route_and_method(scripted_server: Server) -> None:
    with scripted_server.http() as http:
        assert error_of(http.get("/v1/nothing"))["code"] == "not_found"
        r = http.get("/v1/chat/completions")
        assert r.status_code == 405 and error_of(r)


def test_queue_full_is_503_with_retry_after(scripted_server: Server) -> None:
    import concurrent.futures

    body = {"model": "scripted-tiny", "messages": [{"role": "user", "content": "x"}]}

    def call() -> object:
        with scripted_server.http() as http:
            return http.post("/v1/chat/completions", json=body)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: call(), range(6)))
    statuses = sorted(r.status_code for r in results)  # type: ignore[attr-defined]
    assert statuses.count(200) >= 2 and 503 in statuses
    busy = next(r for r in results if r.status_code == 503)  # type: ignore[attr-defined]
    assert busy.headers["retry-after"] == "1"  # type: ignore[attr-defined]
    assert error_of(busy)["code"] == "overloaded"


def test_health_needs_no_key_and_models_do(scripted_server: Server) -> None:
    with scripted_server.http(key=None) as http:
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ready"
        assert http.get("/v1/models").status_code == 401
    with scripted_server.http() as http:
        models = http.get("/v1/models").json()
        assert models["object"] == "list"
        assert {m["id"] for m in models["data"]} >= {"scripted", "scripted-64"}
        one = http.get("/v1/models/scripted").json()
        assert one["id"] == "scripted" and one["object"] == "model"
        assert http.get("/v1/models/nope").status_code == 404
