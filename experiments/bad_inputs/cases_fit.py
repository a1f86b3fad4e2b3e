"""Bad data rows and failing fits for ``phems fit`` ( options
and paths are in ``cases_cli.py``).

Every case starts from the same small simulated data set (Jivi, Shah et al.
2019: 6 richly sampled patients), changes one thing and fits it by FOCEI. Each
``names`` is the row and column (or option) the message must name; data rows
are 1-based, header excluded, as the reader reports them. Missing values may be
refused or reported as excluded records (``expect="exclusion"``); a fit that
cannot be computed must fail by name and write nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
from harness import Case

_BASE: list[pd.DataFrame] = []


def _base() -> pd.DataFrame:
    if not _BASE:
        import jax

        from phems_clinical.pk.library import load_product
        from phems_clinical.pk.simulate import HospitalSpec, simulate_hospitals

        events, _ = simulate_hospitals(
            jax.random.key(3),
            load_product("jivi"),
            [HospitalSpec("H1", 6, design="rich")],
        )
        _BASE.append(events)
    return _BASE[0].copy()


def _obs(df: pd.DataFrame, k: int = 2) -> int:
    """Index of the ``k``-th observation row (0-based) of the second patient."""
    return int(df.index[(df.EVID == 0) & (df.ID == df.ID.unique()[1])][k])


def _dose(df: pd.DataFrame) -> int:
    """Index of the second patient's first dose row."""
    return int(df.index[(df.EVID == 1) & (df.ID == df.ID.unique()[1])][0])


def _row(which: Callable[[pd.DataFrame], int]) -> int:
    """The row the reader names (1-based, header excluded) for a changed record."""
    return which(_base()) + 1


def _fit(data: str, *extra: str) -> list[str]:
    return [
        "fit",
        "--data",
        data,
        "--model",
        "jivi",
        "--method",
        "focei",
        "--out",
        "out",
        *extra,
    ]


def _set(col: str, value, which=_obs) -> Callable[[Path], list[str]]:
    """Write the base data with ``col`` of one record set to ``value`` (text)."""

    def make(tmp: Path) -> list[str]:
        df = _base()
        df[col] = df[col].astype(object)
        df.loc[which(df), col] = value
        df.to_csv(tmp / "d.csv", index=False)
        return _fit("d.csv")

    return make


def _frame(
    change: Callable[[pd.DataFrame], pd.DataFrame], *extra: str
) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        change(_base()).to_csv(tmp / "d.csv", index=False)
        return _fit("d.csv", *extra)

    return make


def _text(edit: Callable[[str], str | bytes]) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        raw = edit(_base().to_csv(index=False))
        (tmp / "d.csv").write_bytes(raw if isinstance(raw, bytes) else raw.encode())
        return _fit("d.csv")

    return make


def _at(which, col: str) -> str:
    """Regex: the message names the record's row and the column."""
    return rf"row {_row(which)}\b.*\b{col}\b"


def _edit_line(text: str, k: int, edit: Callable[[str], str]) -> str:
    lines = text.splitlines()
    lines[k] = edit(lines[k])
    return "\n".join(lines) + "\n"


def _zeros_not_blq(df: pd.DataFrame) -> pd.DataFrame:
    idx = df.index[(df.EVID == 0) & (df.ID == df.ID.unique()[1])][-3:]
    df.loc[idx, "DV"] = 0.0
    return df


def _only_doses(df: pd.DataFrame) -> pd.DataFrame:
    """A seventh patient (ID 99) with a dose and no level."""
    extra = df[(df.ID == df.ID.unique()[0]) & (df.EVID == 1)].assign(ID=99)
    return pd.concat([df, extra], ignore_index=True)


def _rate_disagrees(df: pd.DataFrame) -> pd.DataFrame:
    df["RATE"] = 0.0
    i = _dose(df)
    df.loc[i, "RATE"] = df.loc[i, "AMT"] / (df.loc[i, "DUR"] * 10)
    return df


def _bad_start_model(tmp: Path) -> list[str]:
    """A model file whose start values overflow the objective (CL 1e300 dL/h)."""
    import yaml

    from phems_clinical.pk.library import load_product
    from phems_clinical.pk.spec import to_spec

    spec = to_spec(load_product("jivi"))
    spec["parameters"]["CL"]["value"] = 1e300
    spec["parameters"]["CL"].pop("upper", None)
    (tmp / "m.yaml").write_text(yaml.safe_dump(spec))
    _base().to_csv(tmp / "d.csv", index=False)
    return [
        "fit",
        "--data",
        "d.csv",
        "--model",
        "m.yaml",
        "--method",
        "focei",
        "--out",
        "out",
    ]


C = "phems fit"
CASES = [
    # ---- missing values: never a number
    Case(
        C,
        "empty DV on an observation row",
        _at(_obs, "DV"),
        _set("DV", ""),
        expect="exclusion",
    ),
    Case(
        C,
        "DV 'NA' on an observation row",
        _at(_obs, "DV"),
        _set("DV", "NA"),
        expect="exclusion",
    ),
    Case(
        C,
        "DV 'nan' on an observation row",
        _at(_obs, "DV"),
        _set("DV", "nan"),
        expect="exclusion",
    ),
    Case(C, "no DV column at all", r"\bDV\b", _frame(lambda d: d.drop(columns="DV"))),
    Case(C, "empty AMT on a dose row", _at(_dose, "AMT"), _set("AMT", "", _dose)),
    Case(C, "empty TIME", _at(_obs, "TIME"), _set("TIME", "")),
    Case(C, "empty ID", rf"row {_row(_obs)}\b.*\bID\b", _set("ID", "")),
    Case(
        C,
        "empty covariate (VWF) on one row",
        r"\bVWF\b",
        _set("VWF", ""),
        expect="warning",
    ),
    # ---- extreme values (were: a NaN objective marked converged)
    Case(C, "DV 1e308", _at(_obs, "DV"), _set("DV", "1e308")),
    Case(C, "DV inf", _at(_obs, "DV"), _set("DV", "inf")),
    Case(C, "DV -5", _at(_obs, "DV"), _set("DV", "-5")),
    Case(C, "AMT 1e308", _at(_dose, "AMT"), _set("AMT", "1e308", _dose)),
    Case(C, "AMT -1000", _at(_dose, "AMT"), _set("AMT", "-1000", _dose)),
    Case(C, "DUR 1e6 h", _at(_dose, "DUR"), _set("DUR", "1e6", _dose)),
    Case(C, "TIME 1e300 h", _at(_obs, "TIME"), _set("TIME", "1e300")),
    Case(C, "TIME -3 h", _at(_obs, "TIME"), _set("TIME", "-3")),
    Case(C, "AGE 500 y", r"\bAGE\b", _set("AGE", "500")),
    Case(C, "WT 0 kg", r"\bWT\b", _set("WT", "0")),
    Case(C, "VWF 1e308 (covariate overflow)", r"\bVWF\b", _set("VWF", "1e308")),
    Case(
        C,
        "three levels of 0 not marked BLQ",
        r"\bBLQ\b|\bDV\b",
        _frame(_zeros_not_blq),
        expect="warning",
    ),
    Case(
        C,
        "levels in IU/mL in a file declared IU/dL",
        r"\bDV\b|IU/mL",
        _frame(lambda d: d.assign(DV=d.DV / 100), "--dv-unit", "IU/dL"),
        expect="warning",
    ),
    # ---- codes and limits
    Case(C, "EVID 7", _at(_obs, "EVID"), _set("EVID", "7")),
    # the NONMEM convention of writing the LLOQ in DV: accepted with a warning
    Case(
        C,
        "BLQ 1 without LLOQ",
        _at(_obs, "LLOQ"),
        _frame(
            lambda d: d.assign(
                BLQ=d.BLQ.where(d.index != _obs(d), 1),
                LLOQ=d.LLOQ.where(d.index != _obs(d), float("nan")),
            )
        ),
        expect="warning",
    ),
    Case(C, "LLOQ -1", _at(_obs, "LLOQ"), _set("LLOQ", "-1")),
    Case(
        C,
        "RATE disagrees with DUR",
        _at(_dose, "DUR") + r"|RATE",
        _frame(_rate_disagrees),
    ),
    Case(
        C,
        "a patient with doses only",
        r"\bID 99\b",
        _frame(_only_doses),
        expect="exclusion",
    ),
    # ---- the file itself
    Case(C, "empty file", r"d\.csv|--data|empty", _text(lambda s: "")),
    Case(
        C,
        "header only",
        r"d\.csv|--data|no (usable )?(rows|records|subject)",
        _text(lambda s: s.splitlines()[0] + "\n"),
    ),
    Case(
        C, "not UTF-8", r"(?i)utf-8|encod|d\.csv", _text(lambda s: s.encode("utf-16"))
    ),
    Case(
        C,
        "a row with too many fields",
        r"row \d+|line \d+",
        _text(lambda s: _edit_line(s, 4, lambda ln: ln + ",9,9")),
    ),
    Case(
        C,
        "DV column twice",
        r"\bDV\b",
        _text(
            lambda s: (
                "\n".join(
                    ln + (",DV" if i == 0 else ",1")
                    for i, ln in enumerate(s.splitlines())
                )
                + "\n"
            )
        ),
    ),
    # ---- a fit that cannot be computed (no model.yaml, exit 2)
    Case(
        C,
        "start values give a non-finite objective",
        r"--model|initial estimates",
        _bad_start_model,
    ),
]
