"""``phems serve``: the dosing tool as a local web page (FastAPI).

A clinician fills in one patient's infusions and measured factor levels, presses
*Calculate* and gets the individual PK estimates, the predicted activity curve, the
regimen table and a self-contained report, all computed by
:func:`phems_clinical.app.dose.run_dose`. The page is plain HTML, CSS and JavaScript
shipped as package data (``phems_clinical/app/static``); it loads nothing from
outside the server, so the tool also runs on a hospital machine with no internet.

Endpoints
---------
``GET /``
    The page.
``GET /static/{file}``
    The page's script and style sheet.
``GET /api/products``
    The product library for the drop-down: ``[{"name", "product", "factor",
    "half_life_class", "citation", "validated_range"}, ...]``.
``POST /api/dose[?method=map|nuts]``
    Body: a dosing request (JSON, the format of ``data_schemas/dosing_request``),
    sent as ``Content-Type: application/json``.
    200: ``{"result": <result.json>, "curve_png_base64": str, "report_id": str}``
    (as in ``result.json``, an infinite number, e.g. a threshold never reached, is
    the string ``"inf"`` and NaN is ``null``: JSON has neither);
    422: ``{"errors": [{"field", "message"}, ...]}`` for every problem in the input
    (``field`` is the dotted path into the request, ``""`` for the whole body);
    413 (body over ``max_body_bytes``), 415 (not ``application/json``) and 503
    (all ``max_concurrent`` calculation slots busy, with ``Retry-After``; or the
    calculation ran past ``time_limit_s``) answer in the same ``{"errors": ...}``
    form, so the page shows them like any other error;
    500: a plain-text message (the traceback goes to the server log only).
``GET /api/report/{report_id}``
    ``report.html`` of a recent calculation, as a download. The last
    ``REPORTS_KEPT`` reports are kept in memory (nothing is written to disk).

Patient history (``phems serve --db clinic.db``; see
:mod:`phems_clinical.dosing.history`)
    With a history file, ``/api/dose`` also answers ``"previous"`` (the
    patient's latest earlier assessment: ``{"assessment_id", "assessed_at",
    "result"}`` or ``null``) and ``"assessed_at"``, and the report shows the
    previous assessment beside the new one.

``GET /api/patients``
    ``{"enabled": bool, "patients": [{"patient_id", "n_assessments",
    "first_assessed", "last_assessed"}, ...]}`` (``enabled`` false without
    ``--db``).
``GET /api/patients/{patient_id}``
    The patient's history: ``{"patient_id", "table": {"columns", "rows"},
    "assessments": [{"assessment_id", "assessed_at", "product_display"}, ...]}``
    (all text from each result's ``display``); 404 for an unknown patient.
``POST /api/assessments``
    Body ``{"report_id": str}`` (JSON): saves the calculation behind that
    report, exactly as the server computed it (the page cannot send a result);
    201 ``{"assessment_id", "patient_id", "assessed_at"}``. Saving the same
    calculation twice gives the same id. 409 without ``--db``, 404 for a
    calculation no longer kept, 422 on ``patient_id`` when the request had none.
``GET /api/assessments/{assessment_id}``
    Reopen: ``{"assessment_id", "patient_id", "assessed_at", "request",
    "result", "previous", "curve_png_base64", "report_id"}`` (curve and report
    redrawn from the stored result).

Limits
------
Every request must name an allowed host (Starlette's ``TrustedHostMiddleware``;
``localhost``, ``127.0.0.1``, the address :func:`serve` binds and its
``allowed_hosts``; 400 otherwise), which stops DNS-rebinding pages from reaching
a local server. Requiring ``application/json`` stops cross-origin pages from
posting: a browser sends only ``text/plain``, form or multipart bodies across
origins without a CORS preflight, which this server never grants. The body cap
keeps a request to what a dosing request needs; the JSON inside is further
limited by :func:`~phems_clinical.data.dosing_request.parse_request` (text
lengths, nesting, list sizes). A calculation still running when its request
times out keeps its slot until it ends, so ``max_concurrent`` bounds the work.

.. warning::
   The server has no authentication. :func:`serve` binds to ``127.0.0.1`` by
   default and logs a warning when bound beyond loopback; bind to another address
   only behind the hospital's access control. Requests naming a model *file*
   (``"model"``) are refused: a path on the server is not something a web page
   should choose.

Examples
--------
>>> app = create_app()
>>> paths = sorted(r.path for r in app.routes if r.path.startswith("/api"))
>>> paths[:3]
['/api/assessments', '/api/assessments/{assessment_id}', '/api/dose']
>>> paths[3:5]
['/api/patients', '/api/patients/{patient_id}']
>>> paths[5:]
['/api/products', '/api/report/{report_id}']
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_CONCURRENT",
    "REPORTS_KEPT",
    "TIME_LIMIT_S",
    "create_app",
    "serve",
    "trusted_hosts",
]

REPORTS_KEPT = 50
METHODS = ("map", "nuts")
MAX_BODY_BYTES = 64 * 1024  # a full request (400 infusions) is under 40 KB
MAX_CONCURRENT = 2  # calculations at once; each uses the CPU fully
TIME_LIMIT_S = 120.0  # per calculation (NUTS takes 20-60 s, MAP a few)
RETRY_AFTER_S = 10
LOCAL_HOSTS = ("localhost", "127.0.0.1")

_STATIC = Path(__file__).resolve().parent / "static"
# The page may load only what this server sends; curve images are data: URLs and
# the result.json download is a blob: URL.
_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
    "style-src 'self'; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# The report is self-contained: inline CSS and data: images, nothing else.
_REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

logger = logging.getLogger(__name__)


class _ReportStore:
    """The last ``size`` reports, keyed by an unguessable id (thread-safe LRU),
    each with what it was computed from (``payload``: request, result, date),
    so that a calculation can be saved to the patient history as computed."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str, tuple[str, dict | None]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, html: str, payload: dict | None = None) -> str:
        report_id = secrets.token_urlsafe(16)
        with self._lock:
            self._items[report_id] = (html, payload)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return report_id

    def _entry(self, report_id: str) -> tuple[str, dict | None] | None:
        with self._lock:
            item = self._items.get(report_id)
            if item is not None:
                self._items.move_to_end(report_id)
            return item

    def get(self, report_id: str) -> str | None:
        item = self._entry(report_id)
        return None if item is None else item[0]

    def payload(self, report_id: str) -> dict | None:
        item = self._entry(report_id)
        return None if item is None else item[1]


def _product_list() -> list[dict[str, Any]]:
    """The library for the page's product list: display name (brand, INN,
    model), factor, population and ages, assay, when to choose it, and the
    model sections not verified against their publication."""
    from phems_clinical.pk import library
    from phems_clinical.pk.dosing import validated_range

    out = []
    for name in library.list_products():
        model = library.load_product(name)
        meta = model.metadata
        info = library.product_info(name)
        out.append(
            {
                "name": name,
                "product": info.brand,
                "display": info.display,
                "inn": info.inn,
                "factor": info.factor,
                "half_life_class": info.half_life_class,
                "population": info.population,
                "ages": info.ages,
                "assay": info.assay,
                "choose_when": info.choose_when,
                "unverified": list(info.unverified),
                "citation": meta.get("citation"),
                "validated_range": {
                    k: list(v) for k, v in validated_range(model).items()
                },
            }
        )
    return out


def previous_kw(run, previous) -> dict:
    from phems_clinical.app.cli import previous_kw

    return previous_kw(run, previous)


def _previous_for(store, req) -> tuple[str | None, Any]:
    """(date of this assessment, the patient's previous one) with a history
    file and a patient id; (None, None) otherwise."""
    if store is None or not (req.patient_id or "").strip():
        return None, None
    from phems_clinical.dosing import history

    when = history.assessment_time(req.time_origin, [lv.time_h for lv in req.levels])
    return when, history.previous_assessment(store, req.patient_id.strip(), before=when)


def _previous_json(previous) -> dict | None:
    if previous is None:
        return None
    return {
        "assessment_id": previous.summary.assessment_id,
        "assessed_at": previous.summary.assessed_at,
        "product_display": previous.summary.product_display,
        "result": previous.result,
    }


def _errors(
    errors: list[tuple[str, str]],
    status: int = 422,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        headers=headers,
        content={"errors": [{"field": f, "message": m} for f, m in errors]},
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any interface


def trusted_hosts(
    allowed_hosts: Iterable[str] | None = (), host: str | None = None
) -> list[str]:
    """The Host header values the app answers: ``localhost``, ``127.0.0.1``, the
    bound ``host`` (unless a wildcard address) and ``allowed_hosts``.

    Raises ``ValueError`` naming ``--allowed-host`` for an entry that is empty,
    holds a port, path or space, or is ``*`` (which would answer any host).
    ``*.example.org`` is allowed (the domain's subdomains). IPv6 literals cannot
    be matched (Starlette compares the Host header up to its first colon): reach
    an IPv6-bound server by name.
    """
    extra = list(allowed_hosts or ())
    for h in extra:
        bad = (
            not isinstance(h, str)
            or not h
            or any(c in h for c in " /:@\\")
            or "*" in h[1:]
            or (h.startswith("*") and not h.startswith("*."))
        )
        if bad:
            raise ValueError(
                f"--allowed-host: {h!r:.80} is not a host name (expected a name or "
                "address without port, e.g. dosing.hospital.org, or *.hospital.org "
                "for its subdomains; '*' alone would answer any host)"
            )
    out = list(LOCAL_HOSTS)
    if host and host != "0.0.0.0" and ":" not in host:  # not a wildcard or IPv6
        out.append(host)
    return list(dict.fromkeys(out + extra))


def create_app(
    *,
    allowed_hosts: Iterable[str] | None = (),
    max_body_bytes: int = MAX_BODY_BYTES,
    max_concurrent: int = MAX_CONCURRENT,
    time_limit_s: float = TIME_LIMIT_S,
    db: str | os.PathLike | None = None,
) -> FastAPI:
    """Build the dosing web app (enables JAX float64, which the PK estimation needs).

    Parameters
    ----------
    allowed_hosts
        Host names (or addresses) the app answers besides ``localhost`` and
        ``127.0.0.1`` (see :func:`trusted_hosts`); others get 400.
    max_body_bytes
        Largest request body, bytes (413 beyond).
    max_concurrent
        Calculations running at once (503 with ``Retry-After`` beyond).
    time_limit_s
        Longest a client waits for one calculation, s (503 beyond).
    db
        The clinic's patient-history file (created if absent): enables saving,
        listing and reopening assessments. It holds patient data and stays on
        this machine.

    Returns
    -------
    FastAPI
        The application; run it with :func:`serve` or any ASGI server.
    """
    from phems_clinical.runtime import configure_jax

    configure_jax()
    hosts = trusted_hosts(allowed_hosts)
    store = None
    if db is not None:
        from phems_clinical.dosing.history import open_store

        store = open_store(db)
    slots = threading.BoundedSemaphore(max_concurrent)
    cap_kb = f"{max_body_bytes / 1024:g} KB"

    app = FastAPI(
        title="phems_clinical dosing tool",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    # added first, so it runs inside _headers: refusals carry the headers too
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    reports = _ReportStore(REPORTS_KEPT)
    save_lock = threading.Lock()
    products: list[dict[str, Any]] = []
    products_lock = threading.Lock()

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", _CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        # Patient data: never cache responses.
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(_STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=_STATIC), name="static")

    @app.get("/api/products")
    def api_products() -> list[dict[str, Any]]:
        with products_lock:
            if not products:
                products.extend(_product_list())
        return products

    def too_large() -> JSONResponse:
        return _errors(
            [
                (
                    "",
                    f"the request body is larger than the {cap_kb} "
                    f"({max_body_bytes} bytes) a dosing request may be; "
                    "is a text field such as patient_id too long?",
                )
            ],
            413,
        )

    async def read_body(request: Request) -> bytes | None:
        """The body, or None once it passes the cap (read no further)."""
        length = request.headers.get("content-length", "")
        if length.strip().isdigit() and int(length) > max_body_bytes:
            return None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                return None
        return bytes(body)

    @app.post("/api/dose")
    async def api_dose(request: Request, method: str = "map") -> Response:
        from phems_clinical.app import dose
        from phems_clinical.data.dosing_request import (
            RequestError,
            load_json,
            parse_request,
        )

        if method not in METHODS:
            return _errors(
                [("method", f"expected 'map' or 'nuts', got {method!r:.40}")]
            )
        media = request.headers.get("content-type", "").split(";")[0].strip()
        if media.lower() != "application/json":
            return _errors(
                [
                    (
                        "Content-Type",
                        (
                            f"expected application/json, got {media!r:.60}: send the dosing "
                            "request as JSON"
                        ),
                    )
                ],
                415,
            )
        body = await read_body(request)
        if body is None:
            return too_large()
        try:
            obj = load_json(body)
            if isinstance(obj, dict) and "model" in obj:
                return _errors(
                    [
                        (
                            "model",
                            "model files cannot be used from the web "
                            "page; choose a library product",
                        )
                    ]
                )
            req = parse_request(obj)  # input errors are answered even when busy
        except RequestError as err:
            return _errors([(e.field, e.message) for e in err.errors])
        when, previous = _previous_for(store, req)
        if not slots.acquire(blocking=False):
            return busy()

        def work():
            try:
                return dose.run_dose(
                    req, method=method, **previous_kw(dose.run_dose, previous)
                )
            finally:
                slots.release()

        try:
            # run_dose is CPU-bound and blocking: keep it off the event loop. On
            # the time limit the client is answered; the thread finishes (it
            # cannot be stopped) and frees its slot then.
            with anyio.fail_after(time_limit_s):
                out = await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        except TimeoutError:
            return _errors(
                [
                    (
                        "method" if method == "nuts" else "",
                        (
                            f"the calculation took longer than the server's limit of "
                            f"{time_limit_s:g} s and was abandoned"
                            + (
                                "; try method map"
                                if method == "nuts"
                                else "; try again later"
                            )
                        ),
                    )
                ],
                503,
            )
        except RequestError as err:
            return _errors([(e.field, e.message) for e in err.errors])
        except Exception:
            ref = secrets.token_hex(4)
            logger.exception("dose calculation failed (reference %s)", ref)
            return PlainTextResponse(
                f"The calculation failed because of an internal error (reference "
                f"{ref}); the details are in the server log.",
                status_code=500,
            )
        return JSONResponse(
            {
                "result": out.result,  # JSON-safe by construction (run_dose)
                "curve_png_base64": base64.b64encode(out.curve_png).decode("ascii"),
                "report_id": reports.add(
                    out.report_html,
                    {"request": obj, "result": out.result, "when": when},
                ),
                "history_enabled": store is not None,
                "assessed_at": when,
                "previous": _previous_json(previous),
            }
        )

    def busy() -> JSONResponse:
        return _errors(
            [
                (
                    "",
                    (
                        f"the server is busy with {max_concurrent} other calculation(s); "
                        f"try again in {RETRY_AFTER_S} s"
                    ),
                )
            ],
            503,
            {"Retry-After": str(RETRY_AFTER_S)},
        )

    def no_history() -> JSONResponse:
        return _errors(
            [
                (
                    "",
                    (
                        "this server keeps no patient history: start it with "
                        "'phems serve --db FILE' (the clinic's history file)"
                    ),
                )
            ],
            409,
        )

    @app.get("/api/patients")
    def api_patients() -> Response:
        from phems_clinical.dosing.history import list_patients

        if store is None:
            return JSONResponse({"enabled": False, "patients": []})
        return JSONResponse(
            {"enabled": True, "patients": [p._asdict() for p in list_patients(store)]}
        )

    @app.get("/api/patients/{patient_id}")
    def api_patient(patient_id: str) -> Response:
        from phems_clinical.data.dosing_request import RequestError
        from phems_clinical.dosing import history

        if store is None:
            return no_history()
        try:
            table = history.history_table(store, patient_id)
            rows = history.history(store, patient_id)
        except RequestError as err:
            return _errors([(e.field, e.message) for e in err.errors], 404)
        return JSONResponse(
            {
                "patient_id": patient_id,
                "table": {"columns": table["columns"], "rows": table["rows"]},
                "assessments": [
                    {
                        "assessment_id": r.assessment_id,
                        "assessed_at": r.assessed_at,
                        "product_display": r.product_display,
                    }
                    for r in rows
                ],
            }
        )

    @app.post("/api/assessments")
    async def api_save(request: Request) -> Response:
        from phems_clinical.data.dosing_request import RequestError, load_json
        from phems_clinical.dosing.history import save_assessment

        if store is None:
            return no_history()
        media = request.headers.get("content-type", "").split(";")[0].strip()
        if media.lower() != "application/json":
            return _errors(
                [("Content-Type", (f"expected application/json, got {media!r:.60}"))],
                415,
            )
        body = await read_body(request)
        if body is None:
            return too_large()
        try:
            obj = load_json(body)
        except RequestError as err:
            return _errors([(e.field, e.message) for e in err.errors])
        report_id = obj.get("report_id") if isinstance(obj, dict) else None
        if not isinstance(report_id, str) or not report_id:
            return _errors(
                [("report_id", "expected the report_id of a calculation (text)")]
            )
        payload = reports.payload(report_id)
        if payload is None:
            return _errors(
                [
                    (
                        "report_id",
                        (
                            f"no such calculation: only the last {REPORTS_KEPT} are kept, "
                            "until the server stops; calculate again, then save"
                        ),
                    )
                ],
                404,
            )

        def save():
            with save_lock:
                if "assessment_id" not in payload:
                    payload["assessment_id"] = save_assessment(
                        store,
                        payload["request"],
                        payload["result"],
                        when=payload["when"],
                    )
                return payload["assessment_id"]

        try:
            aid = await anyio.to_thread.run_sync(save)
        except RequestError as err:
            return _errors([(e.field, e.message) for e in err.errors])
        return JSONResponse(
            status_code=201,
            content={
                "assessment_id": aid,
                "patient_id": payload["result"]["patient_id"],
                "assessed_at": payload["when"],
            },
        )

    @app.get("/api/assessments/{assessment_id}")
    async def api_assessment(assessment_id: str) -> Response:
        from phems_clinical.app.dose import redraw_dose
        from phems_clinical.data.dosing_request import RequestError
        from phems_clinical.dosing import history

        if store is None:
            return no_history()
        if not assessment_id.isdigit() or len(assessment_id) > 18:
            return _errors(
                [
                    (
                        "assessment_id",
                        f"expected a whole number, got {assessment_id!r:.40}",
                    )
                ]
            )
        try:
            s = history.assessment_summary(store, int(assessment_id))
            req, result = history.load_assessment(store, s.assessment_id)
        except RequestError as err:
            return _errors([(e.field, e.message) for e in err.errors], 404)
        previous = history.previous_assessment(
            store, s.patient_id, before=s.assessed_at, exclude_id=s.assessment_id
        )
        if not slots.acquire(blocking=False):
            return busy()

        def work():
            try:
                return redraw_dose(
                    result, previous_kw(redraw_dose, previous).get("previous")
                )
            finally:
                slots.release()

        out = await anyio.to_thread.run_sync(work)
        return JSONResponse(
            {
                "assessment_id": s.assessment_id,
                "patient_id": s.patient_id,
                "assessed_at": s.assessed_at,
                "request": req,
                "result": result,
                "previous": _previous_json(previous),
                "curve_png_base64": base64.b64encode(out.curve_png).decode("ascii"),
                "report_id": reports.add(
                    out.report_html,
                    {
                        "request": req,
                        "result": result,
                        "when": s.assessed_at,
                        "assessment_id": s.assessment_id,
                    },
                ),
            }
        )

    @app.get("/api/report/{report_id}")
    def api_report(report_id: str) -> Response:
        html = reports.get(report_id)
        if html is None:
            return PlainTextResponse(
                f"No such report. Only the last {REPORTS_KEPT} reports are kept, "
                f"in memory, until the server stops: calculate again.",
                status_code=404,
            )
        return Response(
            html,
            media_type="text/html; charset=utf-8",
            headers={
                "Content-Disposition": 'attachment; filename="report.html"',
                "Content-Security-Policy": _REPORT_CSP,
            },
        )

    return app


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    allowed_hosts: Iterable[str] | None = (),
    db: str | os.PathLike | None = None,
) -> None:
    """Run the dosing web app with uvicorn until interrupted (Ctrl+C).

    Parameters
    ----------
    host
        Address to bind; the default serves this machine only. Any other
        address logs a warning (the server has no authentication).
    port
        TCP port; the page is then at ``http://{host}:{port}/``.
    allowed_hosts
        Further names the page may be reached by (``phems serve
        --allowed-host``), e.g. the machine's DNS name when bound to 0.0.0.0.
    db
        The clinic's patient-history file (``phems serve --db``), see
        :func:`create_app`.
    """
    import uvicorn

    hosts = trusted_hosts(allowed_hosts, host)
    if not _is_loopback(host):
        logger.warning(
            "serving the dosing tool on %s, beyond this machine: it has no "
            "authentication, so run it only behind the hospital's access control. "
            "It answers requests for the hosts %s (add names with "
            "--allowed-host).",
            host,
            ", ".join(hosts),
        )
    app = create_app(allowed_hosts=[h for h in hosts if h not in LOCAL_HOSTS], db=db)
    uvicorn.run(app, host=host, port=port, ws="none", lifespan="off")
