"""Optional comparator: SDV 2.0 GaussianCopulaSynthesizer (BUSL-1.1, never a
dependency of phems_clinical). Run by bench_privacy.py with the interpreter named in
PHEMS_SDV_PYTHON (a separate virtual environment with ``sdv`` installed).

Usage: python sdv_gaussian_copula.py IN.csv N OUT.csv; prints JSON timings.
"""

import json
import sys
import time

import pandas as pd
from sdv.metadata import Metadata
from sdv.single_table import GaussianCopulaSynthesizer

src, n, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
df = pd.read_csv(src)
t0 = time.perf_counter()
meta = Metadata.detect_from_dataframes({"t": df})
syn = GaussianCopulaSynthesizer(meta)
syn.fit({"t": df})
t1 = time.perf_counter()
out = syn.sample(num_rows=n)
out = out["t"] if isinstance(out, dict) else out
t2 = time.perf_counter()
out.to_csv(dst, index=False)
print(
    json.dumps(
        {
            "fit_s": t1 - t0,
            "sample_s": t2 - t1,
            "rows": len(out),
            "version": __import__("sdv").__version__,
        }
    )
)
