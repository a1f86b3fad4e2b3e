"""Shared type aliases (jaxtyping shapes are documentation and runtime-checkable)."""

from typing import Any

from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

Key = PRNGKeyArray
PyTree = Any

__all__ = ["Array", "Bool", "Float", "Int", "Key", "PyTree"]
