"""Individual PK report for the dosing tool: concentration-time figure and HTML page.

The input is the ``result`` dict of the dosing contract (``result.json``, see
``phems_clinical.app.dose``). Both outputs are self-contained: :func:`curve_figure`
returns PNG bytes and :func:`render_report` returns one HTML page with inline CSS and
the PNG inlined as a ``data:`` URI, so it can be printed or filed without a network.

The figure uses matplotlib's object API (``Figure`` with the Agg canvas) rather than
``pyplot``, so no global figure state is touched and rendering is safe from the web
app's worker threads.
"""

from __future__ import annotations

import base64
import io
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MultipleLocator
from matplotlib.transforms import blended_transform_factory

from phems_clinical.evaluation import numbers

__all__ = ["curve_figure", "render_report"]

BLQ_LABEL = "BLQ (< LLOQ)"


# Colours: one hue for the prediction, dark neutral for data (prints in greyscale).
_BLUE, _DATA, _GREY, _RED = "#1f5fa8", "#222222", "#6b6b6b", "#c0392b"


# --------------------------------------------------------------------------- figure
def _title(result: dict) -> str:
    model = result.get("model") or {}
    name = result.get("product") or model.get("name") or "Individual PK"
    if result.get("product") and model.get("name") and model["name"] != name:
        name = f"{name} ({model['name']})"
    pid = result.get("patient_id")
    return f"{name} \u2014 patient {pid}" if pid else name


def _time_label(result: dict) -> str:
    origin = result.get("time_origin")
    return f"Time since {origin} (h)" if origin else "Time since first infusion (h)"


def curve_figure(result: dict) -> bytes:
    """Predicted factor level over time with its credible bands, as PNG bytes.

    Draws the posterior median of ``result["curve"]`` with the 50% (p25-p75) and
    90% (p05-p95) credible bands on a log y axis, the measured levels (filled
    circles; BLQ samples as open downward triangles at the LLOQ), the infusions as
    carets on the time axis and the thresholds as labelled dashed lines.

    Parameters
    ----------
    result : dict
        A dosing result (dosing contract §3); uses ``curve``, ``levels``,
        ``infusions``, ``thresholds_IU_dL``, ``time_origin``, ``product``, ``model``
        and ``patient_id``.

    Returns
    -------
    bytes
        A PNG image, 8 x 4.5 in at 120 dpi (960 x 540 pixels).
    """
    curve = {k: np.asarray(v, dtype=float) for k, v in result["curve"].items()}
    t = curve["time_h"]
    thresholds = [float(x) for x in result.get("thresholds_IU_dL") or []]
    levels = result.get("levels") or []
    infusions = result.get("infusions") or []
    quant = [
        (lv["time_h"], v)
        for lv in levels
        if not lv.get("blq")
        and (v := numbers.value(lv.get("value_IU_dL"))) is not None
        and v > 0
    ]
    blq = [
        (
            lv["time_h"],
            numbers.value(lv.get("lloq_IU_dL")) or numbers.value(lv.get("value_IU_dL")),
        )
        for lv in levels
        if lv.get("blq")
    ]
    # Log axis floor: half the lowest threshold, lowered to show every measured level;
    # a BLQ sample without an LLOQ is drawn at that level, above the infusion carets.
    low = (
        0.5 * min(thresholds)
        if thresholds
        else 0.5 * float(np.min(curve["p05"][curve["p05"] > 0], initial=0.2))
    )
    blq = [(x, y or low) for x, y in blq]
    floor = min([low] + [0.7 * v for _, v in quant + blq])
    top = 1.6 * max([float(np.nanmax(curve["p95"])), 4 * floor] + [v for _, v in quant])

    fig = Figure(figsize=(8, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    clip = {k: np.clip(v, 0.5 * floor, None) for k, v in curve.items()}
    ax.fill_between(t, clip["p05"], clip["p95"], color=_BLUE, alpha=0.15, lw=0)
    ax.fill_between(t, clip["p25"], clip["p75"], color=_BLUE, alpha=0.30, lw=0)
    ax.plot(t, clip["p50"], color=_BLUE, lw=1.8)
    handles = [
        Line2D([], [], color=_BLUE, lw=1.8, label="Predicted median"),
        Patch(color=_BLUE, alpha=0.45, lw=0, label="50% credible band"),
        Patch(color=_BLUE, alpha=0.15, lw=0, label="90% credible band"),
    ]

    xdata_yaxes = blended_transform_factory(ax.transData, ax.transAxes)
    markers = (
        (
            "Measured level",
            quant,
            {"marker": "o", "ms": 6, "color": _DATA, "mec": "white", "mew": 0.8},
            {},
        ),
        (
            BLQ_LABEL,
            blq,
            {"marker": "v", "ms": 7, "mfc": "white", "mec": _DATA, "mew": 1.3},
            {},
        ),
        (
            "Infusion",
            [(i["time_h"], 0.0) for i in infusions],
            {"marker": 10, "ms": 9, "color": _RED},  # caret sitting on the time axis
            {"transform": xdata_yaxes, "clip_on": False},
        ),
    )
    for label, points, style, where in markers:
        if points:
            ax.plot(*zip(*points, strict=True), ls="none", zorder=5, **style, **where)
            handles.append(Line2D([], [], ls="none", label=label, **style))
    if len(infusions) <= 6:
        for inf in infusions:
            ax.annotate(
                numbers.dose(inf["dose_IU"]),
                (inf["time_h"], 0.0),
                xycoords=xdata_yaxes,
                xytext=(3, 6),
                textcoords="offset points",
                fontsize=7,
                color=_RED,
            )

    yaxes_xdata = blended_transform_factory(ax.transAxes, ax.transData)
    for thr in thresholds:
        ax.axhline(thr, color=_GREY, lw=0.9, ls="--", zorder=1)
        ax.text(
            0.008,
            thr,
            f"{numbers.label(thr)} IU/dL",
            transform=yaxes_xdata,
            ha="left",
            va="bottom",
            fontsize=7.5,
            color=_GREY,
        )

    ax.set_yscale("log")
    ax.set_ylim(floor, top)
    x0 = min([float(t.min())] + [i["time_h"] for i in infusions])
    # a small left margin keeps the first infusion caret clear of the y axis
    ax.set_xlim(x0 - 0.015 * (float(t.max()) - x0), float(t.max()))
    ax.yaxis.set_major_formatter(lambda y, _pos: numbers.label(y))
    span_d = (float(t.max()) - x0) / 24
    if span_d <= 14:  # ticks at whole days, the unit doses are timed in
        ax.xaxis.set_major_locator(MultipleLocator(24 if span_d <= 7 else 48))
    ax.set_xlabel(_time_label(result))
    ax.set_ylabel("Factor level (IU/dL)")
    ax.set_title(_title(result), loc="left", fontsize=11, fontweight="bold")
    ax.grid(True, which="major", color="#e4e4e4", lw=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        frameon=False,
        borderaxespad=0.0,
    )
    fig.tight_layout()

    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# --------------------------------------------------------------------------- report
@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    # PackageLoader reads through importlib, so the template ships in the wheel.
    return jinja2.Environment(
        loader=jinja2.PackageLoader("phems_clinical.evaluation", "templates"),
        autoescape=True,  # the name ends in .j2, so select_autoescape would miss it
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _versions(d: Any) -> list[tuple[str, str]]:
    """Package versions as ``(name, version)`` pairs."""
    return (
        [(str(k), str(v)) for k, v in (d or {}).items()] if isinstance(d, dict) else []
    )


def _generated(result: dict, generated: datetime | str | None) -> str:
    when = (
        generated
        if generated is not None
        else (result.get("generated") or result.get("assessed"))
    )
    if when is None:
        when = datetime.now().astimezone()
    return (
        when.strftime("%Y-%m-%d %H:%M %Z").strip()
        if isinstance(when, datetime)
        else str(when)
    )


def render_report(
    result: dict, curve_png: bytes, *, generated: datetime | str | None = None
) -> str:
    """Render the self-contained HTML report of one dosing result.

    The report shows ``result["display"]`` (built by
    :func:`phems_clinical.dosing.wording.display`): the same title, summary,
    tables, warnings and notes the command line prints and the web page shows,
    as finished text; with a previous assessment, its comparison table. No
    number is formatted here, and no fit internals are shown.

    Parameters
    ----------
    result : dict
        A dosing result with its ``display``.
    curve_png : bytes
        The figure from :func:`curve_figure`, inlined as a base64 ``data:`` URI.
    generated : datetime or str, optional
        Date shown as "generated"; default ``result["assessed"]`` if present, else
        now. Pass it for reproducible output.

    Returns
    -------
    str
        One HTML page: inline CSS with print rules, no scripts, no external URLs.
        Every string taken from ``result`` is HTML-escaped.

    Raises
    ------
    ValueError
        When ``result`` has no ``display`` (rebuild it with
        :func:`phems_clinical.dosing.workflow.redraw`).
    """
    disp = result.get("display")
    if not isinstance(disp, dict):
        raise ValueError(
            "result: no 'display' to render; rebuild it with "
            "phems_clinical.dosing.workflow.redraw"
        )
    ctx = {
        "d": disp,
        "title": disp.get("title", ""),
        "generated": _generated(result, generated),
        "image": base64.b64encode(curve_png).decode("ascii"),
        "time_axis": _time_label(result)[0].lower() + _time_label(result)[1:],
        "versions": _versions(result.get("versions")),
    }
    return _environment().get_template("dose_report.html.j2").render(**ctx)
