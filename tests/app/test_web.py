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
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# A minimal request on a fully verified product (the page's example patient).
REQUEST = {
    "product": "kovaltry",
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
    return client.post(
        "/api/dose",
        content=content,
        params=params,
        headers={"Content-Type": "application/json"},
    )


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
    for text in (
        page.text,
        client.get("/static/app.js").text,
        client.get("/static/app.css").text,
    ):
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
    # shown by brand and INN, with population, when to choose it, and the
    # sections that need an acknowledgement (pk.library.product_info)
    from phems_clinical.pk.library import product_info

    for name, p in products.items():
        info = product_info(name)
        assert p["display"] == info.display and p["ages"] == info.ages
        assert p["choose_when"] == info.choose_when
        assert p["unverified"] == list(info.unverified)
    assert products["advate"]["display"].startswith("Advate (octocog alfa)")
    assert products["advate"]["unverified"] and not products["kovaltry"]["unverified"]


def test_valid_request_gives_result_curve_and_report(client, dosed):
    result = dosed["result"]
    assert result["product"] == "kovaltry" and result["method"] == "map"
    hl = result["half_life_h"]
    assert 0 < hl["lo90"] <= hl["median"] <= hl["hi90"]
    assert result["regimens"] and {
        "schedule",
        "target_IU_dL",
        "dose_IU",
        "trough_prob",
    } <= set(result["regimens"][0])
    assert result["display"]["summary"] and result["display"]["regimen_table"]
    assert dosed["history_enabled"] is False and dosed["previous"] is None
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
    bad = {
        **REQUEST,
        "weight_kg": -5,
        "levels": [REQUEST["levels"][0], {**REQUEST["levels"][1], "value": "abc"}],
        "infusions": [{"time_h": 0, "dose_IU": 0}],
    }
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
    assert store.get(a) == "a"  # a is now the most recently used
    c = store.add("c")
    assert store.get(b) is None
    assert (store.get(a), store.get(c)) == ("a", "c")


# ------------------------------------------------------- patient history (API)


def _clinic_request(year: int, weight_lb: float, pid: str = "HB-7") -> dict:
    """A clinic's request: weight in lb, day-first date-times."""
    return {
        "patient_id": pid,
        "product": "kovaltry",
        "weight_lb": weight_lb,
        "age_y": 8,
        "infusions": [
            {"datetime": f"01/03/{year} 08:00", "dose_IU": 1000, "duration_h": 0.17}
        ],
        "levels": [
            {"datetime": f"01/03/{year} 12:00", "value": 40.2, "unit": "IU/dL"},
            {"datetime": f"02/03/{year} 08:00", "value": 10.1, "unit": "IU/dL"},
            {"datetime": f"03/03/{year} 08:00", "value": 2.5, "unit": "IU/dL"},
        ],
    }


def _save(client, report_id):
    return client.post(
        "/api/assessments",
        content=json.dumps({"report_id": report_id}),
        headers={"Content-Type": "application/json"},
    )


def test_history_api_saves_lists_and_reopens(tmp_path):
    db = tmp_path / "clinic.db"
    with TestClient(create_app(db=db)) as c:
        assert c.get("/api/patients").json() == {"enabled": True, "patients": []}
        first = _post(c, _clinic_request(2024, 55)).json()
        assert first["history_enabled"] and first["previous"] is None
        assert first["assessed_at"] == "2024-03-03T08:00"
        saved = _save(c, first["report_id"])
        assert saved.status_code == 201, saved.text
        aid = saved.json()["assessment_id"]
        assert _save(c, first["report_id"]).json()["assessment_id"] == aid  # once
        second = _post(c, _clinic_request(2025, 62)).json()
        assert second["previous"]["assessment_id"] == aid
        assert (
            second["previous"]["result"]["effective_half_life_h"]
            == first["result"]["effective_half_life_h"]
        )
        assert len(second["result"]["display"]["comparison"]["rows"]) == 2
        bid = _save(c, second["report_id"]).json()["assessment_id"]

        [p] = c.get("/api/patients").json()["patients"]
        assert (p["patient_id"], p["n_assessments"]) == ("HB-7", 2)
        hist = c.get("/api/patients/HB-7").json()
        assert [a["assessment_id"] for a in hist["assessments"]] == [aid, bid]
        assert [r[0] for r in hist["table"]["rows"]] == [
            "2024-03-03 08:00",
            "2025-03-03 08:00",
        ]
        eff = hist["table"]["columns"].index("Effective half-life")
        shown = {d["label"]: d["value"] for d in first["result"]["display"]["summary"]}
        assert hist["table"]["rows"][0][eff] == shown["Effective half-life"]

        again = c.get(f"/api/assessments/{aid}").json()
        assert again["request"] == _clinic_request(2024, 55)
        assert {k: v for k, v in again["result"].items() if k != "display"} == {
            k: v for k, v in first["result"].items() if k != "display"
        }
        assert again["previous"] is None
        assert base64.b64decode(again["curve_png_base64"]).startswith(b"\x89PNG")
        assert c.get(f"/api/report/{again['report_id']}").status_code == 200
        assert (
            c.get(f"/api/assessments/{bid}").json()["previous"]["assessment_id"] == aid
        )

        # errors by field
        anonymous = {
            k: v for k, v in _clinic_request(2024, 55).items() if k != "patient_id"
        }
        no_id = _post(c, anonymous).json()
        assert _save(c, no_id["report_id"]).json()["errors"][0]["field"] == "patient_id"
        assert _save(c, "gone").status_code == 404
        assert c.get("/api/patients/nobody").status_code == 404
        assert c.get("/api/assessments/999").status_code == 404
        assert _fields(c.get("/api/assessments/1x")) == {"assessment_id"}
        assert (
            c.post(
                "/api/assessments",
                content=b"{}",
                headers={"Content-Type": "text/plain"},
            ).status_code
            == 415
        )
        assert _fields(
            c.post(
                "/api/assessments",
                content=b"[1]",
                headers={"Content-Type": "application/json"},
            )
        ) == {"report_id"}


def test_without_db_there_is_no_history(client, dosed):
    assert client.get("/api/patients").json() == {"enabled": False, "patients": []}
    resp = _save(client, dosed["report_id"])
    assert resp.status_code == 409 and "--db" in resp.json()["errors"][0]["message"]


# ------------------------------------------------------ the page in a real browser


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    import uvicorn

    db = tmp_path_factory.mktemp("clinic") / "clinic.db"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(db=db),
        ws="none",
        lifespan="off",
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "no uvicorn"
        time.sleep(0.05)
    # Compile before the browser clicks: the first run_dose in a process JIT-compiles
    # the model (15-50 s on a loaded 2-core CI machine), which is not what the page
    # test measures. The page's own calculations then run on the compiled code.
    from phems_clinical.app.dose import run_dose

    run_dose(json.dumps(_clinic_request(2023, 50, "warm-up")))
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=15)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(
            "Debian chromium is not installed at /usr/bin/chromium "
            "(.ci/run installs it: apt-get install chromium)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def _enter_patient(page, year: int, weight_lb: str):
    """Type a patient as a clinic writes it: weight in lb, DD/MM/YYYY times."""
    page.locator("#patient_id").fill("HB-7")
    page.locator("#weight").fill(weight_lb)
    page.locator("#weight-unit").select_option("lb")
    page.locator("#age_y").fill("8")
    row = page.locator("#infusions tbody tr").nth(0)
    row.locator('[data-key="time"]').fill(f"01/03/{year} 08:00")
    row.locator('[data-key="dose_IU"]').fill("1000")
    row.locator('[data-key="duration_h"]').fill("0.17")
    for i, (when, value) in enumerate(
        [
            (f"01/03/{year} 12:00", "40.2"),
            (f"02/03/{year} 08:00", "10.1"),
            (f"03/03/{year} 08:00", "2.5"),
        ]
    ):
        if page.locator("#levels tbody tr").count() <= i:
            page.get_by_role("button", name="Add level").click()
        row = page.locator("#levels tbody tr").nth(i)
        row.locator('[data-key="time"]').fill(when)
        row.locator('[data-key="value"]').fill(value)


@pytest.mark.slow
def test_clinic_walk_new_patient_design_save_and_next_year(browser, live_server):
    """The issue's walk: an empty page; a shipped product; a new patient in lb
    with DD/MM/YYYY times; calculate; change the target and a schedule;
    evaluate Mon/Wed/Fri; save; the same patient a year later, with the
    history and the previous assessment beside the new one."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)  # calculations compile on first use
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{live_server}/")
    expect(page.locator("#product option[value=kovaltry]")).to_have_count(1)

    # 1. The page starts empty; the example is loaded only on request, labelled.
    expect(page.locator("#product")).to_have_value("")
    for field in ("#patient_id", "#weight", "#age_y", "#targets", "#schedules"):
        expect(page.locator(field)).to_have_value("")
    expect(page.locator("#infusions tbody input[type=text]").first).to_have_value("")
    expect(page.locator("#results")).to_be_hidden()
    expect(page.locator("#example-note")).to_be_hidden()
    expect(page.locator("#history-tools")).to_be_visible()  # served with --db
    page.get_by_role("button", name="Load example").click()
    expect(page.locator("#example-note")).to_be_visible()
    expect(page.locator("#example-note")).to_contain_text("not a real patient")
    expect(page.locator("#patient_id")).to_have_value("EXAMPLE")
    page.get_by_role("button", name="New patient").click()
    expect(page.locator("#example-note")).to_be_hidden()
    expect(page.locator("#weight")).to_have_value("")

    # 2. A shipped product, by its display name; an unverified one asks for an
    #    acknowledgement, a verified one does not.
    page.locator("#product").select_option(
        label="Advate (octocog alfa) — Björkman 2012"
    )
    expect(page.locator("#unverified-box")).to_be_visible()
    page.locator("#product").select_option("kovaltry")
    expect(page.locator("#unverified-box")).to_be_hidden()
    expect(page.locator("#product-info")).to_contain_text("aged")
    expect(page.locator("#product-choose")).to_contain_text("When to choose it")

    # 3. A new patient, calculated.
    _enter_patient(page, 2024, "55")
    calculate = page.get_by_role("button", name="Calculate")
    with page.expect_request("**/api/dose?method=map") as sent:
        calculate.click()
    body = sent.value.post_data_json
    assert body["weight_lb"] == 55 and "weight_kg" not in body
    assert body["infusions"][0]["datetime"] == "01/03/2024 08:00"
    assert body["levels"][2] == {
        "datetime": "03/03/2024 08:00",
        "value": 2.5,
        "unit": "IU/dL",
    }
    expect(page.locator("#regimens tbody tr").first).to_be_visible()
    expect(page.locator("#summary")).to_contain_text("Effective half-life")
    expect(page.locator(".field-error")).to_have_count(0)

    # 4. Another target and schedule; a chosen regimen evaluated.
    page.locator("#targets").fill("3")
    page.locator("#schedules").fill("Mon/Wed/Fri\nevery 3 days")
    row = page.locator("#evaluate tbody tr").nth(0)
    row.locator('[data-key="schedule"]').fill("Mon/Wed/Fri")
    row.locator('[data-key="dose"]').fill("1000")
    with page.expect_request("**/api/dose?method=map") as sent:
        calculate.click()
    assert sent.value.post_data_json["options"] == {
        "targets_IU_dL": [3],
        "schedules": ["Mon/Wed/Fri", "every 3 days"],
        "evaluate": [{"schedule": "Mon/Wed/Fri", "dose_IU": 1000}],
    }
    expect(page.locator("#evaluated tbody tr")).to_have_count(1)
    expect(page.locator("#evaluated tbody tr").first).to_contain_text("Mon/Wed/Fri")
    expect(page.locator("#evaluated tbody tr").first).to_contain_text("1,000 IU")
    expect(page.locator("#regimens tbody")).to_contain_text("Mon/Wed/Fri")
    expect(page.locator("#regimens tbody tr")).to_have_count(2)

    # 5. Saved; the history lists it.
    page.get_by_role("button", name="Save assessment").click()
    expect(page.locator("#save-status")).to_contain_text("Saved assessment")
    expect(page.locator("#history-table tbody tr")).to_have_count(1)
    expect(page.locator("#history-table tbody tr").first).to_contain_text(
        "2024-03-03 08:00"
    )

    # 6. Next year: the same patient re-assessed; the previous one beside it.
    page.get_by_role("button", name="New patient").click()
    page.locator("#product").select_option("kovaltry")
    _enter_patient(page, 2025, "62")
    calculate.click()
    expect(page.locator("#comparison-box")).to_be_visible()
    expect(page.locator("#comparison tbody tr")).to_have_count(2)
    page.get_by_role("button", name="Save assessment").click()
    expect(page.locator("#save-status")).to_contain_text("Saved assessment")
    rows = page.locator("#history-table tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("2024-03-03 08:00")
    expect(rows.nth(1)).to_contain_text("2025-03-03 08:00")
    expect(page.locator("#patient-list option[value=HB-7]")).to_have_count(1)

    # 7. Reopen last year's assessment: its request and its result come back.
    rows.nth(0).get_by_role("button", name="Reopen").click()
    expect(page.locator("#status")).to_contain_text("Reopened assessment")
    expect(page.locator('[data-field="infusions[0].time_h"]')).to_have_value(
        "01/03/2024 08:00"
    )
    expect(page.locator("#weight")).to_have_value("55")
    expect(page.locator("#weight-unit")).to_have_value("lb")
    expect(page.locator("#evaluated tbody tr")).to_have_count(1)
    with page.expect_download() as report:
        page.get_by_role("link", name="Download report").click()
    assert "<html" in Path(report.value.path()).read_text().lower()
    assert errors == []
    context.close()


def test_page_shows_errors_by_field(browser, live_server):
    """Bad input: each error right after its own input (the weight in lb too),
    nothing calculated; an error without an input goes on top."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(f"{live_server}/")
    expect(page.locator("#product option[value=kovaltry]")).to_have_count(1)
    page.get_by_role("button", name="Load example").click()
    page.locator("#weight-unit").select_option("lb")
    weight = page.locator("#weight")
    weight.fill("-5")
    level = page.locator('[data-field="levels[1].value"]')
    level.fill("ten")
    page.locator("#schedules").fill("every 48 h\nfortnightly-ish")
    page.get_by_role("button", name="Calculate").click()
    weight_error = weight.locator("xpath=following-sibling::*[1]")
    expect(weight_error).to_have_class(re.compile(r"\bfield-error\b"))
    expect(weight_error).to_contain_text("-5")
    expect(weight).to_have_attribute("aria-invalid", "true")
    expect(level.locator("xpath=following-sibling::*[1]")).to_contain_text("ten")
    expect(page.locator("#results")).to_be_hidden()
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
        1, timeout=WAIT_MS
    )
    calculate = page.get_by_role("button", name="Calculate")
    general = page.locator("#general-errors")
    for status, field, message in [
        (413, "", "the request body is larger than the 64 KB"),
        (415, "Content-Type", "expected application/json"),
        (503, "", "the server is busy with 2 other calculation(s)"),
        (503, "patient_id", "a field-level refusal"),
    ]:
        reply = {
            "status": status,
            "headers": {"Retry-After": "10"},
            "json": {"errors": [{"field": field, "message": message}]},
        }
        page.unroute("**/api/dose*")
        page.route("**/api/dose*", functools.partial(_fulfil, reply=reply))
        calculate.click()
        if field == "patient_id":
            shown = page.locator("#patient_id").locator("xpath=following-sibling::*[1]")
            expect(shown).to_have_class(re.compile(r"\bfield-error\b"))
            expect(shown).to_contain_text(message)
        else:
            expect(general).to_be_visible()
            expect(general).to_contain_text(message)
            expect(general).not_to_contain_text('{"errors"')
            expect(general).not_to_contain_text(f"HTTP {status}")
    expect(page.locator("#patient_id")).to_have_attribute("maxlength", "64")
    context.close()
