"""JAX settings for the programs a user starts (command line, web app, the Flower
apps' processes, which Flower starts anew for every message).

* float64: PK parameters are estimated and root-found in double precision;
* a persistent compilation cache, so that a second ``phems dose`` (a new process)
  reuses the compiled forecasting code instead of compiling it again (about 15 s
  on a 2-core CPU). It lives in ``$PHEMS_CACHE_DIR`` or
  ``~/.cache/phems_clinical/jax``; set ``PHEMS_CACHE_DIR=off`` to disable it.
"""

from __future__ import annotations

import os
from pathlib import Path


def configure_jax() -> None:
    """Enable x64 and the persistent compilation cache (idempotent)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    where = os.environ.get("PHEMS_CACHE_DIR", "")
    if where.lower() == "off":
        return
    path = Path(where) if where else Path.home() / ".cache" / "phems_clinical" / "jax"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # read-only home: run without the cache
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
