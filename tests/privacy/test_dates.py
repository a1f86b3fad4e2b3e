"""Per-patient date shifting (mandatory for PK and hourly data)."""

import jax
import numpy as np
import pandas as pd
import pytest

from phems_clinical.privacy.dates import (
    MARKER,
    DateShiftError,
    already_shifted,
    draw_shifts,
    shift_dates,
)


def _hourly(n_pat=200, hours=6):
    """Hourly rows with ns-resolution times, plus birth and admission per patient."""
    rng = np.random.default_rng(1)
    pid = np.repeat(np.arange(n_pat), hours)
    admit = pd.to_datetime("2022-01-01") + pd.to_timedelta(
        rng.integers(0, 365 * 24 * 3600, n_pat), unit="s"
    )
    t = (
        admit[pid]
        + pd.to_timedelta(np.tile(np.arange(hours), n_pat), unit="h")
        + pd.to_timedelta(rng.integers(0, 10**9, pid.size), unit="ns")
    )
    birth = admit - pd.to_timedelta(rng.integers(0, 6000, n_pat), unit="D")
    df = pd.DataFrame(
        {
            "person_id": pid,
            "time": t,
            "birth": birth[pid],
            "hr": rng.normal(120, 10, pid.size),
        }
    )
    return df.sample(frac=1.0, random_state=3)  # row order must not matter


def _rel(df, cols):
    """Every pairwise interval (int ns) between date cells of each patient."""
    out = {}
    for p, g in df.groupby("person_id"):
        v = np.concatenate(
            [g[c].to_numpy("datetime64[ns]").view(np.int64) for c in cols]
        )
        out[p] = v[:, None] - v[None, :]
    return out


def test_intervals_preserved_to_the_ns_and_shifts_valid(key):
    df = _hourly()
    out, shifts = shift_dates(key, df, "person_id", ["time", "birth"], max_days=30)
    before, after = _rel(df, ["time", "birth"]), _rel(out, ["time", "birth"])
    assert all(np.array_equal(before[p], after[p]) for p in before)
    assert shifts.index.tolist() == list(range(200)) and shifts.dtype == np.int64
    assert (shifts != 0).all() and shifts.abs().max() <= 30
    assert shifts.nunique() > 40  # 60 possible values, 200 patients
    moved = (out["time"] - df["time"]).dt.total_seconds() / 86400
    assert np.array_equal(moved.to_numpy(), df["person_id"].map(shifts).to_numpy())
    assert out["hr"].equals(df["hr"]) and out.index.equals(df.index)
    assert out["time"].dt.time.equals(df["time"].dt.time)  # whole days


def test_shifts_are_secret_by_default_key_derived_on_request(key):
    """The shift table is a secret key: the same (public) key draws new shifts,
    so a recipient who knows the seed cannot undo them. from_key=True keeps the
    deterministic draw (row order does not matter; another key differs)."""
    df = _hourly(50)
    _, s1 = shift_dates(key, df, "person_id", ["time"])
    _, s2 = shift_dates(key, df, "person_id", ["time"])
    _, s_key = shift_dates(key, df, "person_id", ["time"], from_key=True)
    assert (s1 != s2).mean() > 0.9 and (s1 != s_key).mean() > 0.9
    a, sa = shift_dates(key, df, "person_id", ["time"], from_key=True)
    b, sb = shift_dates(key, df.iloc[::-1], "person_id", ["time"], from_key=True)
    assert sa.equals(sb) and a["time"].equals(b["time"].loc[a.index])
    _, sc = shift_dates(jax.random.key(1), df, "person_id", ["time"], from_key=True)
    assert (sa != sc).mean() > 0.9


@pytest.mark.parametrize("from_key", [False, True])
def test_draws_cover_the_range_without_zero(key, from_key):
    s = draw_shifts(key, np.arange(20_000), max_days=3, from_key=from_key)
    counts = s.value_counts().sort_index()
    assert counts.index.tolist() == [-3, -2, -1, 1, 2, 3]
    assert counts.min() > 3000  # uniform: about 3333 each


def test_calendar_months_change(key):
    df = _hourly(300, hours=1)
    out, _ = shift_dates(key, df, "person_id", ["time"])
    assert (out["time"].dt.month != df["time"].dt.month).mean() > 0.7
    # shifts are never 0 days, so every date moves; a fresh secret shift of about
    # +-365 days may land on the same day of the year (P ~ 1/180 per patient)
    assert (out["time"] != df["time"]).all()
    assert (out["time"].dt.dayofyear != df["time"].dt.dayofyear).mean() > 0.95


def test_idempotent_with_shift_table_and_marker(key):
    df = _hourly(30)
    once, table = shift_dates(key, df, "person_id", ["time", "birth"])
    assert already_shifted(once) == ["birth", "time"] and already_shifted(df) == []
    # the same table applied to the raw data again, under another key -> same result
    again, t2 = shift_dates(
        jax.random.key(9), df, "person_id", ["time", "birth"], existing=table
    )
    assert again.equals(once) and t2.equals(table)
    # running on shifted output does not shift twice
    twice, _ = shift_dates(key, once, "person_id", ["time", "birth"])
    assert twice.equals(once)
    # a second table of the same site reuses the shifts; new patients get new ones
    pk = pd.DataFrame(
        {
            "person_id": [0, 0, 999],
            "dose_time": pd.to_datetime(
                ["2022-03-01 08:00", "2022-03-01 20:30", "2022-05-05 09:15"]
            ),
        }
    )
    pk_out, t3 = shift_dates(key, pk, "person_id", ["dose_time"], existing=table)
    assert t3.loc[table.index].equals(table) and t3[999] != 0
    assert (pk_out["dose_time"][0] - pk["dose_time"][0]).days == table[0]


def test_partial_marker_needs_table(key):
    df = _hourly(10)
    once, table = shift_dates(key, df, "person_id", ["time"])
    with pytest.raises(DateShiftError, match="already shifted"):
        shift_dates(key, once, "person_id", ["time", "birth"])
    both, _ = shift_dates(key, once, "person_id", ["time", "birth"], existing=table)
    ref, _ = shift_dates(key, df, "person_id", ["time", "birth"], existing=table)
    assert both.equals(ref) and both.attrs[MARKER]["columns"] == ["birth", "time"]


def test_keeps_datetime_resolution_and_nat(key):
    df = pd.DataFrame(
        {
            "id": ["a", "a", "b"],
            "t": pd.to_datetime(["2020-01-01", None, "2020-06-01"]).astype(
                "datetime64[s]"
            ),
        }
    )
    out, shifts = shift_dates(key, df, "id", ["t"])
    assert out["t"].dtype == df["t"].dtype and pd.isna(out["t"][1])
    assert shifts.index.tolist() == ["a", "b"]


def test_bad_input_is_named(key):
    df = _hourly(3)
    with pytest.raises(DateShiftError, match="id column 'pid' is missing"):
        shift_dates(key, df, "pid", ["time"])
    with pytest.raises(DateShiftError, match="date column 'admit' is missing"):
        shift_dates(key, df, "person_id", ["admit"])
    s = df.assign(time=df["time"].astype(str))
    with pytest.raises(DateShiftError, match="'time' has dtype object; expected"):
        shift_dates(key, s, "person_id", ["time"])
    with pytest.raises(DateShiftError, match="max_days"):
        shift_dates(key, df, "person_id", ["time"], max_days=0)
    with pytest.raises(DateShiftError, match="list of column names"):
        shift_dates(key, df, "person_id", "time")
    bad = pd.Series({0: 3, 1: 0, 2: 5})
    with pytest.raises(DateShiftError, match="id 1 is 0"):
        shift_dates(key, df, "person_id", ["time"], existing=bad)
    with pytest.raises(DateShiftError, match="missing at row"):
        shift_dates(key, df.assign(person_id=np.nan), "person_id", ["time"])
