"""Optional comparator: smartnoise-synth's MST (MIT; needs mbi<2, so it runs in its
own virtual environment named by PHEMS_SNSYNTH_PYTHON, never in ours).

Usage: python smartnoise_mst.py IN.csv N OUT.csv EPSILON DOMAIN.json
DOMAIN.json: {column: [lower, upper, bins(, "log1p")] or {"cat": [category, ...]}},
the same public domain our MST gets, so no budget is spent on bounds (smartnoise's
own bound finding fails on these columns: "BinTransformer could not find bounds",
opendp/smartnoise-sdk#615). "log1p" columns are binned on that scale, as ours are.
Missing numbers are filled with the lower bound.
Prints JSON timings.
"""

import json
import sys
import time
import warnings

import numpy as np
import pandas as pd
from snsynth import Synthesizer
from snsynth.transform import BinTransformer, LabelTransformer, TableTransformer

warnings.simplefilter("ignore")
src, n, dst, eps = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
domain = json.loads(open(sys.argv[5]).read())
df = pd.read_csv(src)
transformers = []
for c in df.columns:
    spec = domain[c]
    if isinstance(spec, dict):
        df[c] = df[c].astype(str)
        transformers.append(LabelTransformer(nullable=True))
    else:
        lo, hi, bins = spec[:3]
        df[c] = df[c].fillna(lo).clip(lo, hi)
        if len(spec) > 3:
            df[c], lo, hi = np.log1p(df[c]), float(np.log1p(lo)), float(np.log1p(hi))
        transformers.append(BinTransformer(lower=lo, upper=hi, bins=bins))
tt = TableTransformer(transformers)
t0 = time.perf_counter()
syn = Synthesizer.create("mst", epsilon=eps)
syn.fit(df, transformer=tt, preprocessor_eps=0.0)
t1 = time.perf_counter()
out = syn.sample(n)
t2 = time.perf_counter()
pd.DataFrame(out).to_csv(dst, index=False)
print(
    json.dumps({"fit_s": t1 - t0, "sample_s": t2 - t1, "rows": n, "version": "1.0.8"})
)
