#!/usr/bin/env python
"""PICU sepsis and cardiac pathway benchmark: simulate, write to and load from OMOP
(DuckDB), and train in process. Prints one markdown table, device named.

Run from the repository root (writes ``experiments/benchmarks/usecases_<dev>.md``):

    python experiments/benchmarks/bench_usecases.py          # 10,000 stays, 5,000 ep.
    python experiments/benchmarks/bench_usecases.py --quick  # 1,000 stays, 500 ep.

Rows:

* **PICU, N stays** over the simulator's three default hospitals (sizes scaled to
  N): simulation; writing each hospital's OMOP tables to its own DuckDB file;
  reading them back with the loaders' validation; the hourly table
  (``hourly_table``); Phoenix scoring and onsets; feature/sequence tensors.
* **sepsis training, per epoch**: one federated round with one full-batch local
  step per site = one pass over every training stay (FedAvg over the three
  hospitals, vmapped, in process); cold = first round (tracing + XLA), warm =
  median of the next rounds. Logistic model (windowed features) and TCN (hourly
  sequence, 32 channels, 4 blocks), stays truncated to ``--max-hours``.
* **cardiac, M episodes** over the three default hospitals: simulation, DuckDB
  write, load + validation, OMOP -> sojourn table, one federated epoch (FedAdam,
  one local step), and the pooled Newton fit for comparison.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _bench  # noqa: E402  (experiments/benchmarks/_bench.py)

_bench.choose_device()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from _bench import Timed, log  # noqa: E402

HERE = Path(__file__).resolve().parent

from phems_clinical.data.cardiac import simulate_sites as cardiac_sites  # noqa: E402
from phems_clinical.data.cardiac.pathways import episodes  # noqa: E402
from phems_clinical.data.omop import (  # noqa: E402
    connect,
    create_cdm,
    read_tables,
    write_tables,
)
from phems_clinical.data.picu import DEFAULT_SITES, hourly_table  # noqa: E402
from phems_clinical.data.picu import simulate_sites as picu_sites  # noqa: E402
from phems_clinical.evaluation import cardiac_eval as ce  # noqa: E402
from phems_clinical.evaluation import sepsis_eval as se  # noqa: E402
from phems_clinical.federation.engine import run_federated  # noqa: E402
from phems_clinical.federation.strategies import (  # noqa: E402
    fedavg,
    objective_from_loss,
)
from phems_clinical.models import scores  # noqa: E402
from phems_clinical.models import sepsis as sm  # noqa: E402


def _seconds(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def _write(folder: Path, tables_by_site: dict) -> None:
    for site, tables in tables_by_site.items():
        with connect(folder / f"{site}.duckdb") as store:
            create_cdm(store)
            write_tables(store, tables)


def _read(folder: Path, sites) -> dict:
    out = {}
    for site in sites:
        with connect(folder / f"{site}.duckdb", read_only=True) as store:
            out[site] = read_tables(store)
    return out


def _epochs(alg, sites, n_rounds: int) -> tuple[float, float, float]:
    """(cold s, compile s, warm median s per round) of ``alg`` over ``sites``."""
    times = []

    def on_round(rec, server):
        times.append(rec.seconds)

    t = Timed(
        run_federated,
        jax.random.key(0),
        alg,
        sites,
        max_rounds=n_rounds,
        on_round=on_round,
    )
    return times[0], t.compile_s, statistics.median(times[1:])


def _central_epoch(loss, x0, pooled) -> float:
    """Warm seconds of one full-batch gradient over all pooled stays (jitted, no
    federation): the reference for the federated epoch."""
    data = jax.tree.map(jax.numpy.asarray, pooled.data)
    vg = jax.jit(
        lambda x, d: jax.tree.map(
            lambda a: a.sum(0),
            jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0))(x, d),
        )
    )
    jax.block_until_ready(vg(x0, data))
    return statistics.median(Timed(vg, x0, data).seconds for _ in range(3))


def bench_picu(n_stays: int, max_hours: int, n_rounds: int, rows: list) -> None:
    total = sum(c["n_stays"] for c in DEFAULT_SITES.values())
    cfg = {
        name: {**c, "n_stays": max(10, round(c["n_stays"] * n_stays / total))}
        for name, c in DEFAULT_SITES.items()
    }
    n = sum(c["n_stays"] for c in cfg.values())
    cohorts, s_sim = _seconds(picu_sites, jax.random.key(1), cfg)
    n_meas = sum(len(c.tables["measurement"]) for c in cohorts.values())
    rows.append(
        (
            f"PICU: simulate {n:,} stays, 3 hospitals",
            f"{s_sim:.1f} s",
            f"{n_meas:,} OMOP measurement rows",
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        _, s_w = _seconds(_write, Path(tmp), {k: c.tables for k, c in cohorts.items()})
        rows.append(
            ("PICU: write OMOP, one DuckDB file per hospital", f"{s_w:.1f} s", "")
        )
        del cohorts
        loaded, s_r = _seconds(_read, Path(tmp), list(cfg))
    excl = sum(len(r.exclusions) for _, r in loaded.values())
    rows.append(
        (
            "PICU: load + validate (read_tables)",
            f"{s_r:.1f} s",
            f"{excl} records excluded",
        )
    )
    hourly, s_h = _seconds(
        lambda: {k: hourly_table(t, site=k) for k, (t, _) in loaded.items()}
    )
    n_rows = sum(len(h) for h in hourly.values())
    rows.append(("PICU: hourly table", f"{s_h:.1f} s", f"{n_rows:,} stay-hours"))
    loaded.clear()  # free the OMOP tables (RAM)
    onsets, s_p = _seconds(
        lambda: {k: scores.sepsis_onset(h) for k, h in hourly.items()}
    )
    n_sep = sum(int(np.isfinite(o).sum()) for o in onsets.values())
    rows.append(
        (
            "PICU: Phoenix scores and onsets",
            f"{s_p:.1f} s",
            f"{n_sep:,} stays with Phoenix sepsis ({n_sep / n:.1%})",
        )
    )
    log(f"PICU data done ({n_rows} rows)")
    for model in (sm.LOGISTIC, sm.TCN):
        prep, s_f = _seconds(
            se.prepare_sites,
            hourly,
            onsets,
            held_out=[],
            model=model,
            max_hours=max_hours,
        )
        x0, unravel = sm.init_params(jax.random.key(2), prep.n_features, model)
        alg = fedavg(
            objective_from_loss(sm.make_loss(unravel)),
            x0,
            learning_rate=0.05,
            local_steps=1,
            max_rounds=n_rounds,
        )
        sites = [jax.tree.map(jax.numpy.asarray, s) for s in prep.train]
        cold, comp, warm = _epochs(alg, sites, n_rounds)
        ref = _central_epoch(sm.make_loss(unravel), x0, sm.pool_examples(prep.train))
        shape = tuple(prep.train[0].data["x"].shape)
        rows.append(
            (
                f"sepsis {model}: features/tensors",
                f"{s_f:.1f} s",
                f"3 x {shape} (stays, hours, features), {x0.size:,} parameters",
            )
        )
        rows.append(
            (
                f"sepsis {model}: one epoch (FedAvg round, 3 hospitals)",
                f"**{warm:.2f} s** warm",
                f"first round {cold:.1f} s; {comp:.1f} s XLA compilation in the run",
            )
        )
        rows.append(
            (
                f"sepsis {model}: reference, the same full-batch gradient "
                "pooled in one process",
                f"{ref:.2f} s",
                f"federated / pooled = {warm / ref:.2f}",
            )
        )
        del prep, sites, alg  # free one model's tensors before the next (RAM)
        gc.collect()
        log(f"sepsis {model} done")


def bench_cardiac(n_episodes: int, n_rounds: int, rows: list) -> None:
    per = max(10, n_episodes // 3)
    cohorts, s_sim = _seconds(cardiac_sites, jax.random.key(3), n_episodes=per)
    n_rows = sum(len(df) for c in cohorts.values() for df in c.tables.values())
    rows.append(
        (
            f"cardiac: simulate {3 * per:,} episodes, 3 hospitals",
            f"{s_sim:.1f} s",
            f"{n_rows:,} OMOP rows",
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        _, s_w = _seconds(_write, Path(tmp), {k: c.tables for k, c in cohorts.items()})
        rows.append(("cardiac: write OMOP (DuckDB)", f"{s_w:.1f} s", ""))
        loaded, s_r = _seconds(_read, Path(tmp), list(cohorts))
    rows.append(("cardiac: load + validate", f"{s_r:.1f} s", ""))
    soj, s_e = _seconds(
        lambda: {k: episodes(t, site=k)[0] for k, (t, _) in loaded.items()}
    )
    rows.append(
        (
            "cardiac: OMOP -> sojourns",
            f"{s_e:.1f} s",
            f"{sum(len(s) for s in soj.values()):,} sojourns",
        )
    )
    times = []
    t = Timed(
        ce.train_federated,
        jax.random.key(0),
        soj,
        strategy="fedadam",
        learning_rate=0.1,
        rounds=n_rounds,
        on_round=lambda rec, server: times.append(rec.seconds),
    )
    rows.append(
        (
            "cardiac: one epoch (FedAdam round, 3 hospitals)",
            f"**{statistics.median(times[1:]) * 1e3:.1f} ms** warm",
            f"first round {times[0]:.1f} s; {t.compile_s:.1f} s XLA compilation "
            "in the run",
        )
    )
    _, s_n = _seconds(ce.pooled_fit, soj)
    rows.append(("cardiac: pooled Newton fit (reference)", f"{s_n:.1f} s", ""))
    log("cardiac done")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--stays", type=int, default=None)
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--max-hours", type=int, default=168)
    ap.add_argument("--rounds", type=int, default=4, help="rounds timed per model")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    n_stays = args.stays or (1000 if args.quick else 10_000)
    n_episodes = args.episodes or (500 if args.quick else 5000)
    rows: list = []
    t0 = time.perf_counter()
    bench_picu(n_stays, args.max_hours, args.rounds, rows)
    bench_cardiac(n_episodes, args.rounds, rows)
    dev, tag = _bench.device_line()
    lines = [
        f"# Use-case benchmark ({_dt.date.today()})",
        "",
        f"Device: {dev}. Command: `python {shlex.join(sys.argv)}`. "
        f"Total {time.perf_counter() - t0:.0f} s.",
        "",
        "| case | time | notes |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    out = (
        Path(args.out)
        if args.out
        else HERE / (f"usecases_{tag}{'_quick' if args.quick else ''}.md")
    )
    out.write_text(text)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
