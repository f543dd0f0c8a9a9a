"""The dashboard's forms and filters take anything and answer a page, never a 5xx.

Signed in for real (master key, session cookie, the page's CSRF token), then
hypothesis sends arbitrary form fields and query strings to a real server.
The login itself is not fuzzed: a wrong key is slowed on purpose.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import MASTER, SCRIPTED_CONFIG, Server

pytestmark = pytest.mark.timeout(300)

FIELDS = ["name", "budget_usd", "rpm", "tpm", "models", "expires_at", "csrf", "extra"]
odd = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "0", "-1", "1e309", "NaN", "99999999999999999999", "2026-13-40",
                     "9999-12-31T23:59:59-23:59", "²", "scripted,,scripted-64", " ", "\x00",
                     "a" * 300]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
)  # fmt: skip


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, str]]:
    with (
        Server(tmp_path_factory.mktemp("dashfuzz"), SCRIPTED_CONFIG) as server,
        httpx.Client(base_url=server.base, timeout=30) as http,
    ):
        assert http.post("/dashboard/login", data={"master_key": MASTER}).status_code == 303
        page = http.get("/dashboard/keys").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        assert csrf is not None
        yield http, csrf.group(1)
        assert httpx.get(f"{server.base}/health").status_code == 200


def _page(response: httpx.Response, *allowed: int) -> None:
    assert response.status_code in allowed, (response.status_code, response.text[:500])
    kind = response.headers.get("content-type", "")
    if response.status_code in (404, 405, 413) and kind.startswith("application/json"):
        assert "error" in response.json()  # the router's or the body's: the API's shape
    elif response.status_code != 303:
        assert response.headers["content-type"].startswith("text/html")


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(form=st.dictionaries(st.sampled_from(FIELDS), odd, max_size=6), keep_csrf=st.booleans())
def test_creating_keys_from_any_form(
    signed: tuple[httpx.Client, str], form: dict[str, str], keep_csrf: bool
) -> None:
    http, csrf = signed
    if keep_csrf:
        form = {**form, "csrf": csrf}
    response = http.post("/dashboard/keys", data=form)
    if form.get("csrf") != csrf:
        _page(response, 403)
    else:
        _page(response, 201, 400)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(key_id=st.text(min_size=1, max_size=40), form=st.dictionaries(st.sampled_from(FIELDS), odd))
def test_updating_and_revoking_any_key(
    signed: tuple[httpx.Client, str], key_id: str, form: dict[str, str]
) -> None:
    http, csrf = signed
    path = "/dashboard/keys/" + quote(key_id, safe="")
    _page(http.post(path, data={**form, "csrf": csrf}), 303, 400, 404, 405)
    _page(http.post(path + "/revoke", data={"csrf": csrf}), 303, 400, 404, 405)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    params=st.dictionaries(
        st.sampled_from(["key_id", "model", "status", "since", "until", "limit", "x"]), odd
    ),
    request_id=st.text(min_size=1, max_size=40),
)
def test_filtering_the_request_log_with_anything(
    signed: tuple[httpx.Client, str], params: dict[str, str], request_id: str
) -> None:
    http, _ = signed
    _page(http.get("/dashboard/requests", params=params), 200)
    path = "/dashboard/requests/" + quote(request_id, safe="")
    _page(http.get(path), 200, 404)


def test_an_oversized_form_is_refused(signed: tuple[httpx.Client, str], tmp_path: Path) -> None:
    http, csrf = signed
    r = http.post("/dashboard/keys", data={"csrf": csrf, "name": "x" * (70 * 1024)})
    assert r.status_code == 413
