"""The dashboard and the chat page in a real headless Chromium (Debian's, driven by
Selenium through its chromedriver; ``./dev test`` installs both). Screenshots of
every page, at desktop and phone widths, are saved under the test's tmp dir."""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from tests.support import (
    MASTER,
    SCRIPTED_CONFIG,
    FakeUpstream,
    Server,
    gateway_config,
    ledger_row,
)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
        reason="needs Debian's chromium and chromium-driver (./dev test installs them with apt)",
    ),
]

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

DESKTOP, PHONE = (1280, 900), (390, 844)


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[webdriver.Chrome]:
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_window_size(*DESKTOP)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: webdriver.Chrome, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / "screenshots"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 1000
    return path


def wait(driver: webdriver.Chrome, seconds: float = 30) -> WebDriverWait:
    return WebDriverWait(driver, seconds)


def usd(value: str) -> str:
    """As the dashboard shows an amount."""
    return f"${float(value):,.6f}".rstrip("0").rstrip(".")


def fits(driver: webdriver.Chrome) -> bool:
    """Nothing wider than the window: tables scroll inside their own box."""
    return bool(
        driver.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth + 1"
        )
    )


def sign_in(driver: webdriver.Chrome, server: Server, key: str) -> None:
    driver.get(f"{server.base}/dashboard/login")
    field = driver.find_element(By.ID, "master_key")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#login button").click()


def test_the_dashboard_end_to_end(browser: webdriver.Chrome, tmp_path: Path) -> None:
    server = Server(tmp_path / "server", SCRIPTED_CONFIG).start()
    try:
        _dashboard(browser, server, tmp_path)
    finally:
        server.stop()


def _dashboard(driver: webdriver.Chrome, server: Server, tmp_path: Path) -> None:
    # Signed out: every page leads to the login.
    driver.get(f"{server.base}/dashboard/keys")
    assert driver.current_url.endswith("/dashboard/login")
    shot(driver, tmp_path, "login")

    # A wrong master key is refused, and slowly.
    started = time.monotonic()
    sign_in(driver, server, "not-the-master-key")
    wait(driver).until(ec.presence_of_element_located((By.ID, "login-error")))
    assert time.monotonic() - started >= 1.0
    assert driver.get_cookies() == []

    sign_in(driver, server, MASTER)
    wait(driver).until(ec.url_to_be(f"{server.base}/dashboard"))
    (cookie,) = driver.get_cookies()
    assert cookie["name"] == "tw_session" and cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict" and cookie["path"] == "/dashboard"
    assert cookie["expiry"] > time.time() + 3600
    # Not readable from a page's script.
    assert "tw_session" not in driver.execute_script("return document.cookie")

    # A key's spend after real requests.
    alice = server.create_key(name="alice", budget_usd="5")
    sdk = server.client(alice["key"])
    ids = []
    for model in ("scripted", "scripted-64", "scripted"):
        done = sdk.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "spend something"}]
        )
        ids.append(done.headers["x-request-id"])
    billed = sum(Decimal(ledger_row(server, rid)["cost_usd"]) for rid in ids)
    with server.http() as http:
        spent = http.get(f"/admin/keys/{alice['id']}").json()["spend_usd"]
    assert Decimal(spent) == billed > 0

    driver.get(f"{server.base}/dashboard")
    today = driver.find_element(By.CSS_SELECTOR, '[data-window="today"]')
    assert today.find_element(By.CSS_SELECTOR, ".requests").text == "3"
    assert today.find_element(By.CSS_SELECTOR, ".spend").text == usd(spent)
    legend = driver.find_element(By.CSS_SELECTOR, ".legend").text
    assert "alice" in legend and usd(spent) in legend
    shot(driver, tmp_path, "overview")

    driver.get(f"{server.base}/dashboard/keys")
    row = driver.find_element(By.ID, f"key-{alice['id']}")
    assert row.find_element(By.CSS_SELECTOR, ".spend-usd").text == usd(spent)
    assert row.find_element(By.CSS_SELECTOR, ".bar span").get_attribute("style")
    shot(driver, tmp_path, "keys")

    # Create a key on the page; its secret works with the openai SDK.
    driver.execute_script("document.querySelector('details.card').open = true")
    form = driver.find_element(By.ID, "create-key")
    form.find_element(By.NAME, "name").send_keys("bob from the page")
    form.find_element(By.NAME, "budget_usd").send_keys("1")
    form.find_element(By.NAME, "rpm").send_keys("600")
    form.find_element(By.CSS_SELECTOR, "button").click()
    secret = wait(driver).until(ec.presence_of_element_located((By.ID, "new-secret"))).text
    bob_id = driver.find_element(By.ID, "new-key-id").text
    assert secret.startswith("tw-")
    shot(driver, tmp_path, "key-created")
    answer = server.client(secret).chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "hello from bob"}]
    )
    assert answer.choices[0].message.content
    with server.http() as http:
        bob = http.get(f"/admin/keys/{bob_id}").json()
    assert bob["name"] == "bob from the page" and bob["rpm"] == 600
    assert Decimal(bob["budget_usd"]) == 1

    # Update it on the page.
    driver.get(f"{server.base}/dashboard/keys")
    row = driver.find_element(By.ID, f"key-{bob_id}")
    row.find_element(By.CSS_SELECTOR, ".actions details summary").click()
    tpm = row.find_element(By.CSS_SELECTOR, ".edit-key input[name=tpm]")
    tpm.send_keys("5000")
    # A field emptied on the form clears that limit: bob's budget goes.
    row.find_element(By.CSS_SELECTOR, ".edit-key input[name=budget_usd]").clear()
    # The form posts and the page comes back at the same URL: wait for a new
    # document, not for the URL (already the keys page) nor for the old row to go
    # stale (chromedriver can answer "Node ... does not belong to the document"
    # instead of a stale-element error while the old page is torn down).
    driver.execute_script("window.tokenwellOldPage = true")
    row.find_element(By.CSS_SELECTOR, ".edit-key button").click()
    wait(driver).until(lambda d: not d.execute_script("return !!window.tokenwellOldPage"))
    wait(driver).until(ec.presence_of_element_located((By.ID, f"key-{bob_id}")))
    with server.http() as http:
        bob = http.get(f"/admin/keys/{bob_id}").json()
    assert bob["tpm"] == 5000 and bob["rpm"] == 600 and bob["budget_usd"] is None

    # Revoke it on the page: refused at once.
    row = driver.find_element(By.ID, f"key-{bob_id}")
    row.find_element(By.CSS_SELECTOR, "form.revoke button").click()
    wait(driver).until(ec.alert_is_present()).accept()
    wait(driver).until(
        lambda d: "revoked" in d.find_element(By.ID, f"key-{bob_id}").get_attribute("class")
    )
    with pytest.raises(openai.AuthenticationError):
        server.client(secret).chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "still there?"}]
        )

    # The request log, filtered by key, then by model too.
    driver.get(f"{server.base}/dashboard/requests")
    Select(driver.find_element(By.NAME, "key_id")).select_by_value(alice["id"])
    driver.find_element(By.CSS_SELECTOR, "#filter button").click()
    wait(driver).until(ec.url_contains("key_id="))
    shown = [
        r.get_attribute("data-request-id")
        for r in driver.find_elements(By.CSS_SELECTOR, "#ledger tbody tr[data-request-id]")
    ]
    assert sorted(shown) == sorted(ids)
    Select(driver.find_element(By.NAME, "model")).select_by_visible_text("scripted-64")
    driver.find_element(By.CSS_SELECTOR, "#filter button").click()
    wait(driver).until(ec.url_contains("model=scripted-64"))
    rows = driver.find_elements(By.CSS_SELECTOR, "#ledger tbody tr[data-request-id]")
    assert [r.get_attribute("data-request-id") for r in rows] == [ids[1]]
    shot(driver, tmp_path, "requests-filtered")
    # A request's row in full.
    rows[0].find_element(By.CSS_SELECTOR, "a").click()
    wait(driver).until(ec.presence_of_element_located((By.ID, "request-fields")))
    field = {
        e.get_attribute("data-field"): e.text
        for e in driver.find_elements(By.CSS_SELECTOR, "#request-fields dd")
    }
    row_data = ledger_row(server, ids[1])
    assert field["completion_tokens"] == str(row_data["completion_tokens"]) == "64"
    assert field["cost_usd"] == row_data["cost_usd"] and field["status"] == "completed"

    # Requests in flight, live.
    driver.get(f"{server.base}/dashboard/requests")
    streaming = threading.Event()
    done = threading.Event()
    seen: dict[str, str] = {}

    def slow_stream() -> None:
        with (
            server.http(key=alice["key"]) as http,
            http.stream(
                "POST",
                "/v1/chat/completions",
                json={
                    "model": "scripted-slow",
                    "stream": True,
                    "messages": [{"role": "user", "content": "take your time"}],
                },
            ) as stream,
        ):
            seen["id"] = stream.headers["x-request-id"]
            chunks = stream.iter_bytes()
            next(chunks)
            streaming.set()
            done.wait(60)

    thread = threading.Thread(target=slow_stream)
    thread.start()
    try:
        assert streaming.wait(30)
        wait(driver).until(
            ec.presence_of_element_located(
                (By.CSS_SELECTOR, f'#live tr[data-request-id="{seen["id"]}"]')
            )
        )
        assert "alice" in driver.find_element(By.ID, "live").text
        shot(driver, tmp_path, "requests-in-flight")
    finally:
        done.set()
        thread.join(30)

    driver.get(f"{server.base}/dashboard/models")
    models = driver.find_elements(By.CSS_SELECTOR, "section.model")
    assert {m.get_attribute("data-model") for m in models} >= {"scripted", "scripted-64"}
    assert "ready" in models[0].text
    shot(driver, tmp_path, "models")

    # Readable on a phone: nothing wider than the screen, every page.
    driver.set_window_size(*PHONE)
    for page in ("", "/keys", "/requests", "/models"):
        driver.get(f"{server.base}/dashboard{page}")
        assert fits(driver), page
        shot(driver, tmp_path, f"phone-{page.strip('/') or 'overview'}")
    driver.set_window_size(*DESKTOP)

    # A form without the page's CSRF token changes nothing, even with the session.
    cookies = {c["name"]: c["value"] for c in driver.get_cookies()}
    forged = httpx.post(
        f"{server.base}/dashboard/keys/{alice['id']}/revoke",
        data={"csrf": "forged"},
        cookies=cookies,
    )
    assert forged.status_code == 403
    with server.http() as http:
        assert http.get(f"/admin/keys/{alice['id']}").json()["status"] == "active"

    # Signing out ends the session.
    driver.get(f"{server.base}/dashboard")
    driver.find_element(By.CSS_SELECTOR, ".logout button").click()
    wait(driver).until(ec.url_to_be(f"{server.base}/dashboard/login"))
    driver.get(f"{server.base}/dashboard")
    assert driver.current_url.endswith("/dashboard/login")


def chat_turn(
    driver: webdriver.Chrome, text: str, turn: int, seconds: float = 120
) -> tuple[str, str, str]:
    """Send ``text`` on the chat page; the answer, its usage line and its request id."""
    prompt = driver.find_element(By.ID, "prompt")
    prompt.send_keys(text)
    prompt.send_keys(Keys.ENTER)
    meta = wait(driver, seconds).until(
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")[turn - 1]
            if len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")) >= turn
            else False
        )
    )
    answer = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")[turn - 1].text
    return answer, meta.text, meta.get_attribute("data-request-id") or ""


def _open_chat(driver: webdriver.Chrome, server: Server, key: str, model: str | None) -> None:
    driver.get(f"{server.base}/")
    field = driver.find_element(By.ID, "key")
    field.send_keys(key)
    field.send_keys(Keys.TAB)  # "change": the models load
    wait(driver).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option[value]"))
    if model is not None:
        Select(driver.find_element(By.ID, "model")).select_by_value(model)


def test_the_chat_page_streams_and_shows_each_turns_cost(
    browser: webdriver.Chrome, scripted_server: Server, tmp_path: Path
) -> None:
    key = scripted_server.create_key(name="chat page")
    _open_chat(browser, scripted_server, key["key"], "scripted-64")
    answer, meta, rid = chat_turn(browser, "hello page", 1)
    row = ledger_row(scripted_server, rid)
    assert row["key_id"] == key["id"] and row["completion_tokens"] == 64
    assert len(answer.split()) >= 32
    # The turn's cost exactly as the ledger billed it (nano-dollars, not floats).
    assert f"+ 64 completion tokens · ${row['cost_usd']} · " in meta
    _, _, rid2 = chat_turn(browser, "and again", 2)
    # The conversation is kept: the second prompt holds the first turn.
    assert ledger_row(scripted_server, rid2)["prompt_tokens"] > row["prompt_tokens"]
    shot(browser, tmp_path, "chat-desktop")
    browser.set_window_size(*PHONE)
    assert fits(browser)
    shot(browser, tmp_path, "chat-phone")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_chat_page_with_the_real_model(
    browser: webdriver.Chrome, model_server: Server, tmp_path: Path
) -> None:
    _open_chat(browser, model_server, MASTER, None)
    # No max_tokens from the page: a short question, and time for a long answer on a
    # busy machine (the model may write up to its context).
    answer, meta, rid = chat_turn(
        browser, "Answer in one word: what is the capital of France?", 1, seconds=600
    )
    row = ledger_row(model_server, rid)
    assert row["status"] in ("completed", "length") and row["completion_tokens"] > 0
    assert answer.strip()
    assert f"+ {row['completion_tokens']} completion tokens" in meta
    shot(browser, tmp_path, "chat-real-model")


def test_the_models_page_shows_each_upstreams_health(tmp_path: Path) -> None:
    """Signed in over plain HTTP (no browser needed): an upstream that answers and
    one that refuses the gateway's credentials, side by side."""
    good = FakeUpstream(tmp_path)
    locked = FakeUpstream(tmp_path, api_key="the-upstream-key")
    config = gateway_config({"gw": f'["{good.url}", "{locked.url}"]'})
    try:
        with Server(tmp_path / "gw", config) as server, httpx.Client(base_url=server.base) as http:
            signed = http.post("/dashboard/login", data={"master_key": MASTER})
            assert signed.status_code == 303 and "tw_session" in http.cookies
            page = http.get("/dashboard/models")
    finally:
        good.stop()
        locked.stop()
    assert page.status_code == 200
    section = page.text.split('data-model="gw"', 1)[1]
    assert good.url in section and locked.url in section
    assert "healthy" in section and "unhealthy" in section
    assert "answered 401" in section and "set api_key for this URL" in section
    assert re.search(r"<td>[0-9.,]+ ms</td>", section)  # the health check's latency
