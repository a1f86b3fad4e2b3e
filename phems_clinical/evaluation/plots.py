"""Goodness-of-fit and visual-predictive-check figures (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _identity(ax, x, y):
    lo = float(np.nanmin([np.nanmin(x), np.nanmin(y), 0.0]))
    hi = float(np.nanmax([np.nanmax(x), np.nanmax(y)]))
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)


def gof_figure(
    dv, pred, ipred, cwres, time, path: Path, *, unit: str = "IU/dL", title: str = ""
) -> Path:
    """Four-panel goodness of fit: DV vs PRED, DV vs IPRED, CWRES vs time and PRED.

    Inputs are flat arrays over quantified (non-BLQ) observations.
    """
    fig, axes = plt.subplots(2, 2, figsize=(9, 8))
    ax = axes[0, 0]
    ax.scatter(pred, dv, s=8, alpha=0.6)
    _identity(ax, pred, dv)
    ax.set(xlabel=f"PRED ({unit})", ylabel=f"DV ({unit})", title="DV vs PRED")
    ax = axes[0, 1]
    ax.scatter(ipred, dv, s=8, alpha=0.6, color="tab:green")
    _identity(ax, ipred, dv)
    ax.set(xlabel=f"IPRED ({unit})", ylabel=f"DV ({unit})", title="DV vs IPRED")
    for ax, x, lab in (
        (axes[1, 0], time, "Time (h)"),
        (axes[1, 1], pred, f"PRED ({unit})"),
    ):
        ax.scatter(x, cwres, s=8, alpha=0.6, color="tab:purple")
        for y in (-2, 0, 2):
            ax.axhline(
                y, color="k", lw=0.8 if y == 0 else 0.5, ls="-" if y == 0 else "--"
            )
        ax.set(xlabel=lab, ylabel="CWRES", title=f"CWRES vs {lab.split(' ')[0]}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def vpc_figure(
    time,
    dv,
    sims,
    path: Path,
    *,
    n_bins: int = 8,
    unit: str = "IU/dL",
    title: str = "Visual predictive check",
) -> Path:
    """Binned VPC: observed 5/50/95th percentiles over simulated 90% bands.

    ``time`` (time after dose) and ``dv`` are flat quantified observations,
    ``sims`` is ``(n_rep, n_obs)`` on the same records. Bins are quantiles of time.
    """
    edges = np.unique(np.quantile(time, np.linspace(0, 1, n_bins + 1)))
    idx = np.clip(np.searchsorted(edges, time, side="right") - 1, 0, len(edges) - 2)
    centres, obs_q, sim_q = [], [], []
    for k in range(len(edges) - 1):
        sel = idx == k
        if sel.sum() < 3:
            continue
        centres.append(np.median(time[sel]))
        obs_q.append(np.percentile(dv[sel], [5, 50, 95]))
        per_rep = np.percentile(sims[:, sel], [5, 50, 95], axis=1)  # (3, n_rep)
        sim_q.append(np.percentile(per_rep, [5, 50, 95], axis=1))  # (3 pct, 3 ci)
    centres = np.array(centres)
    obs_q, sim_q = np.array(obs_q), np.array(sim_q)
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = ("tab:blue", "tab:red", "tab:blue")
    for j, (lab, col) in enumerate(zip(("5th", "50th", "95th"), colours, strict=True)):
        ax.fill_between(
            centres,
            sim_q[:, j, 0],
            sim_q[:, j, 2],
            color=col,
            alpha=0.2,
            label=f"simulated {lab} pct (90% CI)",
        )
        ax.plot(
            centres,
            obs_q[:, j],
            color=col,
            lw=1.5,
            ls="-" if j == 1 else "--",
            label=f"observed {lab} pct",
        )
    ax.scatter(time, dv, s=5, color="grey", alpha=0.4)
    ax.set_yscale("log")
    ax.set(xlabel="Time after dose (h)", ylabel=f"Level ({unit})", title=title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def spread_figure(values, *, ylabel: str, title: str = "") -> bytes:
    """PNG: per group (e.g. data source) every unit's value as a dot (e.g. one per
    hospital and seed) and their mean with a 95 % t-interval.

    ``values``: mapping group -> 1-d array (NaN ignored). The interval is mean +-
    t(0.975, K-1) SD / sqrt(K) over the K finite values (none for K < 2).
    """
    from scipy.stats import t as student_t

    names = list(values)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(names) + 1.5), 3.4))
    for x, name in enumerate(names):
        v = np.asarray(values[name], float)
        v = v[np.isfinite(v)]
        if not v.size:
            continue
        jitter = np.linspace(-0.12, 0.12, v.size) if v.size > 1 else np.zeros(1)
        ax.scatter(x + jitter, v, s=14, color="grey", alpha=0.7, zorder=2)
        m = v.mean()
        h = (
            student_t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
            if v.size > 1
            else 0.0
        )
        ax.errorbar(x + 0.28, m, yerr=h, fmt="o", color="k", capsize=4, zorder=3)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def risk_utility_map(
    points,
    *,
    threshold: float,
    xlabel: str,
    ylabel: str = "residual risk (worst attack)",
) -> bytes:
    """PNG: one marker per source at (utility loss, residual risk) with both
    intervals as error bars, and the risk threshold as a dashed line.

    ``points``: sequence of ``(name, loss, loss_half_width, risk, risk_low,
    risk_high)``; NaN half-widths draw no bar.
    """
    markers = "osD^vP*Xph"
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for k, (name, loss, h, risk, lo, hi) in enumerate(points):
        if not (np.isfinite(loss) and np.isfinite(risk)):
            continue
        xerr = None if not np.isfinite(h) else h
        yerr = (
            None
            if not (np.isfinite(lo) and np.isfinite(hi))
            else [[risk - lo], [hi - risk]]
        )
        ax.errorbar(
            loss,
            risk,
            xerr=xerr,
            yerr=yerr,
            fmt=markers[k % len(markers)],
            ms=7,
            capsize=3,
            label=str(name),
        )
    ax.axhline(threshold, color="#9b1c10", ls="--", lw=1)
    ax.axvline(0.0, color="k", lw=0.6)
    ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(-0.03, 1.03))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


# ------------------------------------------------------------ sources side by side
#: Fewest units (patients, stays, episodes) behind any drawn summary: a bin or a
#: histogram cell with fewer is left out, so no figure shows a value that rests
#: on one or two patients (small-cell suppression; the report may leave the site).
MIN_UNITS = 5
_COLOURS = (
    "#1b1b1b",
    "tab:orange",
    "tab:blue",
    "tab:green",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
)
_STYLES = ("-", "--", ":", "-.")  # sources that coincide stay visible


def _units(df, unit) -> np.ndarray:
    """One key per unit (the tuple of the ``unit`` columns) of every row."""
    import pandas as pd

    cols = [unit] if isinstance(unit, str) else list(unit)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(
            f"unit column(s) {missing} are not columns of the table "
            f"(has {list(df.columns)})"
        )
    return (
        pd.MultiIndex.from_frame(df[cols]).to_numpy()
        if len(cols) > 1
        else df[cols[0]].to_numpy()
    )


def _check_columns(name: str, df, cols) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(
            f"source {name!r}: column(s) {missing} are not in its "
            f"table (has {list(df.columns)})"
        )


def binned_quantiles(
    tables,
    x: str,
    y: str,
    *,
    edges,
    unit,
    quantiles=(0.1, 0.5, 0.9),
    min_units: int = MIN_UNITS,
):
    """Quantiles of ``y`` per bin of ``x``, per source.

    ``tables``: source name -> table with columns ``x``, ``y`` and ``unit``;
    ``edges``: increasing bin edges of ``x`` (bins ``[e_k, e_k+1)``, the last one
    closed); rows with ``y`` or ``x`` missing or outside the edges are not
    counted. Returns a long table: ``source, bin, x_low, x_high, x_mid`` (median
    ``x`` in the bin), ``n`` (rows), ``n_units`` and one column ``q<100 p>`` per
    quantile (numpy's linear interpolation); bins with fewer than ``min_units``
    distinct units are left out.
    """
    import pandas as pd

    edges = np.asarray(edges, float)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(
            f"edges: expected at least 2 increasing values, got {edges.tolist()}"
        )
    qs = [float(q) for q in quantiles]
    if any(not 0.0 <= q <= 1.0 for q in qs):
        raise ValueError(f"quantiles: expected values in [0, 1], got {qs}")
    rows = []
    for name, df in tables.items():
        _check_columns(name, df, [x, y])
        u = _units(df, unit)
        xv = df[x].to_numpy(float)
        yv = df[y].to_numpy(float)
        ok = np.isfinite(xv) & np.isfinite(yv) & (xv >= edges[0]) & (xv <= edges[-1])
        b = np.clip(np.searchsorted(edges, xv, side="right") - 1, 0, edges.size - 2)
        for k in range(edges.size - 1):
            sel = ok & (b == k)
            n_units = len(pd.unique(u[sel])) if sel.any() else 0
            if n_units < min_units:
                continue
            vals = np.quantile(yv[sel], qs)
            rows.append(
                {
                    "source": name,
                    "bin": k,
                    "x_low": edges[k],
                    "x_high": edges[k + 1],
                    "x_mid": float(np.median(xv[sel])),
                    "n": int(sel.sum()),
                    "n_units": int(n_units),
                    **{
                        f"q{round(100 * q):g}": float(v)
                        for q, v in zip(qs, vals, strict=True)
                    },
                }
            )
    cols = ["source", "bin", "x_low", "x_high", "x_mid", "n", "n_units"] + [
        f"q{round(100 * q):g}" for q in qs
    ]
    return pd.DataFrame(rows, columns=cols)


def band_figure(
    tables,
    x: str,
    ys,
    *,
    edges,
    unit,
    xlabel: str,
    ylabels,
    log_y=False,
    title: str = "",
    min_units: int = MIN_UNITS,
) -> bytes:
    """PNG: one panel per column of ``ys``; per source the median of the column
    per bin of ``x`` (line) and its 10-90 % band (shaded), from
    :func:`binned_quantiles`. Only summaries are drawn, never single values.

    ``ylabels``: one label per column; ``log_y``: a bool or one per column.
    """
    ys = [ys] if isinstance(ys, str) else list(ys)
    ylabels = [ylabels] if isinstance(ylabels, str) else list(ylabels)
    logs = [log_y] * len(ys) if isinstance(log_y, bool) else list(log_y)
    if len(ylabels) != len(ys) or len(logs) != len(ys):
        raise ValueError(f"ylabels/log_y: expected one per column {ys}")
    fig, axes = plt.subplots(
        1, len(ys), figsize=(4.6 * len(ys) + 0.6, 3.6), squeeze=False
    )
    for ax, y, lab, log in zip(axes[0], ys, ylabels, logs, strict=True):
        q = binned_quantiles(tables, x, y, edges=edges, unit=unit, min_units=min_units)
        for c, name in enumerate(tables):
            s = q[q.source == name]
            if s.empty:
                continue
            col = _COLOURS[c % len(_COLOURS)]
            ax.fill_between(s.x_mid, s.q10, s.q90, color=col, alpha=0.15, lw=0)
            ax.plot(
                s.x_mid,
                s.q50,
                color=col,
                lw=1.6,
                marker="o",
                ms=3,
                ls=_STYLES[c % len(_STYLES)],
                label=f"{name} (median, 10-90 %)",
            )
        if log:
            ax.set_yscale("log")
        ax.set(xlabel=xlabel, ylabel=lab)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _png(fig)


def occupation(tables, states, times, *, start: str | None = None):
    """State-occupation shares per source at ``times`` (Aalen-Johansen estimator
    of :func:`phems_clinical.evaluation.survival.aalen_johansen_multistate`; Aalen
    & Johansen, Scand J Stat 1978;5:141-150), from each source's sojourn table
    (``state, entry, exit, next_state``; ``CENSORED`` = no transition). Returns
    a long table ``source, time, state, share``; without censoring a share is
    the fraction of episodes in the state at that time."""
    import pandas as pd

    from phems_clinical.evaluation.survival import aalen_johansen_multistate

    states = list(states)
    t = np.asarray(times, float)
    if t.ndim != 1 or t.size < 1 or np.any(np.diff(t) < 0):
        raise ValueError(f"times: expected increasing values, got {t.tolist()}")
    rows = []
    for name, df in tables.items():
        _check_columns(name, df, ["state", "entry", "exit", "next_state"])
        seen = set(df.state.dropna()) | set(df.next_state.dropna())
        bad = sorted(map(str, seen - set(states) - {"CENSORED"}))
        if bad:
            raise ValueError(f"source {name!r}: states {bad} are not among {states}")
        p = aalen_johansen_multistate(df, states, t, start=start)
        rows += [
            {"source": name, "time": float(tk), "state": s, "share": float(p[i, j])}
            for i, tk in enumerate(t)
            for j, s in enumerate(states)
        ]
    return pd.DataFrame(rows, columns=["source", "time", "state", "share"])


def occupation_figure(
    tables, states, times, *, xlabel: str, start: str | None = None, title: str = ""
) -> bytes:
    """PNG: one panel per state, its occupation share over ``times`` per source
    (:func:`occupation`)."""
    occ = occupation(tables, states, times, start=start)
    states = list(states)
    ncol = min(3, len(states))
    nrow = -(-len(states) // ncol)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(3.6 * ncol + 0.4, 2.9 * nrow), squeeze=False
    )
    for ax, s in zip(axes.ravel(), states, strict=False):
        for c, name in enumerate(tables):
            d = occ[(occ.source == name) & (occ.state == s)]
            ax.step(
                d.time,
                d.share,
                where="post",
                color=_COLOURS[c % len(_COLOURS)],
                ls=_STYLES[c % len(_STYLES)],
                lw=1.5,
                label=name,
            )
        ax.set_xscale("symlog", linthresh=7.0)  # the first week in detail
        ax.set(title=s, xlabel=xlabel, ylabel="share of episodes", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(states) :]:
        ax.set_visible(False)
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _png(fig)


def edges_from_bounds(bound) -> np.ndarray:
    """Bin edges from a use case's public profile bound ``(lower, upper, bins)``
    (equal widths) or ``(lower, upper, bins, "log1p")`` (equal on the log1p
    scale)."""
    lo, hi, n = float(bound[0]), float(bound[1]), int(bound[2])
    if len(bound) > 3:
        return np.expm1(np.linspace(np.log1p(lo), np.log1p(hi), n + 1))
    return np.linspace(lo, hi, n + 1)


def covariate_shares(
    tables,
    column: str,
    *,
    unit,
    edges=None,
    categories=None,
    min_units: int = MIN_UNITS,
):
    """Each unit's first value of ``column`` (a per-patient covariate), binned on
    public ``edges`` (bins ``[e_k, e_k+1)``, the last closed; values outside go
    to the nearest end bin) or counted by ``categories``; per source the share of
    units in each cell. Cells with fewer than ``min_units`` units get a NaN
    share (not drawn). Returns ``source, cell, count, share`` (``share`` of the
    source's units with a value)."""
    import pandas as pd

    if (edges is None) == (categories is None):
        raise ValueError(f"{column}: give either edges or categories")
    rows = []
    for name, df in tables.items():
        _check_columns(name, df, [column])
        u = _units(df, unit)
        first = (
            pd.Series(df[column].to_numpy(), index=pd.Index(u))
            .groupby(level=0, sort=False)
            .first()
            .dropna()
        )
        if categories is not None:
            cells = [str(c) for c in categories]
            counts = np.array([(first.astype(str) == c).sum() for c in cells])
        else:
            e = np.asarray(edges, float)
            v = first.to_numpy(float)
            b = np.clip(np.searchsorted(e, v, side="right") - 1, 0, e.size - 2)
            counts = np.bincount(b, minlength=e.size - 1)
            cells = [f"{e[k]:g}-{e[k + 1]:g}" for k in range(e.size - 1)]
        total = max(int(len(first)), 1)
        share = np.where(counts >= min_units, counts / total, np.nan)
        rows += [
            {"source": name, "cell": c, "count": int(n), "share": float(s)}
            for c, n, s in zip(cells, counts, share, strict=True)
        ]
    return pd.DataFrame(rows, columns=["source", "cell", "count", "share"])


def covariate_figure(
    tables,
    columns,
    *,
    unit,
    bins,
    labels=None,
    min_units: int = MIN_UNITS,
    title: str = "",
) -> bytes:
    """PNG: one panel per covariate, the share of units per cell for each source
    side by side (:func:`covariate_shares`). ``bins``: column -> public edges
    (a sequence of numbers) or a category list (strings); ``labels``: column ->
    axis label (unit included)."""
    columns = list(columns)
    labels = labels or {}
    fig, axes = plt.subplots(
        1, len(columns), figsize=(3.8 * len(columns) + 0.6, 3.4), squeeze=False
    )
    names = list(tables)
    width = 0.8 / max(len(names), 1)
    for ax, col in zip(axes[0], columns, strict=True):
        b = bins[col]
        cats = all(isinstance(v, str) for v in b)
        sh = covariate_shares(
            tables,
            col,
            unit=unit,
            min_units=min_units,
            **({"categories": b} if cats else {"edges": b}),
        )
        cells = list(dict.fromkeys(sh.cell))
        for c, name in enumerate(names):
            s = sh[sh.source == name].set_index("cell").reindex(cells)
            ax.bar(
                np.arange(len(cells)) + (c - (len(names) - 1) / 2) * width,
                s.share.to_numpy(float),
                width,
                color=_COLOURS[c % len(_COLOURS)],
                alpha=0.8,
                label=name,
            )
        ax.set_xticks(
            range(len(cells)), cells, rotation=60 if len(cells) > 5 else 0, fontsize=7
        )
        ax.set(xlabel=labels.get(col, col), ylabel="share of units")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _png(fig)
