"""Local (cell) suppression in the lattice search and the use-case release:
hand-worked tables, the released table re-checked by privacy.anonymity."""

import jax
import numpy as np
import pandas as pd
import pytest

from phems_clinical import usecases
from phems_clinical.data.cardiac import simulate_cardiac
from phems_clinical.data.cardiac.pathways import episodes
from phems_clinical.privacy.anonymity import k_anonymity
from phems_clinical.privacy.hierarchies import categorical, suppress_only
from phems_clinical.privacy.release import BAND_SUFFIX, AnonymiseError, anonymise
from phems_clinical.privacy.search import SearchError, lattice_search

CARDIAC = usecases.get("cardiac").roles

# 6 records in two classes of 3, and 2 records (1,3) and (2,3) that are unique on
# (A, B) but share B: one cell each (A) makes them a class of 2.
TABLE = pd.DataFrame({"A": [1, 1, 1, 2, 2, 2, 1, 2], "B": [1, 1, 1, 2, 2, 2, 3, 3]})
HIER = {"A": suppress_only("A"), "B": suppress_only("B")}


def test_two_cells_beat_two_records_or_a_column():
    cells = lattice_search(TABLE, HIER, k=2, max_suppression=0.15, suppression="cells")
    assert cells.levels == {"A": 0, "B": 0}
    assert cells.metrics["suppressed_cells"] == 2
    assert list(cells.data["A"].astype(str)) == ["1", "1", "1", "2", "2", "2", "*", "*"]
    assert k_anonymity(cells.data, ["A", "B"]) == 2  # independent check
    assert cells.metrics["information_loss"] == pytest.approx(2 / 16)
    # record suppression would need 2 of 8 records (25 %): over the limit, so the
    # search generalises a whole column instead (loss 0.5)
    rec = lattice_search(TABLE, HIER, k=2, max_suppression=0.15)
    assert rec.levels in ({"A": 1, "B": 0}, {"A": 0, "B": 1})
    assert rec.metrics["information_loss"] == pytest.approx(0.5)


def test_greedy_picks_the_qi_that_fixes_the_class():
    df = pd.DataFrame(
        {
            "A": [1, 1, 2, 2, 3, 3, 4, 5],  # 5 distinct
            "B": ["x", "x", "y", "y", "x", "x", "y", "y"],
        }
    )
    h = {"A": suppress_only("A"), "B": suppress_only("B")}
    r = lattice_search(df, h, k=2, max_suppression=0.2, suppression="cells")
    assert r.metrics["suppressed_cells"] == 2
    assert (r.data["A"].astype(str).to_numpy()[-2:] == "*").all()
    assert (r.data["B"].to_numpy()[-2:] == "y").all()


def test_unfixable_records_fall_back_to_whole_record():
    df = pd.DataFrame({"A": [1, 1, 2, 2, 3], "B": [1, 1, 2, 2, 9]})
    h = {"A": suppress_only("A"), "B": suppress_only("B")}
    r = lattice_search(df, h, k=2, max_suppression=0.25, suppression="cells")
    assert r.suppressed.tolist() == [False] * 4 + [True]
    assert r.metrics["suppressed_cells"] == 0  # cells of released records only
    assert r.metrics["suppressed_cell_share"] == pytest.approx(2 / 10)
    with pytest.raises(SearchError, match="suppression"):
        lattice_search(df, h, k=2, suppression="columns")


def test_generalisation_levels_still_searched():
    df = pd.DataFrame({"A": list("aabbccdd"), "B": [1] * 8})
    h = {
        "A": categorical("A", [{"a": "ab", "b": "ab", "c": "cd", "d": "cd"}]),
        "B": suppress_only("B"),
    }
    r = lattice_search(df, h, k=4, suppression="cells", max_suppression=0.1)
    assert r.levels == {"A": 1, "B": 0} and r.metrics["suppressed_cells"] == 0


def test_release_with_cell_suppression():
    s = episodes(simulate_cardiac(jax.random.key(4), n_episodes=200).tables)[0]
    rel = anonymise(
        jax.random.key(0), s, CARDIAC, k=5, max_suppression=0.05, suppression="cells"
    )
    bands = [c + BAND_SUFFIX for c in ("age_days", "sex", "weight_kg")]
    pt = rel.data.groupby("person_id")[bands].first()
    assert pt.value_counts().min() >= 5
    n_cells = sum(
        q["cells_suppressed"] for q in rel.report["quasi_identifiers"].values()
    )
    assert n_cells == rel.report["search"]["suppressed_cells"]
    assert n_cells <= 0.05 * 3 * rel.report["patients_in"]
    first = rel.data.groupby("person_id")[["sex", "sex_band"]].first()
    starred = first["sex_band"] == "*"
    assert first.loc[starred, "sex"].isna().all()
    with pytest.raises(AnonymiseError, match="cells"):
        anonymise(jax.random.key(0), s, CARDIAC, method="mondrian", suppression="cells")
    np.testing.assert_array_equal(
        rel.data["age_group"].to_numpy(),
        np.where(
            rel.data["age_days"] <= 30,
            "neonate",
            np.where(rel.data["age_days"] <= 365, "infant", "child"),
        ),
    )
