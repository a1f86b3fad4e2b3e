"""``report.html`` of an experiment run: real, anonymised and synthetic data side by
side, on one self-contained page (inline CSS and PNG, no scripts, no network).

1. What the run did (use case, sites, model, strategy, engine, secure aggregation,
   DP) in plain words.
2. Utility: the model trained federatedly on each source, scored on real held-out
   patients of every training hospital and on the held-out hospital (table and
   figure, each with a caption); the data side by side (the use case's figures:
   concentration-time, trajectories or occupation curves, covariates); attack
   risks pooled over the training hospitals and per hospital.
3. Training: rounds, convergence and the DP guarantee of training (ε, δ, unit of
   privacy, or "not DP").
4. The scorecard of :mod:`phems_clinical.evaluation.scorecard_report` with one
   column per source: utility at the held-out hospital, privacy risk (attacks
   pooled over the training sites, other checks at the worst site), fidelity
   (mean over training sites), each with its caption, target and reference, and
   each source's data ε.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import xarray as xr

from phems_clinical import usecases
from phems_clinical.evaluation.plots import risk_utility_map, spread_figure
from phems_clinical.evaluation.scorecard import (
    RISK_THRESHOLD,
    Score,
    build_scorecard,
    pooled_risk,
    utility_scores,
)
from phems_clinical.evaluation.scorecard_report import (
    ATTACK_RISKS,
    dp_text,
    rank_sources,
    render_scorecard_html,
    utility_loss,
    worst_attack,
)
from phems_clinical.usecases.task import Task

_FRAGMENT = """
<h2 id="run">What this run did</h2>
<ul>{% for line in setup %}<li>{{ line }}</li>{% endfor %}</ul>
<h2 id="utility">Utility of each source, per hospital</h2>
<p class="caption">{{ utility_caption }}</p>
<table class="utility"><thead><tr><th>Hospital</th><th>Evaluated on</th>
{% for s in sources %}<th>{{ s }}</th>{% endfor %}</tr></thead><tbody>
{% for row in utility_rows %}<tr><td>{{ row.site }}</td><td>{{ row.role }}</td>
{% for v in row.cells %}<td class="val" data-metric="{{ headline }}">{{ v }}</td>
{% endfor %}</tr>{% endfor %}
<tr class="summary"><td><b>all hospitals</b></td><td>mean (95 % interval
across hospitals{% if n_seeds > 1 %} and seeds{% endif %})</td>
{% for v in utility_mean %}<td class="val">{{ v }}</td>{% endfor %}</tr>
</tbody></table>
{% if figure %}<figure><img alt="{{ figure_alt }}" src="data:image/png;base64,{{
 figure }}"><figcaption class="caption">{{ figure_alt }}</figcaption></figure>
{% endif %}
<figure><img alt="{{ spread_alt }}" src="data:image/png;base64,{{ spread }}">
<figcaption class="caption">{{ spread_alt }}</figcaption></figure>
{% if map %}<h2 id="map">Privacy and utility of each source</h2>
<figure><img alt="{{ map_alt }}" src="data:image/png;base64,{{ map }}">
<figcaption class="caption">{{ map_alt }}</figcaption></figure>{% endif %}
<h2 id="estimates">Population estimates fitted on each source</h2>
<p class="caption">{{ estimates_caption }}</p>
<table class="estimates"><thead><tr><th>Parameter</th>
{% for s in sources %}<th>{{ s }}</th>{% endfor %}</tr></thead><tbody>
{% for row in estimates %}<tr><td>{{ row.name }}</td>{% for v in row.cells %}
<td class="val">{{ v }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>
{% if plots %}<h2 id="data">The data side by side</h2>
<p class="caption">Each source as the training hospitals derived it, next to the
real training data it was derived from (the reference). Only summaries of at least
5 patients are drawn.</p>
{% for f in plots %}<h3>{{ f.title }}</h3><figure><img alt="{{ f.caption }}"
src="data:image/png;base64,{{ f.png }}"><figcaption class="caption">{{ f.caption
}}</figcaption></figure>{% endfor %}{% endif %}
{% if privacy_rows %}<h2 id="pooled">Attack risks: pooled over hospitals and per
hospital</h2>
<p class="caption">{{ pooled_caption }}</p>
<table class="pooled"><thead><tr><th>Attack</th><th>Hospital</th>
{% for s in sources %}<th>{{ s }}</th>{% endfor %}</tr></thead><tbody>
{% for row in privacy_rows %}<tr{% if row.pooled %} class="summary"{% endif %}>
<td>{{ row.label }}</td><td>{{ row.site }}</td>{% for v in row.cells %}
<td class="val">{{ v }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>{% endif %}
<h2 id="training">Training</h2>
<p class="caption">Federated rounds run per source, whether the strategy reached its
stopping rule, and the differential-privacy guarantee of training itself (patient-
level DP-SGD at each site; the largest &epsilon; over the sites, since they hold
different patients). A source's own &epsilon; (e.g. a DP synthetic generator) is in
the scorecard below.</p>
<table class="training"><thead><tr><th></th>
{% for s in sources %}<th>{{ s }}</th>{% endfor %}</tr></thead><tbody>
<tr><td>rounds</td>{% for t in training %}<td>{{ t.rounds }}</td>{% endfor %}</tr>
<tr><td>converged</td>{% for t in training %}<td>{{ t.converged }}</td>
{% endfor %}</tr>
<tr><td>stopped by</td>{% for t in training %}<td>{{ t.stopped_by }}</td>
{% endfor %}</tr>
<tr><td>training DP (&epsilon;, &delta;), unit</td>{% for t in training %}
<td class="train-dp" data-source="{{ t.name }}">{{ t.dp }}</td>{% endfor %}</tr>
</tbody></table>
<p class="caption">The tables below put the sources side by side: utility at the
held-out hospital, privacy risk at the worst training hospital and fidelity as the
mean over the training hospitals (each hospital's own scorecard is in
<code>scorecards/&lt;site&gt;/scorecard.html</code>).</p>
"""

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.3g}"


def _half(c: xr.Dataset) -> np.ndarray:
    return (c["ci_high"].values - c["ci_low"].values) / 2


def across_sites(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95 % t-interval over independent hospitals (and seeds):
    mean +- t(0.975, K-1) SD / sqrt(K); no interval for K < 2."""
    from scipy.stats import t as student_t

    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if not v.size:
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    if v.size < 2:
        return m, math.nan, math.nan
    h = float(student_t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return m, m - h, m + h


def combined_scorecard(
    ds: xr.Dataset, cards: Mapping[str, xr.Dataset], use_case: str, seed: int
) -> xr.Dataset:
    """One scorecard over the sources, every cell with its interval.

    Privacy: the anonymeter attack risks (:data:`ATTACK_RISKS`) pooled over the
    training sites (:func:`~phems_clinical.evaluation.scorecard.pooled_risk`:
    the risk of the release mechanism, from the summed attack counts; the worst
    site where a card lacks the counts); the other privacy metrics from the
    worst training site (its value, interval and number of attacks).
    Fidelity: the mean over training sites, half-width sqrt(sum h_k^2) / K (sites
    hold different patients); uninformative where any site's cell is. Utility:
    the task's metrics, mean over every evaluation hospital (and seed) with a
    95 % t-interval across them (:func:`across_sites`).
    """
    first = next(iter(cards.values()))
    groups = dict(
        zip(first.metric.values.tolist(), first.group.values.tolist(), strict=True)
    )
    scores: dict[str, dict[str, Any]] = {}
    meta: dict[str, dict[str, Any]] = {}
    per_site = list(cards.values())
    for s in ds.source.values.tolist():
        row = {}
        for m, g in groups.items():
            cells = [
                c.sel(source=s, metric=m) for c in per_site if m in c.metric.values
            ]
            vals = np.array([float(c["value"]) for c in cells])
            ok = np.isfinite(vals)
            if not ok.any():
                continue
            cells = [c for c, k in zip(cells, ok, strict=True) if k]
            n = np.array([float(c["n"]) if "n" in c else math.nan for c in cells])
            why = next(
                (
                    str(c["uninformative"].values)
                    for c in cells
                    if "uninformative" in c and str(c["uninformative"].values)
                ),
                "",
            )
            counts = [
                c
                for c in cells
                if "successes" in c
                and np.isfinite(float(c["successes"]))
                and np.isfinite(float(c["control_successes"]))
            ]
            if m in ATTACK_RISKS and counts and len(counts) == len(cells):
                p = pooled_risk(
                    [
                        Score(
                            float(c["value"]),
                            n=float(c["n"]),
                            successes=float(c["successes"]),
                            control_successes=float(c["control_successes"]),
                        )
                        for c in cells
                    ]
                )
                row[m] = p._replace(uninformative=why)
            elif g == "privacy":  # the worst training site
                lower = first.better.sel(metric=m).item() == "lower"
                k = int(np.argmax(vals[ok]) if lower else np.argmin(vals[ok]))
                c = cells[k]
                row[m] = Score(
                    float(c["value"]),
                    float(c["ci_low"]),
                    float(c["ci_high"]),
                    float(n[k]),
                    why,
                )
            else:
                h = np.array([float(_half(c)) for c in cells])
                v = float(vals[ok].mean())
                hh = (
                    float(np.sqrt(np.sum(h**2))) / len(h)
                    if np.isfinite(h).all()
                    else math.nan
                )
                row[m] = Score(v, v - hh, v + hh, float(np.nansum(n)), why)
        u = ds["utility"].sel(source=s)
        for um in ds.utility_metric.values.tolist():
            name = next(iter(utility_scores({um: 0.0})), None)
            if name is None:
                continue
            v, lo, hi = across_sites(u.sel(utility_metric=um).values.ravel())
            if math.isfinite(v):
                row[name] = Score(v, lo, hi, float(u.sizes["site"]))
        scores[s] = row
        c = first.sel(source=s)
        eps, delta = float(c.epsilon), float(c.delta)
        meta[s] = {
            "kind": str(c.kind.item()),
            "generator": str(c.generator.item()),
            "epsilon": None if math.isnan(eps) else eps,
            "delta": None if math.isnan(delta) else delta,
            "unit_of_privacy": str(c.unit.item()),
            "n_rows": float(
                sum(float(cd.n_rows.sel(source=s)) for cd in cards.values())
            ),
        }
    return build_scorecard(scores, sources_meta=meta, use_case=use_case, seed=seed)


def utility_figure(ds: xr.Dataset, task: Task) -> bytes:
    """Grouped bars: the headline metric per hospital, one bar per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = ds.isel(seed=0)
    head = task.metrics[0]
    v = run["utility"].sel(utility_metric=head)
    sources, sites = run.source.values.tolist(), run.site.values.tolist()
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    width = 0.8 / len(sources)
    for i, s in enumerate(sources):
        ax.bar(
            np.arange(len(sites)) + i * width, v.sel(source=s).values, width, label=s
        )
    labels = [f"{s}\n({r})" for s, r in zip(sites, run.site_role.values, strict=True)]
    ax.set_xticks(np.arange(len(sites)) + 0.4 - width / 2, labels, fontsize=7)
    ax.set_ylabel(task.labels[head])
    ax.set_title(
        "model trained on each source, scored on real held-out data", fontsize=9
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _training_dp(eps: float, delta: float) -> str:
    text = dp_text(eps, delta)
    return (
        text
        if text == "not DP"
        else (
            f"{text}; unit: one patient; noise from each site's OS CSPRNG, not "
            "reproducible from the seed (by design)"
        )
    )


def _interval(v: float, lo: float, hi: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return _fmt(v)
    return f"{_fmt(v)} ({_fmt(lo)}\u2013{_fmt(hi)})"


def privacy_rows(
    card: xr.Dataset, cards: Mapping[str, xr.Dataset], sources: list[str]
) -> list[dict]:
    """Per attack risk: the pooled row of the combined ``card`` (with its number
    of attacks), then one row per training site, each cell ``value (95 %
    interval)``."""
    rows = []
    for m in ATTACK_RISKS:
        if m not in card.metric.values:
            continue
        label = str(card.label.sel(metric=m).item())
        c = card.sel(metric=m)
        rows.append(
            {
                "label": label,
                "site": "all (pooled)",
                "pooled": True,
                "cells": [
                    _interval(
                        float(c.value.sel(source=s)),
                        float(c.ci_low.sel(source=s)),
                        float(c.ci_high.sel(source=s)),
                    )
                    + (
                        f"; {int(c.n.sel(source=s))} attacks"
                        if np.isfinite(float(c.n.sel(source=s)))
                        else ""
                    )
                    for s in sources
                ],
            }
        )
        for site, sc in cards.items():
            if m not in sc.metric.values:
                continue
            c = sc.sel(metric=m)
            rows.append(
                {
                    "label": "",
                    "site": site,
                    "pooled": False,
                    "cells": [
                        _interval(
                            float(c.value.sel(source=s)),
                            float(c.ci_low.sel(source=s)),
                            float(c.ci_high.sel(source=s)),
                        )
                        if s in sc.source.values
                        else "n/a"
                        for s in sources
                    ],
                }
            )
    return rows


def data_figures(
    use_case: str, tables: Mapping[str, Any] | None, sources: list[str]
) -> list[dict]:
    """The use case's side-by-side figures (:attr:`UseCase.plots`) of the sources
    in ``tables`` (real first, then in the run's order); none without tables."""
    if not tables:
        return []
    order = ["real"] + [s for s in sources if s != "real"]
    tabs = {s: tables[s] for s in order if s in tables}
    missing = [s for s in sources if s not in tabs]
    out = []
    for name, draw in usecases.get(use_case).plots.items():
        png, caption = draw(tabs)
        if missing:
            caption += (
                f" Not drawn: {', '.join(missing)} (kept from an earlier, "
                "interrupted run)."
            )
        out.append(
            {
                "title": name,
                "png": base64.b64encode(png).decode("ascii"),
                "caption": caption,
            }
        )
    return out


def render_report(
    ds: xr.Dataset,
    cards: Mapping[str, xr.Dataset],
    task: Task,
    setup: list[str],
    *,
    title: str,
    tables: Mapping[str, Any] | None = None,
) -> str:
    """The page (see the module docstring); ``tables``: each source's derived
    tables for the side-by-side figures (:attr:`.pipeline.PipelineRun.tables`;
    none drawn without)."""
    run = ds.isel(seed=0)
    head = task.metrics[0]
    better = "lower" if head in task.lower_is_better else "higher"
    sources = run.source.values.tolist()
    rows = [
        {
            "site": site,
            "role": role,
            "cells": [
                _fmt(
                    float(run["utility"].sel(source=s, site=site, utility_metric=head))
                )
                for s in sources
            ],
        }
        for site, role in zip(
            run.site.values.tolist(), run.site_role.values.tolist(), strict=True
        )
    ]
    png = utility_figure(ds, task)
    n_seeds = int(ds.sizes["seed"])
    head_values = {
        s: ds["utility"].sel(source=s, utility_metric=head).values.ravel()
        for s in sources
    }
    utility_mean = []
    for s in sources:
        m, lo, hi = across_sites(head_values[s])
        utility_mean.append(
            _fmt(m) if math.isnan(lo) else f"{_fmt(m)} ({_fmt(lo)}\u2013{_fmt(hi)})"
        )
    spread = spread_figure(
        head_values,
        ylabel=task.labels[head],
        title="each dot one hospital" + (" and seed" if n_seeds > 1 else ""),
    )
    card = combined_scorecard(ds, cards, task.use_case, int(run.seed))
    card_head = next(iter(utility_scores({head: 0.0})), None)
    points = []
    if card_head is not None and card_head in card.metric.values:
        for r in rank_sources(card, card_head):
            i = card.source.values.tolist().index(r["source"])
            _, risk, rlo, rhi = worst_attack(card, i)
            ref_i = card.kind.values.tolist().index("real")
            loss, h = utility_loss(card, card_head, i, ref_i)
            points.append((r["source"], loss, h, risk, rlo, rhi))
    map_png = (
        risk_utility_map(
            points,
            threshold=RISK_THRESHOLD,
            xlabel=f"utility loss vs real data ({task.labels[head]}; > 0 = worse)",
        )
        if points
        else None
    )
    est = ds["estimate"]
    est_se = ds["estimate_se"] if "estimate_se" in ds else None
    estimates, wald = [], False
    for p in est.parameter.values.tolist():
        cells = []
        for s in sources:
            m, lo, hi = across_sites(est.sel(source=s, parameter=p).values.ravel())
            if n_seeds == 1 and est_se is not None:
                se = float(est_se.sel(source=s, parameter=p).values.ravel()[0])
                if math.isfinite(se) and math.isfinite(m):
                    lo, hi, wald = m - 1.96 * se, m + 1.96 * se, True
            cells.append(
                _fmt(m) if math.isnan(lo) else f"{_fmt(m)} ({_fmt(lo)}\u2013{_fmt(hi)})"
            )
        estimates.append({"name": p, "cells": cells})
    training = [
        {
            "name": s,
            "rounds": int(run.rounds.sel(source=s)),
            "converged": "yes" if bool(run.converged.sel(source=s)) else "no",
            "stopped_by": str(run.stopped_by.sel(source=s).item())
            if "stopped_by" in run.coords
            else "",
            "dp": _training_dp(
                float(run.train_epsilon.sel(source=s)),
                float(run.train_delta.sel(source=s)),
            ),
        }
        for s in sources
    ]
    fragment = _ENV.from_string(_FRAGMENT).render(
        setup=setup,
        sources=sources,
        headline=head,
        utility_rows=rows,
        utility_caption=(
            f"{task.labels[head]} ({better} is better) of the model trained "
            f"federatedly on each source and scored on real patients it never saw: "
            f"the held-out half of each training hospital's patients, and every "
            f"patient of the hospital that took no part in training. A source is "
            f"worth using when its value is close to the real data's."
        ),
        figure=base64.b64encode(png).decode("ascii"),
        n_seeds=n_seeds,
        utility_mean=utility_mean,
        spread=base64.b64encode(spread).decode("ascii"),
        spread_alt=(
            f"{task.labels[head]} of the model trained on each source: "
            f"each dot one evaluation hospital"
            + (" and seed" if n_seeds > 1 else "")
            + "; black: mean with its 95 % t-interval across them."
        ),
        map=base64.b64encode(map_png).decode("ascii") if map_png else "",
        map_alt=(
            "Each derived source at its utility loss against the real data "
            "(mean over hospitals, interval from both sources' intervals) "
            "and its residual risk (highest attack risk at the worst "
            "training hospital, 95 % interval); dashed: the 0.09 "
            "threshold. Bottom left is best."
        ),
        estimates=estimates,
        estimates_caption=(
            "The model's estimates fitted federatedly on each source (mean over "
            "seeds"
            + (", with a 95 % t-interval across them" if n_seeds > 1 else "; one seed")
            + ")."
            + (
                " Intervals: estimate \u00b1 1.96 standard errors of the fit "
                "(federated FOCEI: R-based, from the summed site Hessians, as "
                "NONMEM's $COVARIANCE MATRIX=R; symmetric Wald intervals, so a "
                "lower bound below 0 for a positive parameter means that source "
                "barely informs it). They show how precise the fit on that "
                "source looks; a derived source whose interval excludes the real "
                "data's estimate changed what the model learns."
                if wald
                else (
                    " No standard errors: this fit reports point estimates only."
                    if n_seeds == 1
                    else ""
                )
            )
        ),
        figure_alt=(
            f"{task.labels[head]} per hospital, one bar per source "
            f"({better} is better)."
        ),
        training=training,
        plots=data_figures(task.use_case, tables, sources),
        privacy_rows=privacy_rows(card, cards, sources),
        pooled_caption=(
            "Pooled: each attack's trials at all training hospitals added up "
            "(each hospital released its own data by the same method), the "
            "anonymeter risk of the summed counts with its 95 % interval. It is "
            "the risk of the release method at this size, not of one hospital's "
            "release: the per-hospital rows below it are each release's own "
            "risk, with the wider intervals of their fewer attacks. The "
            "scorecard below uses the pooled figure for these attacks."
        ),
    )
    return render_scorecard_html(
        card, title=title, before_sections=fragment, utility_metric=card_head
    )


def write_report(
    ds: xr.Dataset,
    cards: Mapping[str, xr.Dataset],
    task: Task,
    setup: list[str],
    path: str | Path,
    *,
    title: str,
    tables: Mapping[str, Any] | None = None,
) -> Path:
    path = Path(path)
    path.write_text(
        render_report(ds, cards, task, setup, title=title, tables=tables),
        encoding="utf-8",
    )
    return path
