"""Peak memory of the pixel search's gradient-boosting candidate, against the estimate that
decides whether the search fits it (``medmeta.learning.pixels.hgb_bytes``).

Each case fits the candidate (``pixels.candidates``' own settings, 3 iterations: the peak is
reached in the first) on random float32 pixels of ``samples`` x ``features`` in a fresh process
with one thread, and reads the kernel's high-water mark (VmHWM) from before the fit. The
estimate must stay above every measured peak: a search that starts a fit it cannot hold is
killed for memory (adrenal at 64³ was, at 24.4 GB).

    python benchmarks/hgb_memory.py          # about 6 minutes
"""
from __future__ import annotations

import os
import subprocess
import sys

CASES = [(1188, 10_000), (2376, 10_000), (4752, 10_000), (9504, 10_000), (1188, 40_000), (19_008, 5_000)]


def measure(samples: int, features: int) -> int:
    """Bytes the fit adds to the process's peak resident memory."""
    import numpy as np
    from sklearn.base import clone

    from memory import reset_peak, status_mib
    from medmeta.learning.pixels import candidates

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (samples, features), dtype=np.uint8).astype(np.float32) / 255.0
    y = rng.integers(0, 2, samples)
    before = status_mib("VmRSS")
    reset_peak()
    clone(candidates(0)["hgb"]).set_params(max_iter=3).fit(x, y)
    return int((status_mib("VmHWM") - before) * 2**20)


def main() -> None:
    if len(sys.argv) == 3:  # one case, in its own process
        print(measure(int(sys.argv[1]), int(sys.argv[2])))
        return
    import sklearn

    from medmeta.learning.pixels import hgb_bytes

    print(f"scikit-learn {sklearn.__version__}, one thread; GB = 1e9 bytes")
    print(f"{'samples':>8} {'features':>9} {'measured GB':>12} {'estimate GB':>12} {'estimate/measured':>18}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for samples, features in CASES:
        out = subprocess.run([sys.executable, __file__, str(samples), str(features)], env=env, check=True,
                             capture_output=True, text=True).stdout
        measured, estimate = int(out.split()[-1]), hgb_bytes(samples, features)
        print(f"{samples:>8,} {features:>9,} {measured / 1e9:>12.2f} {estimate / 1e9:>12.2f} "
              f"{estimate / measured:>18.2f}", flush=True)


if __name__ == "__main__":
    main()
