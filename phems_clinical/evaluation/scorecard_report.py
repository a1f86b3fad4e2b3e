"""HTML report of a data-source scorecard, for the data controller's release review.

:func:`render_scorecard_html` turns the Dataset of
:func:`phems_clinical.evaluation.scorecard.build_scorecard` into one self-contained
page (inline CSS, no scripts, no network): a plain-language summary per source,
the sources with their differential-privacy guarantee (epsilon, delta, unit of
privacy, or "not DP"), then one table per group (privacy, fidelity, utility) with
the sources as side-by-side columns. Every row shows the metric's caption, target
and reference; every value outside its target is flagged in words ("above 0.09
threshold"), not by colour alone, and a metric that does not apply to a source
reads "not applicable". All text is escaped (jinja2 autoescape).

Privacy comes first because it is what the controller decides on; fidelity and
utility say what the release is worth.

:func:`write_scorecard` writes ``scorecard.nc`` (h5netcdf) and ``scorecard.html``.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from pathlib import Path

import jinja2
import markupsafe
import numpy as np
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from phems_clinical.evaluation.scorecard import RISK_THRESHOLD, assess, target_text

__all__ = [
    "privacy_figure",
    "rank_sources",
    "render_scorecard_html",
    "summary_lines",
    "utility_loss",
    "worst_attack",
    "write_scorecard",
]

#: Attack-based risks drawn by :func:`privacy_figure` (all on a 0-1 scale).
ATTACK_RISKS = (
    "singling_out_risk",
    "singling_out_risk_multivariate",
    "linkability_risk",
    "inference_risk",
)
_MARKERS = "osD^vP*Xph"

_ORDER = ("privacy", "fidelity", "utility")
_TITLES = {
    "privacy": "Privacy: residual risk of disclosing patients",
    "fidelity": "Fidelity: how closely the data resemble the real data",
    "utility": "Utility: do analyses on these data give the real-data answers?",
}
_WORDS = {  # (all within target, at most half flagged, more than half flagged)
    "privacy": (
        "privacy risks low",
        "privacy risks above target",
        "privacy risks HIGH",
    ),
    "fidelity": ("fidelity high", "fidelity moderate", "fidelity low"),
    "utility": (
        "utility close to real data",
        "utility somewhat reduced",
        "utility low",
    ),
}


def _num(v: float, ci_low: float = math.nan, ci_high: float = math.nan) -> str:
    def f(x: float) -> str:
        if math.isinf(x):
            return "\u221e" if x > 0 else "-\u221e"
        if float(x).is_integer() and abs(x) < 1e6:
            return str(int(x))
        return f"{x:.3g}"

    s = f(v)
    if not (math.isnan(ci_low) or math.isnan(ci_high)):
        s += f" (95 % CI {f(ci_low)}\u2013{f(ci_high)})"
    return s


def dp_text(eps: float, delta: float) -> str:
    """``"ε = 1, δ = 1e-06"``, or ``"not DP"`` when ``eps`` is NaN."""
    if math.isnan(eps):
        return "not DP"
    s = f"\u03b5 = {eps:g}"
    if not math.isnan(delta):
        s += f", \u03b4 = {delta:g}"
    return s


def privacy_figure(ds: xr.Dataset) -> bytes | None:
    """PNG of the attack-based risks per source with their 95 % intervals and the
    0.09 threshold line; None when no source has one. Sources differ by marker
    shape as well as colour (prints in greyscale). matplotlib's object API with
    the Agg canvas: no global pyplot state."""
    metrics = [m for m in ATTACK_RISKS if m in ds["metric"].values]
    if not metrics:
        return None
    sub = ds.sel(metric=metrics)
    keep = [
        i
        for i in range(sub.sizes["source"])
        if np.isfinite(sub["value"].values[i]).any()
    ]
    if not keep:
        return None
    fig = Figure(
        figsize=(7.0, 0.55 * len(metrics) * max(2, len(keep)) / 2 + 1.3), dpi=110
    )
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    step = 0.7 / max(1, len(keep))
    for n, i in enumerate(keep):
        y = np.arange(len(metrics)) - 0.35 + step * (n + 0.5)
        v, lo, hi = (sub[k].values[i] for k in ("value", "ci_low", "ci_high"))
        err = np.vstack(
            [np.where(np.isnan(lo), 0, v - lo), np.where(np.isnan(hi), 0, hi - v)]
        )
        ax.errorbar(
            v,
            y,
            xerr=err,
            fmt=_MARKERS[n % len(_MARKERS)],
            ms=6,
            capsize=3,
            label=str(sub["source"].values[i]),
        )
    ax.axvline(RISK_THRESHOLD, color="#9b1c10", ls="--", lw=1)
    ax.text(
        RISK_THRESHOLD,
        len(metrics) - 0.45,
        f" {RISK_THRESHOLD:g} threshold",
        color="#9b1c10",
        fontsize=8,
        va="bottom",
    )
    ax.set_yticks(np.arange(len(metrics)), [str(x) for x in sub["label"].values])
    ax.invert_yaxis()
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(len(metrics) - 0.4, -0.6)
    ax.set_xlabel("residual risk (0 = no better than for unseen patients)")
    ax.legend(
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.2),
        ncol=min(4, len(keep)),
        frameon=False,
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def worst_attack(ds: xr.Dataset, i: int) -> tuple[str, float, float, float]:
    """(label, value, ci_low, ci_high) of source ``i``'s highest attack risk."""
    best = ("", math.nan, math.nan, math.nan)
    for m in ATTACK_RISKS:
        if m not in ds["metric"].values:
            continue
        c = ds.sel(metric=m).isel(source=i)
        v = float(c["value"])
        if math.isfinite(v) and not v <= best[1]:
            best = (str(c["label"].values), v, float(c["ci_low"]), float(c["ci_high"]))
    return best


def summary_lines(ds: xr.Dataset) -> dict[str, str]:
    """One plain-language line per source, derived from the verdicts of
    :func:`assess`.

    E.g. ``"synthetic (copula): privacy risks low (all 6 checks within target);
    fidelity inconclusive (2 of 8 checks: intervals span the limit: ...);
    utility not assessed"``. A source of kind ``real`` is the reference: its line
    says what an unprotected release of it would leak.
    """
    flags = assess(ds)
    groups = [str(g) for g in ds["group"].values]
    labels = [str(lab) for lab in ds["label"].values]
    out = {}
    for i, src in enumerate(str(s) for s in ds["source"].values):
        kind, gen = str(ds["kind"].values[i]), str(ds["generator"].values[i])
        head = f"{kind}, {gen}" if gen else kind
        if kind == "real":
            lab, v, lo, hi = worst_attack(ds, i)
            leak = (
                f"an unprotected release of these records would leak up to "
                f"{_num(v, lo, hi)} ({lab.lower()})"
                if lab
                else "no attack figures"
            )
            out[src] = (
                f"{src} ({head}): the reference the other sources are "
                f"compared with, not a release; {leak}"
            )
            continue
        parts = []
        for g in _ORDER:
            js = [j for j, gg in enumerate(groups) if gg == g]
            st = [str(flags["status"].values[i, j]) for j in js]

            def having(code, js=js, st=st):
                return [labels[j] for j, s in zip(js, st, strict=True) if s == code]

            ok, bad, unsure = having("ok"), having("flagged"), having("inconclusive")
            idle = having("uninformative")
            n = len(ok) + len(bad) + len(unsure)
            tail = (
                f"; {len(idle)} uninformative at this size: {', '.join(idle)}"
                if idle
                else ""
            )
            if not n:
                parts.append(f"{g} not assessed{tail}")
                continue
            words = _WORDS[g]
            if bad:
                w = words[1] if len(bad) <= n / 2 else words[2]
                text = (
                    f"{w} ({len(bad)} of {n} check{'s' * (n > 1)} outside "
                    f"target: {', '.join(bad)}"
                )
                if unsure:
                    text += f"; {len(unsure)} inconclusive: {', '.join(unsure)}"
            elif unsure:
                text = (
                    f"{g} inconclusive ({len(ok)} of {n} checks within "
                    f"target; {len(unsure)} inconclusive, the interval "
                    f"spanning the limit: {', '.join(unsure)}"
                )
            else:
                text = (
                    f"{words[0]} (all {n} checks within target"
                    if n > 1
                    else f"{words[0]} (the 1 check is within target"
                )
            parts.append(text + tail + ")")
        out[src] = f"{src} ({head}): " + "; ".join(parts)
    return out


def utility_loss(
    ds: xr.Dataset, metric: str, i: int, ref_i: int
) -> tuple[float, float]:
    """Utility loss of source ``i`` against the real source on ``metric`` (positive
    = worse than real) and its half-width (quadrature of both cells')."""
    c, r = (
        ds.sel(metric=metric).isel(source=i),
        ds.sel(metric=metric).isel(source=ref_i),
    )
    v, ref = float(c["value"]), float(r["value"])
    better, t = str(c["better"].values), float(c["target"])
    if better == "higher":
        loss = ref - v
    elif better == "lower":
        loss = v - ref
    else:
        t = ref if math.isnan(t) else t
        loss = abs(v - t) - abs(ref - t)

    def half(x):
        h = (float(x["ci_high"]) - float(x["ci_low"])) / 2
        return 0.0 if math.isnan(h) else h

    h = math.hypot(half(c), half(r))
    return loss, (h if h > 0 else math.nan)


def rank_sources(ds: xr.Dataset, utility_metric: str | None = None) -> list[dict]:
    """The derived sources ranked by residual risk (highest attack risk, lower is
    better), ties broken by utility loss against the real source on
    ``utility_metric`` (default: the first utility metric the real source has).

    Each row: ``source``, ``kind``, ``risk`` and ``risk_text`` (the worst attack
    with its interval), ``loss`` and ``loss_text``, ``risk_rank``, ``loss_rank``
    (1 = best) and the verdict counts. Empty without a real source.
    """
    kinds = [str(k) for k in ds["kind"].values]
    if "real" not in kinds:
        return []
    ref_i = kinds.index("real")
    if utility_metric is None:
        cands = [
            str(m)
            for m, g in zip(ds["metric"].values, ds["group"].values, strict=True)
            if g == "utility"
            and str(ds["bound"].sel(metric=m).values) != "none"
            and math.isfinite(float(ds["value"].sel(metric=m).isel(source=ref_i)))
        ]
        utility_metric = cands[0] if cands else None
    flags = assess(ds)
    rows = []
    for i, src in enumerate(str(s) for s in ds["source"].values):
        if i == ref_i:
            continue
        lab, risk, lo, hi = worst_attack(ds, i)
        loss, h = (
            utility_loss(ds, utility_metric, i, ref_i)
            if utility_metric
            else (math.nan, math.nan)
        )
        st = [str(x) for x in flags["status"].values[i]]
        rows.append(
            {
                "source": src,
                "kind": kinds[i],
                "risk": risk,
                "risk_text": f"{_num(risk, lo, hi)} ({lab.lower()})" if lab else "n/a",
                "loss": loss,
                "loss_text": (
                    "n/a"
                    if math.isnan(loss)
                    else f"{loss:+.3g}" + ("" if math.isnan(h) else f" (\u00b1{h:.2g})")
                ),
                "n_ok": st.count("ok"),
                "n_flagged": st.count("flagged"),
                "n_inconclusive": st.count("inconclusive"),
                "n_uninformative": st.count("uninformative"),
            }
        )

    def order(key):
        vals = sorted({r[key] for r in rows if math.isfinite(r[key])})
        return {v: k + 1 for k, v in enumerate(vals)}

    for key, name in (("risk", "risk_rank"), ("loss", "loss_rank")):
        rk = order(key)
        for r in rows:
            r[name] = rk.get(r[key], "")
    rows.sort(
        key=lambda r: (
            r["risk"] if math.isfinite(r["risk"]) else math.inf,
            r["loss"] if math.isfinite(r["loss"]) else math.inf,
        )
    )
    for r in rows:
        r["utility_metric"] = (
            ""
            if utility_metric is None
            else str(ds["label"].sel(metric=utility_metric).values)
        )
    return rows


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{{ title }}</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;
 color:#222;max-width:1400px}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.6em}
.meta{color:#555;font-size:.9em}
table{border-collapse:collapse;width:100%;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.35em .5em;vertical-align:top;text-align:left}
thead th{background:#eef1f5}
tr.dp th,tr.dp td{background:#f7f3e8}
.caption{color:#333;font-size:.88em;margin-top:.2em}
.ref{color:#666;font-size:.8em}
.val{font-weight:600;white-space:nowrap}
.st-flagged{background:#fbe3e0} .st-flagged .flag{color:#9b1c10;font-weight:600}
.st-ok .flag{color:#1d6b2f} .st-not-applicable{color:#777;font-style:italic}
.st-inconclusive{background:#fff6dc} .st-inconclusive .flag{color:#7a5a00}
.st-uninformative .flag{color:#666;font-style:italic}
.st-reference{background:#f1f3f5} th.reference{background:#e4e7eb}
.st-reference .flag,.st-no-threshold .flag{color:#555}
ul.summary li{margin:.3em 0} img{max-width:100%} .legend{font-size:.85em;color:#444}
</style></head><body>
<h1>{{ title }}</h1>
<p class="meta">Use case: {{ use_case }} &middot; seed {{ seed }} &middot;
{{ created_by }}</p>
<h2>Summary</h2>
<ul class="summary">
{% for line in summary %}<li>{{ line }}</li>
{% endfor %}</ul>
{% if notes %}<h2>Notes</h2><ul>
{% for n in notes %}<li>{{ n }}</li>
{% endfor %}</ul>{% endif %}
<p class="legend">Each value is shown with its 95 % confidence interval. A
verdict needs the whole interval: &ldquo;&#10003; within target&rdquo; when it
lies inside the acceptance band, &ldquo;&#9888; outside target&rdquo; when it
lies outside (the note says which limit), &ldquo;? inconclusive&rdquo; when it
spans a limit or no interval exists (the note gives the sample size that would
settle it), and &ldquo;uninformative&rdquo; when the metric cannot flag anything
at this size. Properties of the released table itself (k, l, t,
re-identification risk) are exact and need no interval. &ldquo;Not
applicable&rdquo; means the metric does not apply to that source. Limits marked
&ldquo;ours&rdquo; have no published threshold. The real source (grey column) is
the reference, not a release: its attack figures are what an unprotected release
of the real records would leak, its fidelity is how far two real samples of
this size differ. The data controller decides what residual risk is
acceptable.</p>
{% if ranking %}<h2 id="ranking">Derived sources ranked</h2>
<p class="caption">Ranked by residual risk (the highest attack-based risk, with
its interval), then by utility lost against the real data{% if ranking[0]
.utility_metric %} ({{ ranking[0].utility_metric }}; positive = worse than real
data){% endif %}. Rank 1 = least risk / least loss.</p>
<table class="ranking"><thead><tr><th>Source</th><th>Kind</th>
<th>Residual risk (worst attack)</th><th>Risk rank</th><th>Utility loss vs real
</th><th>Loss rank</th><th>Verdicts: within / outside / inconclusive /
uninformative</th></tr></thead><tbody>
{% for r in ranking %}<tr data-source="{{ r.source }}"><td>{{ r.source }}</td>
<td>{{ r.kind }}</td><td>{{ r.risk_text }}</td><td>{{ r.risk_rank }}</td>
<td>{{ r.loss_text }}</td><td>{{ r.loss_rank }}</td><td>{{ r.n_ok }} / {{
 r.n_flagged }} / {{ r.n_inconclusive }} / {{ r.n_uninformative }}</td></tr>
{% endfor %}</tbody></table>{% endif %}
{{ before_sections }}
{% for sec in sections %}
<h2 id="{{ sec.group }}">{{ sec.title }}</h2>
<table class="group-{{ sec.group }}">
<thead>
<tr><th>Metric</th><th>Target</th>{% for s in sources %}<th{% if s.kind ==
 "real" %} class="reference"{% endif %}>{{ s.name }}{% if s.kind == "real" %}
(reference){% endif %}</th>
{% endfor %}</tr>
<tr class="dp"><th>Kind / generator</th><td></td>{% for s in sources %}
<td>{{ s.kind }}{% if s.generator %} / {{ s.generator }}{% endif %}{% if s.n_rows %}
({{ s.n_rows }} rows){% endif %}</td>{% endfor %}</tr>
<tr class="dp"><th>Differential privacy (&epsilon;, &delta;) and unit of privacy
</th><td></td>{% for s in sources %}<td class="dp-cell" data-source="{{ s.name }}">
{{ s.dp }}{% if s.unit %}; unit: {{ s.unit }}{% endif %}</td>{% endfor %}</tr>
</thead><tbody>
{% for r in sec.rows %}<tr>
<td><b>{{ r.label }}</b><div class="caption">{{ r.caption }}</div>
<div class="ref">Reference: {{ r.reference }}</div></td>
<td>{{ r.target }}</td>
{% for c in r.cells %}<td class="cell st-{{ c.status_css }}"
 data-source="{{ c.source }}" data-metric="{{ r.metric }}"
 data-status="{{ c.status }}">{% if c.status ==
 "not applicable" %}not applicable{% else %}<span class="val">{{ c.value }}</span>
<div class="flag">{% if c.status == "flagged" %}&#9888; outside target: {% elif
 c.status == "ok" %}&#10003; {% elif c.status == "inconclusive" %}? {% endif %}{{
 c.note }}</div>{% endif %}</td>
{% endfor %}</tr>
{% endfor %}</tbody></table>
{% if sec.group == "privacy" and figure %}<figure><img alt="Attack-based privacy
risks of each source with 95 % intervals; the dashed line is the 0.09 threshold"
src="data:image/png;base64,{{ figure }}"><figcaption class="caption">Attack-based
risks with 95 % intervals; points right of the dashed line are above the 0.09
threshold.</figcaption></figure>{% endif %}
{% endfor %}
</body></html>
"""

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)


def render_scorecard_html(
    ds: xr.Dataset,
    *,
    title: str = "Data-source scorecard",
    notes: Sequence[str] = (),
    figure: bool = True,
    before_sections: str = "",
    rank: bool = True,
    utility_metric: str | None = None,
) -> str:
    """One self-contained HTML page of the scorecard ``ds`` (all text escaped).

    With ``figure``, the attack-based risks are also drawn
    (:func:`privacy_figure`) and inlined as a base64 PNG. ``before_sections``: an
    HTML fragment placed before the metric tables, inserted as is (render it with
    an autoescaping template, as :mod:`phems_clinical.runner.report` does).
    With ``rank``, a table ranks the derived sources (:func:`rank_sources`, by
    ``utility_metric`` when given).
    """
    flags = assess(ds)
    sources = []
    for i, name in enumerate(str(s) for s in ds["source"].values):
        n = float(ds["n_rows"].values[i])
        sources.append(
            {
                "name": name,
                "kind": str(ds["kind"].values[i]),
                "generator": str(ds["generator"].values[i]),
                "n_rows": "" if math.isnan(n) else _num(n),
                "dp": dp_text(
                    float(ds["epsilon"].values[i]), float(ds["delta"].values[i])
                ),
                "unit": str(ds["unit"].values[i]),
            }
        )
    png = privacy_figure(ds) if figure else None
    png_b64 = base64.b64encode(png).decode("ascii") if png else ""
    sections = []
    groups = [str(g) for g in ds["group"].values]
    for g in _ORDER:
        rows = []
        for j in (j for j, gg in enumerate(groups) if gg == g):
            spec = {
                k: ds[k].values[j]
                for k in ("better", "bound", "target", "lower", "upper")
            }
            cells = []
            for i, src in enumerate(sources):
                st = str(flags["status"].values[i, j])
                cells.append(
                    {
                        "source": src["name"],
                        "status": st,
                        "status_css": st.replace(" ", "-"),
                        "note": str(flags["note"].values[i, j]),
                        "value": _num(
                            float(ds["value"].values[i, j]),
                            float(ds["ci_low"].values[i, j]),
                            float(ds["ci_high"].values[i, j]),
                        ),
                    }
                )
            rows.append(
                {
                    "metric": str(ds["metric"].values[j]),
                    "label": str(ds["label"].values[j]),
                    "caption": str(ds["caption"].values[j]),
                    "reference": str(ds["reference"].values[j]),
                    "target": target_text(spec),
                    "cells": cells,
                }
            )
        if rows:
            sections.append({"group": g, "title": _TITLES[g], "rows": rows})
    return _ENV.from_string(_TEMPLATE).render(
        title=title,
        use_case=str(ds.attrs.get("use_case", "")),
        seed=str(ds.attrs.get("seed", "")),
        created_by=str(ds.attrs.get("created_by", "")),
        summary=list(summary_lines(ds).values()),
        notes=[str(n) for n in notes],
        figure=png_b64,
        before_sections=markupsafe.Markup(before_sections),
        sources=sources,
        sections=sections,
        ranking=rank_sources(ds, utility_metric) if rank else [],
    )


def write_scorecard(
    ds: xr.Dataset,
    out_dir: str | Path,
    *,
    title: str = "Data-source scorecard",
    notes: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write ``scorecard.nc`` (netCDF4 via h5netcdf) and ``scorecard.html`` into
    ``out_dir`` (created if needed); returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nc, html = out / "scorecard.nc", out / "scorecard.html"
    ds.to_netcdf(nc, engine="h5netcdf")
    html.write_text(
        render_scorecard_html(ds, title=title, notes=notes), encoding="utf-8"
    )
    return nc, html
