"""The dosing web app: the API contract (TestClient) and the page end to end.

The browser test drives Debian's Chromium (``/usr/bin/chromium``, installed by
``.ci/run``) through Playwright's sync API against a real uvicorn server; Playwright's
own browser download is never used.
"""

import base64
import functools
import json
import logging
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from phems_clinical.app import web
from phems_clinical.app.web import create_app

CHROMIUM = Path("/usr/bin/chromium")
WAIT_MS = 60_000  # generous: CI machines are small and run two test workers
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

# The page's default patient (the minimal example request of the dosing tool).
REQUEST = {
    "product": "advate",
    "weight_kg": 25,
    "age_y": 8,
    "infusions": [{"time_h": 0, "dose_IU": 1000, "duration_h": 0.17}],
    "levels": [
        {"time_h": 4, "value": 40.2, "unit": "IU/dL"},
        {"time_h": 24, "value": 10.1, "unit": "IU/dL"},
        {"time_h": 48, "value": 1.5, "unit": "IU/dL"},
    ],
}


def TestClient(app, **kwargs):  # noqa: N802 - stands in for the class
    from fastapi.testclient import TestClient

    # the app answers only the hosts it trusts (not TestClient's "testserver")
    return TestClient(app, base_url="http://localhost", **kwargs)


def _post(client, body, **params):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/api/dose", content=content, params=params,
                       headers={"Content-Type": "application/json"})


def _fields(resp):
    assert resp.status_code == 422, resp.text
    errors = resp.json()["errors"]
    assert all(set(e) == {"field", "message"} and e["message"] for e in errors)
    return {e["field"] for e in errors}


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app()) as c:
        yield c


@pytest.fixture(scope="module")
def dosed(client):
    resp = _post(client, REQUEST)
    assert resp.status_code == 200, resp.text
    return resp.json()


# ---------------------------------------------------------------- API (TestClient)


def test_page_and_assets_are_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    refs = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert "/static/app.js" in refs and "/static/app.css" in refs
    assert all(r.startswith("/static/") or r in ("#", "data:,") for r in refs), refs
    for text in (page.text, client.get("/static/app.js").text,
                 client.get("/static/app.css").text):
        assert "http://" not in text and "https://" not in text
    assert client.get("/static/../web.py").status_code == 404


def test_products_list_the_library(client):
    resp = client.get("/api/products")
    assert resp.status_code == 200
    products = {p["name"]: p for p in resp.json()}
    advate = products["advate"]
    assert advate["factor"] == "FVIII"
    assert advate["half_life_class"] == "standard"
    assert "Blood" in advate["citation"]
    assert "validated_range" in advate
    assert products["alprolix"]["factor"] == "FIX"


def test_valid_request_gives_result_curve_and_report(client, dosed):
    result = dosed["result"]
    assert result["schema_version"] == 1
    assert result["product"] == "advate" and result["method"] == "map"
    hl = result["half_life_h"]
    assert 0 < hl["lo90"] <= hl["median"] <= hl["hi90"]
    assert result["regimens"] and {"interval_h", "target_IU_dL", "dose_IU",
                                   "trough_prob"} <= set(result["regimens"][0])
    assert [lv["time_h"] for lv in result["levels"]] == [4, 24, 48]
    png = base64.b64decode(dosed["curve_png_base64"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")

    report = client.get(f"/api/report/{dosed['report_id']}")
    assert report.status_code == 200
    assert report.headers["content-type"].startswith("text/html")
    assert report.headers["content-disposition"] == 'attachment; filename="report.html"'
    assert "<html" in report.text.lower()
    assert client.get("/api/report/no-such-report").status_code == 404


def test_invalid_fields_are_reported_by_path(client):
    bad = {**REQUEST, "weight_kg": -5,
           "levels": [REQUEST["levels"][0], {**REQUEST["levels"][1], "value": "abc"}],
           "infusions": [{"time_h": 0, "dose_IU": 0}]}
    fields = _fields(_post(client, bad))
    assert {"weight_kg", "levels[1].value", "infusions[0].dose_IU"} <= fields


def test_non_json_body_is_a_whole_body_error(client):
    assert _fields(_post(client, b"{this is not json")) == {""}


def test_unknown_product(client):
    assert "product" in _fields(_post(client, {**REQUEST, "product": "no-such-fviii"}))


def test_bad_method_and_model_file_are_refused(client):
    assert _fields(_post(client, REQUEST, method="mcmc")) == {"method"}
    body = {k: v for k, v in REQUEST.items() if k != "product"}
    assert _fields(_post(client, {**body, "model": "/etc/passwd"})) == {"model"}


def test_internal_error_is_a_plain_500_without_traceback(monkeypatch, caplog):
    from phems_clinical.app import dose

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(dose, "run_dose", broken)
    with caplog.at_level(logging.ERROR, logger=web.__name__):
        with TestClient(create_app()) as c:
            resp = _post(c, REQUEST)
    assert resp.status_code == 500
    assert resp.headers["content-type"].startswith("text/plain")
    assert "secret" not in resp.text and "Traceback" not in resp.text
    assert "internal error" in resp.text
    assert any("secret internal detail" in (r.exc_text or "") for r in caplog.records)


def test_infinity_stays_readable_through_the_api(client):
    """A level never reached (baseline above the threshold) arrives as "inf"."""
    resp = _post(client, {**REQUEST, "baseline": {"value": 3.0, "unit": "IU/dL"}})
    assert resp.status_code == 200
    body = resp.json()
    assert body["result"]["time_to_threshold_h"]["1"]["median"] == "inf"
    json.dumps(body, allow_nan=False)


def test_report_store_keeps_the_most_recent():
    store = web._ReportStore(2)
    a, b = store.add("a"), store.add("b")
    assert store.get(a) == "a"        # a is now the most recently used
    c = store.add("c")
    assert store.get(b) is None
    assert (store.get(a), store.get(c)) == ("a", "c")


# ------------------------------------------------------ the page in a real browser


@pytest.fixture(scope="module")
def live_server():
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(), ws="none", lifespan="off",
                            log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "no uvicorn"
        time.sleep(0.05)
    # Compile before the browser clicks: the first run_dose in a process JIT-compiles
    # the model (15-50 s on a loaded 2-core CI machine), which is not what the page
    # test measures. The page's own calculations then run on the compiled code.
    from phems_clinical.app.dose import run_dose

    run_dose(json.dumps(REQUEST))
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=15)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed at /usr/bin/chromium "
                    "(.ci/run installs it: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_page_end_to_end(browser, live_server):
    from playwright.sync_api import expect

    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{live_server}/")
    expect(page.locator("#product option[value=alprolix]")).to_have_count(
        1, timeout=WAIT_MS)
    expect(page.locator("#product")).to_have_value("advate")

    # 1. The default patient, as it stands.
    calculate = page.get_by_role("button", name="Calculate")
    with page.expect_request("**/api/dose?method=map") as sent:
        calculate.click()
    assert sent.value.post_data_json == REQUEST
    expect(page.locator("#curve")).to_be_visible(timeout=WAIT_MS)
    page.wait_for_function(
        "() => { const i = document.getElementById('curve');"
        " return i.complete && i.naturalWidth > 100; }")
    expect(page.locator("#regimens tbody tr").first).to_be_visible(timeout=WAIT_MS)
    half_life = page.locator('[data-estimate="half_life_h"] .median').inner_text()
    assert float(half_life) > 0
    expect(page.locator(".field-error")).to_have_count(0)

    with page.expect_download() as report:
        page.get_by_role("link", name="Download report").click()
    assert report.value.suggested_filename == "report.html"
    assert "<html" in Path(report.value.path()).read_text().lower()
    with page.expect_download() as result_json:
        page.get_by_role("link", name="Download result.json").click()
    saved = json.loads(Path(result_json.value.path()).read_text())
    assert saved["product"] == "advate" and saved["half_life_h"]["median"] > 0

    # 2. Bad input: each error right after its own input, nothing calculated.
    weight = page.locator('[data-field="weight_kg"]')
    weight.fill("-5")
    level = page.locator('[data-field="levels[1].value"]')
    level.fill("ten")
    calculate.click()
    weight_error = weight.locator("xpath=following-sibling::*[1]")
    expect(weight_error).to_have_class(re.compile(r"\bfield-error\b"))
    expect(weight_error).to_have_attribute("role", "alert")
    expect(weight_error).to_contain_text(re.compile("weight", re.I))
    expect(weight_error).to_contain_text("-5")
    expect(weight).to_have_attribute("aria-invalid", "true")
    level_error = level.locator("xpath=following-sibling::*[1]")
    expect(level_error).to_have_class(re.compile(r"\bfield-error\b"))
    expect(level_error).to_contain_text("ten")
    expect(page.locator(".field-error")).to_have_count(2)
    expect(page.locator("#results")).to_be_hidden()

    # 3. Corrected: the errors go, the results come back.
    weight.fill("25")
    level.fill("10.1")
    expect(page.locator(".field-error")).to_have_count(0)
    calculate.click()
    expect(page.locator("#regimens tbody tr").first).to_be_visible(timeout=WAIT_MS)
    expect(page.locator(".field-error")).to_have_count(0)
    expect(page.locator("[aria-invalid=true]")).to_have_count(0)
    expect(page.locator("#general-errors")).to_be_hidden()

    # 4. A request file fills the form; fields the form lacks are kept and named.
    upload = {**REQUEST, "patient_id": "PK-7", "weight_kg": 31.5, "sex": "male",
              "options": {"n_draws": 1000},
              "levels": [{"datetime": "2024-03-01T12:30", "value": 0.3,
                          "unit": "IU/mL"}],
              "infusions": [{"datetime": "2024-03-01T08:30", "dose_IU": 1500}]}
    page.locator("#request-file").set_input_files(files=[{
        "name": "request.json", "mimeType": "application/json",
        "buffer": json.dumps(upload).encode()}])
    expect(page.locator("#patient_id")).to_have_value("PK-7")
    expect(weight).to_have_value("31.5")
    expect(page.locator('[data-field="infusions[0].time_h"]')).to_have_value(
        "2024-03-01T08:30")
    expect(page.locator('[data-field="levels[0].value"]')).to_have_value("0.3")
    expect(page.locator("#levels tbody tr")).to_have_count(1)
    expect(page.locator("#file-note")).to_contain_text("sex, options")
    expect(page.locator("#results")).to_be_hidden()

    # 5. What the form sends for that file; an error without an input goes on top.
    bodies = []

    def refuse(route):
        bodies.append(route.request.post_data_json)
        route.fulfill(status=422, json={"errors": [
            {"field": "options.n_draws", "message": "expected at least 500"},
            {"field": "", "message": "something about the whole request"}]})

    page.route("**/api/dose*", refuse)
    page.locator("#method").select_option("nuts")
    calculate.click()
    general = page.locator("#general-errors")
    expect(general).to_be_visible()
    expect(general).to_contain_text("options, n_draws: expected at least 500")
    expect(general).to_contain_text("something about the whole request")
    expect(page.locator(".field-error")).to_have_count(0)
    assert bodies == [upload]
    assert errors == []
    context.close()


def _fulfil(route, *, reply):
    route.fulfill(**reply)


def test_page_shows_limit_errors_by_field(browser, live_server):
    """413, 415 and 503 replies carry {"errors": [...]} like 422: the page shows
    each message at its field (or on top), not the raw reply."""
    from playwright.sync_api import expect

    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(f"{live_server}/")
    expect(page.locator("#product option[value=alprolix]")).to_have_count(
        1, timeout=WAIT_MS)
    calculate = page.get_by_role("button", name="Calculate")
    general = page.locator("#general-errors")
    for status, field, message in [
            (413, "", "the request body is larger than the 64 KB"),
            (415, "Content-Type", "expected application/json"),
            (503, "", "the server is busy with 2 other calculation(s)"),
            (503, "patient_id", "a field-level refusal")]:
        reply = {"status": status, "headers": {"Retry-After": "10"},
                 "json": {"errors": [{"field": field, "message": message}]}}
        page.unroute("**/api/dose*")
        page.route("**/api/dose*", functools.partial(_fulfil, reply=reply))
        calculate.click()
        if field == "patient_id":
            shown = page.locator("#patient_id").locator(
                "xpath=following-sibling::*[1]")
            expect(shown).to_have_class(re.compile(r"\bfield-error\b"))
            expect(shown).to_contain_text(message)
        else:
            expect(general).to_be_visible()
            expect(general).to_contain_text(message)
            expect(general).not_to_contain_text('{"errors"')
            expect(general).not_to_contain_text(f"HTTP {status}")
    expect(page.locator("#patient_id")).to_have_attribute("maxlength", "64")
    context.close()
