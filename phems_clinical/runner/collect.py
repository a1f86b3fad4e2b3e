"""A multirun's runs in one Dataset: ``phems run -m seed=0,1,2 federation.dp.
epsilon=1,4,16`` ends by writing ``results.nc``, ``summary.csv`` and
``sweep.png`` into the sweep directory (Hydra callback :class:`CollectSweep`,
configured in ``configs/config.yaml``; also ``python -m phems_clinical.runner.
collect DIR``).

Each run's ``results.nc`` gains one dimension per swept setting (named after the
override with dots as underscores, e.g. ``federation_dp_epsilon``; ``seed``
already is one), and the runs are merged with an outer join: a value a run did
not produce (a site that did not exist with fewer sites) is NaN.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import yaml
from hydra.experimental.callback import Callback

from phems_clinical.runner.results import held_out_site


def _value(text: str) -> Any:
    v = yaml.safe_load(text)
    return np.nan if v is None else v


def _overrides(job: Path) -> dict[str, Any]:
    path = job / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text()) if path.exists() else []
    out = {}
    for item in items or []:
        k, _, v = str(item).lstrip("+~").partition("=")
        out[k] = _value(v)
    return out


def collect(sweep_dir: str | Path) -> xr.Dataset:
    """Merge the runs under ``sweep_dir``; writes and returns ``results.nc``."""
    sweep = Path(sweep_dir)
    jobs = sorted(
        (p.parent for p in sweep.glob("*/results.nc")),
        key=lambda p: (len(p.name), p.name),
    )
    if not jobs:
        raise FileNotFoundError(f"{sweep}: no run with a results.nc")
    overrides = [_overrides(j) for j in jobs]
    keys = sorted({k for o in overrides for k in o})
    swept = [
        k for k in keys if k != "seed" and len({repr(o.get(k)) for o in overrides}) > 1
    ]
    parts, rows = [], []
    for job, o in zip(jobs, overrides, strict=True):
        ds = xr.open_dataset(job / "results.nc", engine="h5netcdf").load()
        ds["converged"] = ds["converged"].astype(float)  # NaN where a run lacks it
        held = held_out_site(ds)
        head = ds.utility_metric.values[0]
        for s in ds.source.values:
            rows.append(
                {
                    "run": job.name,
                    **{k: o.get(k) for k in keys},
                    "source": s,
                    "seed": int(ds.seed.values[0]),
                    "held_out_hospital": str(held),
                    f"{head} at the held-out hospital": float(
                        ds.utility.isel(seed=0).sel(
                            source=s, site=held, utility_metric=head
                        )
                    ),
                    "train_epsilon": float(ds.train_epsilon.isel(seed=0).sel(source=s)),
                }
            )
        # a site's role (held-out hospital or not) can change with the setting
        ds = ds.reset_coords("site_role").expand_dims(
            {k.replace(".", "_"): [o.get(k)] for k in swept}
        )
        ds.attrs = {k: v for k, v in ds.attrs.items() if k != "holdout_site"}
        parts.append(ds)
    merged = xr.merge(
        parts, join="outer", compat="no_conflicts", combine_attrs="drop_conflicts"
    )
    merged.attrs["swept"] = ", ".join(swept + ["seed"])
    merged.to_netcdf(sweep / "results.nc", engine="h5netcdf")
    summary = pd.DataFrame(rows)
    summary.to_csv(sweep / "summary.csv", index=False)
    sweep_figure(summary, swept, sweep / "sweep.png")
    return merged


def sweep_figure(summary: pd.DataFrame, swept: list[str], path: Path) -> None:
    """The headline score at the held-out hospital per swept setting (mean over
    seeds, bars from the smallest to the largest seed's value), one bar per
    source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score = [c for c in summary.columns if c.endswith("held-out hospital")][0]
    keys = swept or ["seed"]
    label = summary[keys].astype(str).agg(", ".join, axis=1)
    df = summary.assign(setting=label)
    stats = df.groupby(["setting", "source"], sort=False)[score].agg(
        ["mean", "min", "max"]
    )
    settings = list(dict.fromkeys(df["setting"]))
    sources = list(dict.fromkeys(df["source"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(settings) + 2), 3.6))
    width = 0.8 / len(sources)
    for i, src in enumerate(sources):
        st = stats.xs(src, level="source").reindex(settings)
        x = np.arange(len(settings)) + i * width
        ax.bar(
            x,
            st["mean"],
            width,
            label=src,
            yerr=[st["mean"] - st["min"], st["max"] - st["mean"]],
            capsize=2,
        )
    ax.set_xticks(
        np.arange(len(settings)) + 0.4 - width / 2, settings, fontsize=7, rotation=20
    )
    ax.set_xlabel(", ".join(keys), fontsize=8)
    ax.set_ylabel(score, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class CollectSweep(Callback):
    """Hydra callback: :func:`collect` when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        try:
            ds = collect(sweep)
        except FileNotFoundError as e:  # every run failed: nothing to merge
            print(f"[phems run] {e}", flush=True)
            return
        print(
            f"[phems run] {ds.sizes['seed']} seed(s); swept: {ds.attrs['swept']}"
            f"; merged into {sweep / 'results.nc'} and summary.csv",
            flush=True,
        )


if __name__ == "__main__":
    print(collect(sys.argv[1]))
