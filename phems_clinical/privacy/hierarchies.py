"""Generalisation hierarchies for quasi-identifiers, as data.

A :class:`Hierarchy` maps original values to coarser labels, one level at a time:
level 0 is the original value, levels ``1 .. height - 1`` are the steps given in
``levels`` and level ``height`` is the suppressed label ``'*'``. Every step is a
function of the *original* value, vectorised over a pandas Series. Missing values
stay missing below the top level and become ``'*'`` at the top; the anonymiser
decides what to do with them.

A value outside a hierarchy's domain (a negative age, a weight above the upper
bound, an unmapped diagnosis) is an error (:class:`HierarchyError`, naming the
values and rows), never silently suppressed.

References: Sweeney L (2002) k-anonymity, IJUFKS 10:557 (generalisation
hierarchies); Prasser F, Kohlmayer F (2015) "Putting statistical disclosure control
into practice: the ARX data anonymization tool" (hierarchies as data, monotone
lattice).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

SUPPRESSED = "*"

Level = Callable[[pd.Series], pd.Series] | Mapping
"""One generalisation step: a vectorised function of the original values, or a map
from original value to label."""

_DAYS_PER_YEAR = 365.25  # Julian year: whole years = floor(days / 365.25)
_DAYS_PER_MONTH = _DAYS_PER_YEAR / 12  # 30.4375 (exact in binary)
_UNIT_DAYS = {"days": 1.0, "months": _DAYS_PER_MONTH, "years": _DAYS_PER_YEAR}


class HierarchyError(ValueError):
    """A hierarchy does not cover some values (or is ill-defined).

    ``uncovered`` holds every uncovered value, indexed by its row label.
    """

    def __init__(self, message: str, uncovered: pd.Series | None = None):
        super().__init__(message)
        self.uncovered = uncovered


@dataclass(frozen=True)
class Hierarchy:
    """A generalisation hierarchy (level 0 = original, level ``height`` = '*').

    ``levels`` are the intermediate steps (levels 1 .. height - 1); ``covers`` maps
    the non-missing original values to a boolean coverage mask (default: the keys
    of the mapping levels, or everything when all levels are functions).
    """

    name: str
    levels: tuple[Level, ...]
    covers: Callable[[pd.Series], np.ndarray] | None = None

    @property
    def height(self) -> int:
        """Index of the top level ('*'); the hierarchy has ``height + 1`` levels."""
        return len(self.levels) + 1

    def mask(self, values) -> np.ndarray:
        """Boolean mask of covered values (missing values count as covered)."""
        s = _series(values)
        present = s.notna().to_numpy()
        ok = np.ones(len(s), dtype=bool)
        if present.any():
            ok[present] = np.asarray(self._covers(s[present]), dtype=bool)
        return ok

    def _covers(self, s: pd.Series) -> np.ndarray:
        if self.covers is not None:
            return self.covers(s)
        ok = np.ones(len(s), dtype=bool)
        for lev in self.levels:
            if isinstance(lev, Mapping):
                ok &= s.isin(list(lev.keys())).to_numpy()
        return ok

    def generalise(self, values, level: int) -> pd.Series:
        """Labels of ``values`` at ``level`` (a Series with the input's index).

        Raises :class:`HierarchyError` if any non-missing value is not covered.
        """
        if not isinstance(level, int | np.integer) or not 0 <= level <= self.height:
            raise HierarchyError(
                f"hierarchy '{self.name}': level {level!r} is not an integer in "
                f"0..{self.height}"
            )
        s = _series(values)
        check_covers(self, s)
        if level == 0:
            return s.copy()
        if level == self.height:
            return pd.Series(SUPPRESSED, index=s.index, name=s.name, dtype=object)
        out = pd.Series(None, index=s.index, name=s.name, dtype=object)
        present = s.notna()
        if present.any():
            lev = self.levels[level - 1]
            sub = s[present]
            lab = sub.map(lev) if isinstance(lev, Mapping) else lev(sub)
            out[present] = np.asarray(lab, dtype=object)
        return out


def _series(values) -> pd.Series:
    return values if isinstance(values, pd.Series) else pd.Series(values)


def check_covers(hierarchy: Hierarchy, values) -> None:
    """Raise :class:`HierarchyError` listing *every* value the hierarchy misses."""
    s = _series(values)
    ok = hierarchy.mask(s)
    if ok.all():
        return
    bad = s[~ok]
    shown = ", ".join(f"{v!r} (row {i!r})" for i, v in bad.iloc[:20].items())
    more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
    raise HierarchyError(
        f"hierarchy '{hierarchy.name}' does not cover {len(bad)} value(s) in column "
        f"{s.name!r}: {shown}{more}",
        uncovered=bad,
    )


def check_nested(hierarchy: Hierarchy, values) -> None:
    """Raise :class:`HierarchyError` unless each level coarsens the one below.

    Nesting (every label of level l lies within one label of level l + 1) is what
    makes k-anonymity monotone over the lattice (Prasser & Kohlmayer 2015).
    """
    s = _series(values).dropna()
    prev = s
    for lvl in range(1, hierarchy.height):
        cur = hierarchy.generalise(s, lvl)
        pairs = pd.DataFrame({"lo": prev.to_numpy(), "hi": cur.to_numpy()})
        n_up = pairs.drop_duplicates().groupby("lo", sort=False)["hi"].nunique()
        split = n_up[n_up > 1]
        if len(split):
            raise HierarchyError(
                f"hierarchy '{hierarchy.name}': level {lvl} is not nested in level "
                f"{lvl - 1}: {list(split.index[:10])!r} map to several labels"
            )
        prev = cur


# --------------------------------------------------------------------------- ages
_PAEDIATRIC_EDGES = np.array([0.0, 28.0, 1, 5, 10, 15, 18])
_PAEDIATRIC_EDGES[2:] *= _DAYS_PER_YEAR
_PAEDIATRIC_LABELS = ["0-27 d", "1-11 m", "1-4 y", "5-9 y", "10-14 y", "15-17 y"]
_NESTED_LABELS = ["0-11 m", "0-11 m", "1-9 y", "1-9 y", "10-17 y", "10-17 y"]
_ICH_EDGES = np.array(
    [0.0, 28.0, 2 * _DAYS_PER_YEAR, 12 * _DAYS_PER_YEAR, 18 * _DAYS_PER_YEAR]
)
_ICH_LABELS = [
    "term newborn 0-27 d",
    "infant/toddler 28 d-23 m",
    "child 2-11 y",
    "adolescent 12-17 y",
]
_ADULT_DAYS = 18 * _DAYS_PER_YEAR  # 6574.5 d


def _age_days(s: pd.Series, unit: str, name: str) -> np.ndarray:
    if not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
        raise HierarchyError(
            f"hierarchy '{name}': column {s.name!r} has dtype "
            f"{s.dtype}; expected a numeric age in {unit}"
        )
    return s.to_numpy(dtype=np.float64, na_value=np.nan) * _UNIT_DAYS[unit]


def _binner(edges: np.ndarray, labels: Sequence[str], unit: str, name: str):
    lab = np.asarray(labels, dtype=object)

    def level(s: pd.Series) -> pd.Series:
        idx = np.searchsorted(edges, _age_days(s, unit, name), side="right") - 1
        return pd.Series(lab[idx], index=s.index)

    return level


def _age_covers(unit: str, name: str):
    def covers(s: pd.Series) -> np.ndarray:
        d = _age_days(s, unit, name)
        return np.isfinite(d) & (d >= 0) & (d < _ADULT_DAYS)

    return covers


def _check_unit(unit: str) -> None:
    if unit not in _UNIT_DAYS:
        raise HierarchyError(f"age unit {unit!r} is not one of {sorted(_UNIT_DAYS)}")


def paediatric_age(unit: str = "days", name: str = "age") -> Hierarchy:
    """Paediatric age bands 0-27 d, 1-11 m, 1-4, 5-9, 10-14, 15-17 y (age in days
    by default).

    Level 1: 0-27 d, 1-11 m, 1-4 y, 5-9 y, 10-14 y, 15-17 y; level 2 (nested):
    0-11 m, 1-9 y, 10-17 y; level 3: '*'. Ages convert to days with a Julian year
    (365.25 d; a month is 365.25 / 12 d), so 28 d is the first infant day, 12 m is
    1 y and 18 y = 6574.5 d. Ages < 0 or >= 18 y are not covered. The ICH E11 age
    classes do not nest under these bands (see :func:`ich_e11_age`).
    """
    _check_unit(unit)
    return Hierarchy(
        name,
        (
            _binner(_PAEDIATRIC_EDGES, _PAEDIATRIC_LABELS, unit, name),
            _binner(_PAEDIATRIC_EDGES, _NESTED_LABELS, unit, name),
        ),
        covers=_age_covers(unit, name),
    )


def ich_e11_age(unit: str = "days", name: str = "age") -> Hierarchy:
    """ICH E11 / EMA paediatric age classes (level 1), then '*'.

    Term newborn 0-27 d, infants and toddlers 28 d-23 m, children 2-11 y,
    adolescents 12-17 y (ICH E11(R1) section 2.5; EMA uses 12-17 y for
    adolescents, Regulation (EC) 1901/2006). Preterm newborns need gestational
    age and are not derivable from age. Not nested under :func:`paediatric_age`
    (1-4 y and 10-14 y straddle the 2 y and 12 y cut-offs), hence separate.
    """
    _check_unit(unit)
    return Hierarchy(
        name,
        (_binner(_ICH_EDGES, _ICH_LABELS, unit, name),),
        covers=_age_covers(unit, name),
    )


_LIFE_EDGES = np.concatenate(
    [_PAEDIATRIC_EDGES, np.array([30.0, 40, 50, 60, 70, 80]) * _DAYS_PER_YEAR]
)
_LIFE_LABELS = [
    *_PAEDIATRIC_LABELS,
    "18-29 y",
    "30-39 y",
    "40-49 y",
    "50-59 y",
    "60-69 y",
    "70-79 y",
    "80+ y",
]
_LIFE_NESTED = [
    *_NESTED_LABELS,
    "18-39 y",
    "18-39 y",
    "40-59 y",
    "40-59 y",
    "60+ y",
    "60+ y",
    "60+ y",
]
_MAX_AGE_DAYS = 130 * _DAYS_PER_YEAR


def lifespan_age(unit: str = "years", name: str = "age") -> Hierarchy:
    """The paediatric bands of :func:`paediatric_age` continued into adulthood.

    Haemophilia PK cohorts span children and adults (e.g. Advate 1-65 y, Bjorkman
    et al., Blood 2012;119:612-618), so their age QI needs adult bands. Level 1:
    the six paediatric bands, then 18-29, 30-39, ..., 70-79, 80+ y; level 2
    (nested): 0-11 m, 1-9 y, 10-17 y, 18-39 y, 40-59 y, 60+ y; level 3: '*'.
    Ages in [0, 130) y are covered.
    """
    _check_unit(unit)

    def covers(s: pd.Series) -> np.ndarray:
        d = _age_days(s, unit, name)
        return np.isfinite(d) & (d >= 0) & (d < _MAX_AGE_DAYS)

    return Hierarchy(
        name,
        (
            _binner(_LIFE_EDGES, _LIFE_LABELS, unit, name),
            _binner(_LIFE_EDGES, _LIFE_NESTED, unit, name),
        ),
        covers=covers,
    )


def suppress_only(name: str) -> Hierarchy:
    """Two levels: the original value, or '*' (e.g. sex, or a site code)."""
    return Hierarchy(name, (), covers=lambda s: np.ones(len(s), dtype=bool))


# ---------------------------------------------------------------------- intervals
def _fmt(x: float) -> str:
    return f"{x:g}"


def interval(
    name: str,
    width_levels: Sequence[float] = (5, 10, 20),
    *,
    lower: float,
    upper: float,
) -> Hierarchy:
    """Half-open intervals '[a, b)' anchored at ``lower``, one width per level.

    Each width must be a whole multiple of the one before (so levels nest); values
    outside ``[lower, upper)`` are not covered. E.g. weight in kg or height in cm.
    """
    widths = [float(w) for w in width_levels]
    if not widths or any(w <= 0 for w in widths):
        raise HierarchyError(
            f"hierarchy '{name}': widths {width_levels!r} must be positive"
        )
    for a, b in zip(widths, widths[1:], strict=False):
        r = b / a
        if r < 1 or abs(r - round(r)) > 1e-9:
            raise HierarchyError(
                f"hierarchy '{name}': width {b:g} is not a whole "
                f"multiple of {a:g}, so levels would not nest"
            )
    if not np.isfinite(lower) or not np.isfinite(upper) or upper <= lower:
        raise HierarchyError(
            f"hierarchy '{name}': need finite lower < upper, got [{lower}, {upper})"
        )

    def _num(s: pd.Series) -> np.ndarray:
        if not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
            raise HierarchyError(
                f"hierarchy '{name}': column {s.name!r} has dtype "
                f"{s.dtype}; expected numbers"
            )
        return s.to_numpy(dtype=np.float64, na_value=np.nan)

    def make(w: float):
        def level(s: pd.Series) -> pd.Series:
            lo = lower + np.floor((_num(s) - lower) / w) * w
            return pd.Series(
                [f"[{_fmt(a)}, {_fmt(a + w)})" for a in lo], index=s.index, dtype=object
            )

        return level

    def covers(s: pd.Series) -> np.ndarray:
        v = _num(s)
        return np.isfinite(v) & (v >= lower) & (v < upper)

    return Hierarchy(name, tuple(make(w) for w in widths), covers=covers)


def weight_kg(name: str = "weight_kg") -> Hierarchy:
    """Body weight: 5, 10, 20 kg intervals on [0, 300) kg."""
    return interval(name, (5, 10, 20), lower=0, upper=300)


def height_cm(name: str = "height_cm") -> Hierarchy:
    """Body length/height: 5, 10, 20 cm intervals on [20, 260) cm."""
    return interval(name, (5, 10, 20), lower=20, upper=260)


# -------------------------------------------------------------------------- dates
def dates(name: str) -> Hierarchy:
    """Dates: level 1 month 'YYYY-MM', level 2 year 'YYYY', level 3 '*'.

    Values must be a datetime64 column (naive or tz-aware); NaT stays missing.
    """

    def _dt(s: pd.Series) -> pd.Series:
        if not pd.api.types.is_datetime64_any_dtype(s):
            raise HierarchyError(
                f"hierarchy '{name}': column {s.name!r} has dtype "
                f"{s.dtype}; expected datetime64 (use "
                f"pd.to_datetime first)"
            )
        return s

    return Hierarchy(
        name,
        (lambda s: _dt(s).dt.strftime("%Y-%m"), lambda s: _dt(s).dt.strftime("%Y")),
        covers=lambda s: np.ones(len(_dt(s)), dtype=bool),
    )


# -------------------------------------------------------------------- categorical
def categorical(name: str, mapping_levels: Sequence[Mapping]) -> Hierarchy:
    """Explicit maps: level 1 maps original values, level l + 1 maps level-l labels.

    Chaining the maps makes the hierarchy nested by construction; a level-l label
    missing from the next map is a :class:`HierarchyError` at construction, and an
    original value missing from the first map is not covered.
    """
    if not mapping_levels:
        raise HierarchyError(f"hierarchy '{name}': mapping_levels is empty")
    composed = [dict(mapping_levels[0])]
    for lvl, nxt in enumerate(mapping_levels[1:], start=2):
        prev = composed[-1]
        gaps = sorted({str(v) for v in prev.values() if v not in nxt})
        if gaps:
            raise HierarchyError(
                f"hierarchy '{name}': level {lvl} map has no entry "
                f"for level-{lvl - 1} label(s) {gaps!r}"
            )
        composed.append({k: nxt[v] for k, v in prev.items()})
    return Hierarchy(name, tuple(composed))
