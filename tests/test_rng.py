"""The one JAX key -> numpy Generator derivation (:mod:`phems_clinical.rng`)."""

import ast
from pathlib import Path

import jax
import numpy as np
import pytest

from phems_clinical.rng import numpy_generator

ROOT = Path(__file__).resolve().parents[1] / "phems_clinical"


def test_seeds_numpy_with_the_key_words():
    """Hand-worked reference: threefry's ``PRNGKey(42)`` holds the words
    ``[0, 42]`` (JAX documentation), so the stream is numpy's for that seed."""
    want = np.random.default_rng(np.array([0, 42], dtype=np.uint32)).random(5)
    np.testing.assert_array_equal(numpy_generator(jax.random.key(42)).random(5), want)
    np.testing.assert_array_equal(
        numpy_generator(jax.random.PRNGKey(42)).random(5), want
    )


def test_distinct_keys_give_distinct_streams():
    k1, k2 = jax.random.split(jax.random.key(0))
    assert not np.array_equal(
        numpy_generator(k1).random(4), numpy_generator(k2).random(4)
    )


def test_a_batch_of_keys_is_refused():
    with pytest.raises(ValueError, match=r"key: expected one JAX key.*\(3, 2\)"):
        numpy_generator(jax.random.split(jax.random.key(0), 3))


def test_no_module_derives_its_own_generator_from_a_key():
    """``default_rng(... key_data(...) ...)`` appears only in the shared helper."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if path == ROOT / "rng.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "default_rng"
                and "key_data" in ast.unparse(node)
            ):
                found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}")
    assert found == []
