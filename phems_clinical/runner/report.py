"""``report.html`` of an experiment run: real, anonymised and synthetic data side by
side, on one self-contained page (inline CSS and PNG, no scripts, no network).

1. What the run did (use case, sites, model, strategy, engine, secure aggregation,
   DP) in plain words.
2. Utility: the model trained federatedly on each source, scored on real held-out
   patients of every training hospital and on the held-out hospital (table and
   figure, each with a caption).
3. Training: rounds, convergence and the DP guarantee of training (ε, δ, unit of
   privacy, or "not DP").
4. The scorecard of :mod:`phems_clinical.evaluation.scorecard_report` with one
   column per source: utility at the held-out hospital, privacy risk (the worst
   training site), fidelity (mean over training sites), each with its caption,
   target and reference, and each source's data ε.
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

from phems_clinical.evaluation.scorecard import build_scorecard, utility_scores
from phems_clinical.evaluation.scorecard_report import (
    dp_text,
    render_scorecard_html,
)
from phems_clinical.runner.results import held_out_site
from phems_clinical.runner.tasks import Task

_FRAGMENT = """
<h2 id="run">What this run did</h2>
<ul>{% for line in setup %}<li>{{ line }}</li>{% endfor %}</ul>
<h2 id="utility">Utility of each source, per hospital</h2>
<p class="caption">{{ utility_caption }}</p>
<table class="utility"><thead><tr><th>Hospital</th><th>Evaluated on</th>
{% for s in sources %}<th>{{ s }}</th>{% endfor %}</tr></thead><tbody>
{% for row in utility_rows %}<tr><td>{{ row.site }}</td><td>{{ row.role }}</td>
{% for v in row.cells %}<td class="val" data-metric="{{ headline }}">{{ v }}</td>
{% endfor %}</tr>{% endfor %}</tbody></table>
{% if figure %}<figure><img alt="{{ figure_alt }}" src="data:image/png;base64,{{
 figure }}"><figcaption class="caption">{{ figure_alt }}</figcaption></figure>
{% endif %}
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


def combined_scorecard(ds: xr.Dataset, cards: Mapping[str, xr.Dataset],
                       use_case: str, seed: int) -> xr.Dataset:
    """One scorecard over the sources: utility at the held-out hospital (from
    ``results.nc``), privacy at the worst training site, fidelity averaged."""
    first = next(iter(cards.values()))
    groups = dict(zip(first.metric.values.tolist(), first.group.values.tolist(),
                      strict=True))
    run = ds.isel(seed=0)
    held = held_out_site(run)
    scores: dict[str, dict[str, Any]] = {}
    meta: dict[str, dict[str, Any]] = {}
    stacked = xr.concat([c["value"] for c in cards.values()], dim="training_site")
    for s in run.source.values.tolist():
        row = {}
        for m, g in groups.items():
            v = stacked.sel(source=s, metric=m)
            vals = v.values[np.isfinite(v.values)]
            if not vals.size:
                continue
            if g != "privacy":
                row[m] = float(vals.mean())
            else:  # the worst training site
                lower = first.better.sel(metric=m).item() == "lower"
                row[m] = float(vals.max() if lower else vals.min())
        u = run["utility"].sel(source=s, site=held)
        row.update(utility_scores(dict(zip(run.utility_metric.values.tolist(),
                                           u.values.tolist(), strict=True))))
        scores[s] = row
        c = first.sel(source=s)
        eps, delta = float(c.epsilon), float(c.delta)
        meta[s] = {"kind": str(c.kind.item()), "generator": str(c.generator.item()),
                   "epsilon": None if math.isnan(eps) else eps,
                   "delta": None if math.isnan(delta) else delta,
                   "unit_of_privacy": str(c.unit.item()),
                   "n_rows": float(sum(float(cd.n_rows.sel(source=s))
                                       for cd in cards.values()))}
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
        ax.bar(np.arange(len(sites)) + i * width, v.sel(source=s).values, width,
               label=s)
    labels = [f"{s}\n({r})" for s, r in zip(sites, run.site_role.values,
                                             strict=True)]
    ax.set_xticks(np.arange(len(sites)) + 0.4 - width / 2, labels, fontsize=7)
    ax.set_ylabel(task.labels[head])
    ax.set_title("model trained on each source, scored on real held-out data",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _training_dp(eps: float, delta: float) -> str:
    text = dp_text(eps, delta)
    return text if text == "not DP" else (
        f"{text}; unit: one patient; noise from each site's OS CSPRNG, not "
        "reproducible from the seed (by design)")


def render_report(ds: xr.Dataset, cards: Mapping[str, xr.Dataset], task: Task,
                  setup: list[str], *, title: str) -> str:
    """The page (see the module docstring)."""
    run = ds.isel(seed=0)
    head = task.metrics[0]
    better = "lower" if head in task.lower_is_better else "higher"
    sources = run.source.values.tolist()
    rows = [{"site": site, "role": role,
             "cells": [_fmt(float(run["utility"].sel(source=s, site=site,
                                                      utility_metric=head)))
                        for s in sources]}
            for site, role in zip(run.site.values.tolist(),
                                  run.site_role.values.tolist(), strict=True)]
    png = utility_figure(ds, task)
    training = [{"name": s, "rounds": int(run.rounds.sel(source=s)),
                 "converged": "yes" if bool(run.converged.sel(source=s)) else "no",
                 "stopped_by": str(run.stopped_by.sel(source=s).item())
                 if "stopped_by" in run.coords else "",
                 "dp": _training_dp(float(run.train_epsilon.sel(source=s)),
                                    float(run.train_delta.sel(source=s)))}
                for s in sources]
    fragment = _ENV.from_string(_FRAGMENT).render(
        setup=setup, sources=sources, headline=head, utility_rows=rows,
        utility_caption=(
            f"{task.labels[head]} ({better} is better) of the model trained "
            f"federatedly on each source and scored on real patients it never saw: "
            f"the held-out half of each training hospital's patients, and every "
            f"patient of the hospital that took no part in training. A source is "
            f"worth using when its value is close to the real data's."),
        figure=base64.b64encode(png).decode("ascii"),
        figure_alt=(f"{task.labels[head]} per hospital, one bar per source "
                    f"({better} is better)."),
        training=training)
    card = combined_scorecard(ds, cards, task.use_case, int(run.seed))
    return render_scorecard_html(card, title=title, before_sections=fragment)


def write_report(ds: xr.Dataset, cards: Mapping[str, xr.Dataset], task: Task,
                 setup: list[str], path: str | Path, *, title: str) -> Path:
    path = Path(path)
    path.write_text(render_report(ds, cards, task, setup, title=title),
                    encoding="utf-8")
    return path
