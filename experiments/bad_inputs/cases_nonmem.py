"""Bad NONMEM-style data sets for ``phems fit`` beyond ``cases_fit.py``: the
plausibility limits of ``data_schemas/plausibility.json`` on every column that has
one (in IU/dL after unit conversion, per kg where WT is known), missing values,
comment lines and units. The data set is a small hand-written Advate cohort
(covariates WT, AGE); ``names`` is the row and column the message must name (data
rows 1-based, header excluded)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness import Case

HEADER = "ID,TIME,AMT,RATE,DUR,DV,MDV,EVID,BLQ,LLOQ,WT,AGE,HT"
ROWS = [
    "1,0,2500,-2,0.25,.,1,1,0,.,56,22,175",
    "1,0.5,0,.,.,60,0,0,0,1,56,22,175",
    "1,24,0,.,.,14,0,0,0,1,56,22,175",
    "1,48,0,.,.,3,0,0,0,1,56,22,175",
    "2,0,1000,-2,0.1,.,1,1,0,.,20,6,118",
    "2,1,0,.,.,45,0,0,0,1,20,6,118",
    "2,24,0,.,.,12,0,0,0,1,20,6,118",
    "2,48,0,.,.,2.5,0,0,0,1,20,6,118",
    "3,0,3000,-2,0.25,.,1,1,0,.,70,35,180",
    "3,0.5,0,.,.,55,0,0,0,1,70,35,180",
    "3,24,0,.,.,16,0,0,0,1,70,35,180",
    "3,48,0,.,.,4,0,0,0,1,70,35,180",
]
COLS = HEADER.split(",")


def _data(
    edit: Callable[[list[list[str]]], list[list[str]] | None] | None = None,
    header: str = HEADER,
    *extra: str,
) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        rows = [r.split(",") for r in ROWS]
        if edit is not None:
            rows = edit(rows) or rows
        text = header + "\n" + "\n".join(",".join(r) for r in rows) + "\n"
        (tmp / "d.csv").write_text(text)
        return [
            "fit",
            "--data",
            "d.csv",
            "--model",
            "advate",
            "--method",
            "focei",
            "--out",
            "out",
            *extra,
        ]

    return make


def _cell(row: int, col: str, value: str) -> Callable[[list[list[str]]], None]:
    """Set ``col`` of data row ``row`` (1-based) to ``value``."""

    def edit(rows: list[list[str]]) -> None:
        rows[row - 1][COLS.index(col)] = value

    return edit


def _cells(row: int, **values: str) -> Callable[[list[list[str]]], None]:
    """Set several columns of data row ``row`` (1-based)."""

    def edit(rows: list[list[str]]) -> None:
        for col, value in values.items():
            rows[row - 1][COLS.index(col)] = value

    return edit


def _case(name: str, row: int, col: str, value: str, expect: str = "error") -> Case:
    return Case(
        "phems fit",
        f"data: {name}",
        rf"row {row}\b.*\b{col}\b",
        argv=_data(_cell(row, col, value)),
        expect=expect,
    )


def _drop(col: str) -> Callable[[list[list[str]]], None]:
    i = COLS.index(col)

    def edit(rows):
        for r in rows:
            del r[i]

    return edit


def _iu_ml(rows: list[list[str]]) -> list[list[str]]:
    """Levels and LLOQs in IU/mL (DVUNIT column), the level of row 2 at 6 IU/mL."""
    out = []
    for r in rows:
        r = list(r)
        for c in ("DV", "LLOQ"):
            i = COLS.index(c)
            r[i] = r[i] if r[i] == "." else f"{float(r[i]) / 100:g}"
        out.append(r + ["IU/mL"])
    out[1][COLS.index("DV")] = "6"
    return out


CASES = [
    _case("level 600 IU/dL (above 500)", 2, "DV", "600"),
    _case("level '.' with MDV 0 and BLQ 0", 3, "DV", "."),
    _case("level 'NULL' with MDV 0", 3, "DV", "NULL"),
    _case("level '1e999' (overflows)", 3, "DV", "1e999"),
    Case(
        "phems fit",
        "data: level 0 without BLQ or LLOQ",
        r"row 4\b.*\bDV\b.*BLQ",
        argv=_data(_cells(4, DV="0", LLOQ=".")),
    ),
    _case("LLOQ 0", 4, "LLOQ", "0"),
    _case("LLOQ 50 IU/dL", 4, "LLOQ", "50"),
    _case("dose 1e7 IU for 20 kg", 5, "AMT", "10000000"),
    _case("dose 20000 IU for 20 kg (1000 IU/kg)", 5, "AMT", "20000"),
    _case("dose 'inf'", 5, "AMT", "inf"),
    _case("infusion of 1000 h (DUR)", 5, "DUR", "1000"),
    _case("RATE implying a 1e6 h infusion", 1, "RATE", "0.0025"),
    _case("TIME 2e6 h (over 120 years)", 8, "TIME", "2000000"),
    _case("TIME '08:30'", 7, "TIME", "08:30"),
    _case("AGE 130 y", 6, "AGE", "130"),
    _case("AGE -1 y", 6, "AGE", "-1"),
    _case("WT 0.1 kg", 6, "WT", "0.1"),
    _case("WT 900 kg", 6, "WT", "900"),
    _case("HT 300 cm", 6, "HT", "300"),
    _case("ID ' ' (blank)", 7, "ID", " "),
    _case("MDV 0 on a dose row", 1, "MDV", "0"),
    Case(
        "phems fit",
        "data: levels in IU/mL, one of 6 IU/mL (= 600 IU/dL)",
        r"row 2\b.*\bDV\b.*IU/mL",
        argv=_data(_iu_ml, HEADER + ",DVUNIT"),
    ),
    Case(
        "phems fit",
        "data: DVUNIT IU/dL and IU/mL mixed",
        r"row \d+\b.*\bDVUNIT\b",
        argv=_data(
            lambda rows: [
                r + ["IU/mL" if i == 5 else "IU/dL"] for i, r in enumerate(rows)
            ],
            HEADER + ",DVUNIT",
        ),
    ),
    Case(
        "phems fit",
        "data: no DV column, MDV 0 rows",
        r"\bDV\b.*required column",
        argv=_data(_drop("DV"), ",".join(c for c in COLS if c != "DV")),
    ),
    Case(
        "phems fit",
        "data: no TIME column",
        r"\bTIME\b.*required column",
        argv=_data(_drop("TIME"), ",".join(c for c in COLS if c != "TIME")),
    ),
    Case(
        "phems fit",
        "data: WT column missing (model covariate)",
        r"\bWT\b.*(missing|not)",
        argv=_data(_drop("WT"), ",".join(c for c in COLS if c != "WT")),
    ),
    Case(
        "phems fit",
        "data: column ID twice (case differs)",
        r"\bID\b.*more than once",
        argv=_data(lambda rows: [r + [r[0]] for r in rows], HEADER + ",id"),
    ),
    Case(
        "phems fit",
        "data: level 350 IU/dL (unusual)",
        r"row 2\b.*\bDV\b",
        argv=_data(_cell(2, "DV", "350")),
        expect="warning",
    ),
    Case(
        "phems fit",
        "data: a commented-out record",
        r"row 3\b.*comment",
        argv=_data(_cell(3, "ID", "#1")),
        expect="exclusion",
    ),
]
