"""Limits of the dosing web API and its error contract under
any input (item 9): trusted hosts, JSON content type, body cap, bounded
concurrent calculations, a per-request time limit, a warning when bound beyond
loopback; whatever the body, a 4xx naming fields or a 200 with finite numbers,
never a 500."""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from phems_clinical.app import dose, web
from phems_clinical.app.web import create_app, trusted_hosts

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
JSON_TYPE = {"Content-Type": "application/json"}


def _client(app=None, host="localhost"):
    from fastapi.testclient import TestClient

    return TestClient(
        app or create_app(), base_url=f"http://{host}", raise_server_exceptions=False
    )


@pytest.fixture(scope="module")
def client():
    with _client() as c:
        yield c


def _post(client, body, headers=JSON_TYPE, **kwargs):
    content = body if isinstance(body, bytes | str | Iterator) else json.dumps(body)
    return client.post("/api/dose", content=content, headers=headers, **kwargs)


def _errors(resp, status):
    assert resp.status_code == status, resp.text
    errors = resp.json()["errors"]
    assert errors and all(
        set(e) == {"field", "message"} and e["message"] for e in errors
    )
    return {e["field"]: e["message"] for e in errors}


# ------------------------------------------------------------------------ hosts


def test_untrusted_host_is_refused(client):
    assert client.get("/", headers={"Host": "evil.example"}).status_code == 400
    resp = _post(client, REQUEST, headers={**JSON_TYPE, "Host": "evil.example"})
    assert resp.status_code == 400 and "host" in resp.text.lower()
    assert resp.headers["cache-control"] == "no-store"  # security headers too
    for host in ("localhost", "127.0.0.1", "localhost:8000"):
        assert client.get("/", headers={"Host": host}).status_code == 200


def test_allowed_hosts_extend_the_local_ones():
    with _client(
        create_app(allowed_hosts=["dosing.hospital.org"]), host="dosing.hospital.org"
    ) as c:
        assert c.get("/").status_code == 200
        assert c.get("/", headers={"Host": "other.org"}).status_code == 400
    assert trusted_hosts(["a.org"], "10.0.0.5") == [
        "localhost",
        "127.0.0.1",
        "10.0.0.5",
        "a.org",
    ]
    assert trusted_hosts(None, "0.0.0.0") == ["localhost", "127.0.0.1"]
    assert "*.hospital.org" in trusted_hosts(["*.hospital.org"])


@pytest.mark.parametrize("bad", ["*", "", "a.org:8000", "http://a.org", "a*.org"])
def test_allowed_host_that_is_no_host_name(bad):
    with pytest.raises(ValueError, match="--allowed-host"):
        create_app(allowed_hosts=[bad])


# -------------------------------------------------------- content type and size


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; b=x",
        None,
    ],
)
def test_json_content_type_is_required(client, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    errors = _errors(_post(client, REQUEST, headers=headers), 415)
    assert "application/json" in errors["Content-Type"]


def test_json_with_charset_is_json(client):
    resp = _post(
        client,
        {**REQUEST, "weight_kg": -1},
        headers={"Content-Type": "Application/JSON; charset=utf-8"},
    )
    assert "weight_kg" in _errors(resp, 422)


def test_body_cap(client):
    start = time.perf_counter()
    big = {**REQUEST, "patient_id": "x" * 200_000}
    assert "larger than the 64 KB" in _errors(_post(client, big), 413)[""]
    # without a Content-Length (chunked), the cap holds while reading
    chunks = (b"{" + b" " * 10_000 for _ in range(20))
    assert _errors(_post(client, chunks), 413)
    assert time.perf_counter() - start < 5.0


def test_long_text_under_the_cap_is_refused_by_the_schema_quickly(client):
    start = time.perf_counter()
    errors = _errors(_post(client, {**REQUEST, "patient_id": "x" * 60_000}), 422)
    assert time.perf_counter() - start < 2.0
    assert "60000 characters" in errors["patient_id"]


def test_duplicate_keys_and_non_finite_numbers(client):
    text = json.dumps(REQUEST)[:-1] + ', "weight_kg": 2500}'
    assert "duplicate" in _errors(_post(client, text), 422)["weight_kg"]
    text = json.dumps(REQUEST).replace('"weight_kg": 25', '"weight_kg": NaN')
    assert "finite" in _errors(_post(client, text), 422)["weight_kg"]
    assert _errors(_post(client, "[" * 10_000), 422)


# ------------------------------------------------------- concurrency and time


def test_busy_server_answers_503_with_retry_after(monkeypatch):
    started, release = threading.Event(), threading.Event()

    def slow(*args, **kwargs):
        started.set()
        release.wait(10)
        raise dose.RequestError([dose.FieldError("levels", "stub refusal")])

    monkeypatch.setattr(dose, "run_dose", slow)
    with _client(create_app(max_concurrent=1)) as c:
        first = {}
        t = threading.Thread(target=lambda: first.update(r=_post(c, REQUEST)))
        t.start()
        assert started.wait(10)
        busy = _post(c, REQUEST)
        invalid = _post(c, {**REQUEST, "weight_kg": -1})
        release.set()
        t.join(10)
    assert "busy" in _errors(busy, 503)[""]
    assert "weight_kg" in _errors(invalid, 422)  # input errors need no slot
    assert busy.headers["retry-after"] == str(web.RETRY_AFTER_S)
    assert _errors(first["r"], 422) == {"levels": "stub refusal"}


def test_time_limit_answers_503_and_keeps_the_slot(monkeypatch):
    release = threading.Event()

    def hang(*args, **kwargs):
        release.wait(10)
        raise dose.RequestError([dose.FieldError("", "late")])

    monkeypatch.setattr(dose, "run_dose", hang)
    with _client(create_app(time_limit_s=0.3, max_concurrent=1)) as c:
        late = _post(c, REQUEST, params={"method": "nuts"})
        still_busy = _post(c, REQUEST)
        release.set()
    assert "longer than the server's limit of 0.3 s" in _errors(late, 503)["method"]
    assert "busy" in _errors(still_busy, 503)[""]


# ------------------------------------------------------------------------ serve


@pytest.mark.parametrize(
    ("host", "warns"),
    [
        ("127.0.0.1", False),
        ("localhost", False),
        ("::1", False),
        ("0.0.0.0", True),
        ("10.1.2.3", True),
        ("dosing.hospital.org", True),
    ],
)
def test_serve_warns_beyond_loopback(monkeypatch, caplog, host, warns):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    with caplog.at_level(logging.WARNING, logger=web.__name__):
        web.serve(host=host, port=8123, allowed_hosts=["pc42.hospital.org"])
    assert seen["host"] == host and seen["port"] == 8123
    warned = [r for r in caplog.records if "no authentication" in r.getMessage()]
    assert bool(warned) == warns
    with _client(seen["app"], host="pc42.hospital.org") as c:
        assert c.get("/").status_code == 200


# --------------------------------------------------------- property-based tests

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from([1e300, -1e300, 10**30, "\ud800", "x" * 3000])
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)


def _no_nan(text: str):
    def refuse(token):
        raise AssertionError(f"{token} in a reply")

    return json.loads(text, parse_constant=refuse)


def _contract(resp, keys):
    assert resp.status_code != 500, resp.text
    if resp.status_code == 200:
        event("status 200")
        body = _no_nan(resp.text)
        assert body["result"]["half_life_h"]["median"] > 0
        return True
    assert resp.status_code in (413, 415, 422), resp.text
    event(f"status {resp.status_code}")
    for e in _no_nan(resp.text)["errors"]:
        f = e["field"]
        assert e["message"] and (
            f in ("", "Content-Type")
            or any(f == k or f.startswith((f"{k}.", f"{k}[")) for k in keys)
        ), e
    return False


@given(body=JSON, as_text=st.booleans())
def test_any_body_is_refused_by_field_never_500(client, body, as_text):
    from phems_clinical.data.dosing_request import load_request_schema

    keys = set(body) if isinstance(body, dict) else set()
    keys |= set(load_request_schema()["properties"])
    try:
        content = json.dumps(body) if as_text else json.dumps(body).encode()
    except (ValueError, UnicodeEncodeError):
        return
    _contract(_post(client, content), keys)


@given(st.binary(max_size=200))
def test_any_bytes_are_refused_never_500(client, raw):
    _contract(_post(client, raw), set())


ODD = st.sampled_from(
    [
        0,
        -1,
        0.001,
        1e-300,
        1e300,
        math.nan,
        math.inf,
        10**30,
        "",
        "40",
        None,
        True,
        [],
        {},
        "\ud800",
    ]
)


FIELDS = [
    ("weight_kg",),
    ("age_y",),
    ("levels", 0, "value"),
    ("levels", 2, "value"),
    ("levels", 1, "time_h"),
    ("infusions", 0, "dose_IU"),
    ("infusions", 0, "duration_h"),
    ("patient_id",),
]


@settings(max_examples=6)
@given(
    where=st.sampled_from(FIELDS),
    value=ODD | st.floats(0.01, 2000) | st.text(max_size=80),
)
@example(where=("weight_kg",), value=60.0)
@example(where=("levels", 2, "value"), value=0.2)
@example(where=("patient_id",), value="$\\frac{1}{0}$ " + "\u00e9" * 40)
def test_perturbed_requests_compute_or_name_the_field(client, where, value):
    """A few full calculations: each perturbed request gives finite numbers or
    a 422 naming fields (the examples compute; a $ in the id is no maths)."""
    req = copy.deepcopy(REQUEST)
    parent = req
    for key in where[:-1]:
        parent = parent[key]
    parent[where[-1]] = value
    _contract(_post(client, json.dumps(req)), set(REQUEST) | {"patient_id"})
