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
    Body: a dosing request (JSON, the format of ``data_schemas/dosing_request``).
    200: ``{"result": <result.json>, "curve_png_base64": str, "report_id": str}``
    (as in ``result.json``, an infinite number, e.g. a threshold never reached, is
    the string ``"inf"`` and NaN is ``null``: JSON has neither);
    422: ``{"errors": [{"field", "message"}, ...]}`` for every problem in the input
    (``field`` is the dotted path into the request, ``""`` for the whole body);
    500: a plain-text message (the traceback goes to the server log only).
``GET /api/report/{report_id}``
    ``report.html`` of a recent calculation, as a download. The last
    ``REPORTS_KEPT`` reports are kept in memory (nothing is written to disk).

.. warning::
   The server has no authentication. :func:`serve` binds to ``127.0.0.1`` by
   default; bind to another address only behind the hospital's access control.
   Requests naming a model *file* (``"model"``) are refused: a path on the server
   is not something a web page should choose.

Examples
--------
>>> app = create_app()
>>> sorted(r.path for r in app.routes if r.path.startswith("/api"))
['/api/dose', '/api/products', '/api/report/{report_id}']
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
)
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

__all__ = ["REPORTS_KEPT", "create_app", "serve"]

REPORTS_KEPT = 50
METHODS = ("map", "nuts")

_STATIC = Path(__file__).resolve().parent / "static"
# The page may load only what this server sends; curve images are data: URLs and
# the result.json download is a blob: URL.
_CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
        "style-src 'self'; connect-src 'self'; object-src 'none'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# The report is self-contained: inline CSS and data: images, nothing else.
_REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

logger = logging.getLogger(__name__)


class _ReportStore:
    """The last ``size`` reports, keyed by an unguessable id (thread-safe LRU)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, html: str) -> str:
        report_id = secrets.token_urlsafe(16)
        with self._lock:
            self._items[report_id] = html
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return report_id

    def get(self, report_id: str) -> str | None:
        with self._lock:
            html = self._items.get(report_id)
            if html is not None:
                self._items.move_to_end(report_id)
            return html


def _product_list() -> list[dict[str, Any]]:
    from phems_clinical.pk.dosing import validated_range
    from phems_clinical.pk.library import list_products, load_product

    out = []
    for name in list_products():
        model = load_product(name)
        meta = model.metadata
        out.append({
            "name": name,
            "product": meta.get("product", name),
            "factor": meta.get("factor"),
            "half_life_class": meta.get("half_life_class"),
            "citation": meta.get("citation"),
            "validated_range": {k: list(v) for k, v in validated_range(model).items()},
        })
    return out


def _errors(errors: list[tuple[str, str]]) -> JSONResponse:
    return JSONResponse(
        status_code=422,
        content={"errors": [{"field": f, "message": m} for f, m in errors]},
    )


def _model_file_refused(body: bytes) -> bool:
    """True when the body is a JSON object that names a model file."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(request, dict) and "model" in request


def create_app() -> FastAPI:
    """Build the dosing web app (enables JAX float64, which the PK estimation needs).

    Returns
    -------
    FastAPI
        The application; run it with :func:`serve` or any ASGI server.
    """
    from phems_clinical.runtime import configure_jax

    configure_jax()

    app = FastAPI(title="phems_clinical dosing tool", docs_url=None,
                  redoc_url=None, openapi_url=None)
    reports = _ReportStore(REPORTS_KEPT)
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

    @app.post("/api/dose")
    async def api_dose(request: Request, method: str = "map") -> Response:
        from phems_clinical.app import dose
        from phems_clinical.data.dosing_request import RequestError

        if method not in METHODS:
            return _errors([("method", f"expected 'map' or 'nuts', got {method!r}")])
        body = await request.body()
        if _model_file_refused(body):
            return _errors([("model", "model files cannot be used from the web "
                                      "page; choose a library product")])
        try:
            # run_dose is CPU-bound and blocking: keep it off the event loop.
            out = await run_in_threadpool(dose.run_dose, body, method=method)
        except RequestError as err:
            return _errors([(e.field, e.message) for e in err.errors])
        except Exception:
            ref = secrets.token_hex(4)
            logger.exception("dose calculation failed (reference %s)", ref)
            return PlainTextResponse(
                f"The calculation failed because of an internal error (reference "
                f"{ref}); the details are in the server log.", status_code=500)
        return JSONResponse({
            "result": out.result,  # JSON-safe by construction (run_dose)
            "curve_png_base64": base64.b64encode(out.curve_png).decode("ascii"),
            "report_id": reports.add(out.report_html),
        })

    @app.get("/api/report/{report_id}")
    def api_report(report_id: str) -> Response:
        html = reports.get(report_id)
        if html is None:
            return PlainTextResponse(
                f"No such report. Only the last {REPORTS_KEPT} reports are kept, "
                f"in memory, until the server stops: calculate again.",
                status_code=404)
        return Response(
            html, media_type="text/html; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="report.html"',
                     "Content-Security-Policy": _REPORT_CSP})

    return app


def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the dosing web app with uvicorn until interrupted (Ctrl+C).

    Parameters
    ----------
    host
        Address to bind; the default serves this machine only.
    port
        TCP port; the page is then at ``http://{host}:{port}/``.
    """
    import uvicorn

    uvicorn.run(create_app(), host=host, port=port, ws="none", lifespan="off")
